"""bench/compare's contenders decode the same prompt to the same tokens, however accelerate places the model."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import compare  # noqa: E402  (bench/compare.py, a program, not a package)


@pytest.mark.parametrize("vram", [None, 64 << 10, 1 << 10], ids=["no-offload", "some-on-disk", "all-on-disk"])
def test_accelerate_contender_generates_the_runtimes_greedy_tokens(tiny_checkpoint, vram):
    # 1 KiB puts every module on disk, the embedding included: the model's first parameter is then on 'meta',
    # where the inputs must not go (generate used to fail there with "Tensor.item() cannot be called on meta").
    ours = compare.ours(tiny_checkpoint, "cpu", tokens=6, repeats=1, context=64)
    hf = compare.accelerate_offload(tiny_checkpoint, "cpu", vram, None, tokens=6, repeats=1, dtype="float32")
    assert hf["tokens"] == ours["tokens"]
    assert ("disk" in hf["placement"]) == (vram is not None)
    if vram == 1 << 10:
        assert list(hf["placement"]) == ["disk"]
