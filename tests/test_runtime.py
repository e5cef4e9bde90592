"""offload/runtime.py: closing a runtime gives its memory back, and the torch it needs is the torch it asks for."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import offload
from conftest import REPO, make_checkpoint
from offload.runtime import TORCH_FLOOR

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """Experts of 6 MiB (float32), 16 of them: a host tier and a slot pool of 96 MiB each, large enough that
    the C allocator maps them on their own and gives them back to the system when freed."""
    folder = tmp_path_factory.mktemp("wide")
    make_checkpoint(folder, hidden=256, ffn=2048, layers=2, experts=8)
    return folder


# Run in a fresh interpreter: in the suite's long-lived process, what earlier tests left in the allocator made
# the resident-memory drop read low (passes alone, failed once in a full run); a new process measures only this.
CLOSE = """
import gc, json, sys, weakref
import psutil
import offload
rt = offload.load(sys.argv[1], device="cpu", context=64)  # every expert in RAM and in the slot pool
tokens = list(rt.generate_ids(rt.encode(sys.argv[2]), 6))
store = rt.store
out = {"host": store.host.untyped_storage().nbytes(), "dev": store.dev.untyped_storage().nbytes(), "tokens": tokens}
tiers = [weakref.ref(store.host), weakref.ref(store.dev), weakref.ref(rt.model.cache.k)]
stats = rt.stats()
gc.collect()
out["before"] = psutil.Process().memory_info().rss
rt.close()  # `rt` stays referenced, as in a notebook after its `with` block
gc.collect()
out["after"] = psutil.Process().memory_info().rss
out["freed"] = all(ref() is None for ref in tiers)
out["stats_answer"] = rt.stats()["peak_vram_bytes"] == stats["peak_vram_bytes"]
print(json.dumps(out))
"""


def test_close_gives_back_the_host_tier_and_the_device_pool_and_a_second_load_works(wide_checkpoint):
    result = subprocess.run([sys.executable, "-c", CLOSE, str(wide_checkpoint), PROMPT], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    m = json.loads(result.stdout.splitlines()[-1])
    host_bytes, tokens = m["host"], m["tokens"]
    assert host_bytes >= 90 << 20 and m["dev"] == host_bytes
    assert m["freed"]  # nothing holds the tiers or the KV cache any more ...
    assert m["before"] - m["after"] >= 0.9 * host_bytes  # ... and the process's memory went down by the host tier at least
    assert m["stats_answer"]  # stats still answer
    rt = offload.load(wide_checkpoint, device="cpu", context=64)
    assert list(rt.generate_ids(rt.encode(PROMPT), 6)) == tokens
    rt.close()
    with pytest.raises(offload.UserError, match="this runtime was closed"):
        list(rt.generate_ids(rt.encode(PROMPT), 2))
    with offload.load(wide_checkpoint, device="cpu", context=64) as again:
        assert list(again.generate_ids(again.encode(PROMPT), 6)) == tokens
    rt.close()  # a second close does nothing


def pyproject_torch_floor() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"torch>=([0-9.]+)"', text).group(1)


# What the code calls, and the torch release that brought it: the floor must be at least each one found.
NEEDS = {r"enable_gqa\s*=": "2.5"}  # scaled_dot_product_attention(enable_gqa=...)


def test_the_torch_floor_covers_what_the_code_calls():
    sources = [p for d in ("offload", "quant", "lut", "cli") for p in (REPO / d).rglob("*.py")]
    needed = {version for pattern, version in NEEDS.items()
              if any(re.search(pattern, p.read_text()) for p in sources)}
    assert needed, "the code no longer calls what NEEDS lists: update the table"
    floor = torch.torch_version.TorchVersion(pyproject_torch_floor())
    assert all(floor >= v for v in needed), (str(floor), needed)
    assert pyproject_torch_floor() == TORCH_FLOOR  # the one the runtime checks


def test_an_older_torch_is_refused_in_one_line_naming_the_floor(monkeypatch):
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.4.1+cu121"))
    with pytest.raises(offload.UserError, match=r"torch 2.4.1\+cu121 is older than the 2.5 .*'torch>=2.5'"):
        offload.load("demo", device="cpu")
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.10.0"))
    offload.load("demo", device="cpu").close()  # 2.10 is newer than 2.5, though "2.10" < "2.5" as text
