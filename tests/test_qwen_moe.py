"""The Qwen-MoE families (offload/models/qwen_moe.py) against transformers' Qwen2MoeForCausalLM and
Qwen3MoeForCausalLM on random-weight checkpoints (float32 compute, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from oracle import assert_greedy_matches, assert_logits_match, save_reference

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, moe_intermediate_size=32, max_position_embeddings=256, bos_token_id=1,
            eos_token_id=2)

QWEN2 = {
    "shared-e8-top2-gqa": dict(num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=48),
    "noshared-dense-step2-norm-top1-tied": dict(num_experts=6, num_experts_per_tok=1, shared_expert_intermediate_size=0,
                                                decoder_sparse_step=2, mlp_only_layers=[0], norm_topk_prob=True,
                                                tie_word_embeddings=True),
    "window-mha-e16-top4-nobias": dict(num_experts=16, num_experts_per_tok=4, shared_expert_intermediate_size=40,
                                       num_key_value_heads=4, qkv_bias=False, use_sliding_window=True,
                                       sliding_window=6, max_window_layers=2),
    "sharded-bf16": dict(num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=48,
                         dtype=torch.bfloat16, shard_size="60KB"),
}
QWEN3 = {
    "headdim32-e8-top2-norm": dict(num_experts=8, num_experts_per_tok=2, head_dim=32, norm_topk_prob=True),
    "e16-top8-gqa4-bias-dense-tied": dict(num_experts=16, num_experts_per_tok=8, num_attention_heads=8,
                                           num_key_value_heads=2, head_dim=16, attention_bias=True,
                                           mlp_only_layers=[1], tie_word_embeddings=True),
    "window-top1": dict(num_experts=4, num_experts_per_tok=1, head_dim=16, use_sliding_window=True, sliding_window=5),
    "sharded-bf16": dict(num_experts=8, num_experts_per_tok=2, head_dim=16, dtype=torch.bfloat16, shard_size="60KB"),
}


def make(folder, family: str, shape: dict, seed: int = 0, tokenizer: bool = False):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = dict(shape)
    dtype, shard = shape.pop("dtype", torch.float32), shape.pop("shard_size", None)
    config_cls, model_cls = ((Qwen2MoeConfig, Qwen2MoeForCausalLM) if family == "qwen2_moe"
                             else (Qwen3MoeConfig, Qwen3MoeForCausalLM))
    return save_reference(folder, model_cls, config_cls(**{**BASE, **shape}), dtype=dtype, shard_size=shard,
                          seed=seed, tokenizer=tokenizer)


CASES = [("qwen2_moe", name) for name in QWEN2] + [("qwen3_moe", name) for name in QWEN3]


@pytest.mark.parametrize("family, name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_logits_match_transformers_after_prefill_and_16_decode_steps(tmp_path, family, name):
    shape = (QWEN2 if family == "qwen2_moe" else QWEN3)[name]
    ref = make(tmp_path, family, shape, seed=CASES.index((family, name)))
    if shape.get("shard_size"):
        assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == family
    assert_logits_match(tmp_path, ref, BASE["vocab_size"])


@pytest.mark.parametrize("family, name", [("qwen2_moe", "shared-e8-top2-gqa"), ("qwen3_moe", "headdim32-e8-top2-norm")])
def test_32_greedy_tokens_equal_transformers_through_the_api_and_generate_json(tmp_path, family, name):
    ref = make(tmp_path, family, (QWEN2 if family == "qwen2_moe" else QWEN3)[name], seed=11, tokenizer=True)
    assert_greedy_matches(tmp_path, ref, "The quick brown fox jumps over the lazy dog")
