"""The OLMoE family (offload/models/olmoe.py) against transformers' OlmoeForCausalLM on random-weight
checkpoints (float32 compute, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from oracle import assert_greedy_matches, assert_logits_match, save_reference

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

SHAPES = {
    "e8-top2-clip": dict(num_experts=8, num_experts_per_tok=2, clip_qkv=0.4),
    "e16-top8-norm-gqa-bias-tied": dict(num_experts=16, num_experts_per_tok=8, norm_topk_prob=True,
                                        num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True),
    "e4-top1-noclip": dict(num_experts=4, num_experts_per_tok=1),
    "sharded-bf16-clip": dict(num_experts=8, num_experts_per_tok=2, clip_qkv=1.0, dtype=torch.bfloat16,
                              shard_size="60KB"),
}


def make(folder, shape: dict, seed: int = 0, tokenizer: bool = False):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    shape = dict(shape)
    dtype, shard = shape.pop("dtype", torch.float32), shape.pop("shard_size", None)
    return save_reference(folder, OlmoeForCausalLM, OlmoeConfig(**{**BASE, **shape}), dtype=dtype, shard_size=shard,
                          seed=seed, tokenizer=tokenizer)


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers_after_prefill_and_16_decode_steps(tmp_path, name):
    ref = make(tmp_path, SHAPES[name], seed=list(SHAPES).index(name))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "olmoe"
    assert_logits_match(tmp_path, ref, BASE["vocab_size"])


def test_clip_qkv_is_applied(tmp_path):
    """The clamp changes the result on these weights: a runtime that ignored clip_qkv would not match."""
    ref = make(tmp_path, SHAPES["e8-top2-clip"])
    prompt = torch.randint(3, 320, (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clipped = ref(prompt[None]).logits
        ref.config.clip_qkv = None
        for layer in ref.model.layers:
            layer.self_attn.config.clip_qkv = None
        unclipped = ref(prompt[None]).logits
    assert (clipped - unclipped).abs().max().item() > 1e-2


def test_32_greedy_tokens_equal_transformers_through_the_api_and_generate_json(tmp_path):
    ref = make(tmp_path, SHAPES["e8-top2-clip"], seed=11, tokenizer=True)
    assert_greedy_matches(tmp_path, ref, "The quick brown fox jumps over the lazy dog")
