"""The forward against the oracle: transformers' MixtralForCausalLM on random-weight checkpoints (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from offload.models import expected_shapes, open_checkpoint
from offload.generate import Sampling, decode_one, generate_ids, prefill
from offload.runtime import build_model
from offload.store import ExpertStore

from conftest import make_checkpoint

SHAPES = {
    "gqa4-e6-top2-untied": dict(heads=8, kv_heads=2, experts=6, top_k=2, tied=False),
    "mha-e4-top1-tied": dict(heads=4, kv_heads=4, experts=4, top_k=1, tied=True),
    "gqa8-e8-top2-sharded": dict(heads=8, kv_heads=1, experts=8, top_k=2, shard_size="100KB"),
    "headdim-window-e3-top2": dict(heads=4, kv_heads=2, experts=3, top_k=2, head_dim=32, sliding_window=8),
}


def ours(folder, context=128):
    ckpt = open_checkpoint(folder)
    ckpt.validate(expected_shapes(ckpt.config))
    store = ExpertStore(ckpt, torch.device("cpu"), torch.float32)
    return build_model(ckpt, store, torch.device("cpu"), torch.float32, context)


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers_after_prefill_and_16_decode_steps(tmp_path, name):
    ref = make_checkpoint(tmp_path, layers=3, seed=hash(name) % 1000, tokenizer=False, **SHAPES[name])
    if SHAPES[name].get("shard_size"):
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = ours(tmp_path)
    prompt = torch.randint(3, 320, (21,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(prompt[None], use_cache=True)
        logits = prefill(model, prompt)
        torch.testing.assert_close(logits, out.logits[0, -1], atol=1e-4, rtol=0)
        past, token, pos = out.past_key_values, int(logits.argmax()), prompt.numel()
        for _ in range(16):
            out = ref(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            logits = decode_one(model, token, pos)
            torch.testing.assert_close(logits, out.logits[0, -1], atol=1e-4, rtol=0)
            past, token, pos = out.past_key_values, int(logits.argmax()), pos + 1


@pytest.mark.parametrize("name", ["gqa4-e6-top2-untied", "mha-e4-top1-tied"])
def test_greedy_generation_is_identical_for_32_tokens(tmp_path, name):
    ref = make_checkpoint(tmp_path, layers=2, seed=7, tokenizer=False, **SHAPES[name])
    model = ours(tmp_path)
    prompt = [1, 17, 42, 99, 5, 230, 64]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    got = list(generate_ids(model, prompt, 32, Sampling(temperature=0)))
    assert got == expected


def test_sampling_is_reproducible_with_a_seed(tiny_checkpoint):
    model = ours(tiny_checkpoint)
    s = Sampling(temperature=0.9, top_k=50, top_p=0.9, seed=123)
    first = list(generate_ids(model, [1, 5, 6], 20, s))
    model.cache.k.zero_()
    second = list(generate_ids(model, [1, 5, 6], 20, s))
    assert first == second and len(first) == 20
