"""The DeepSeek-style families against transformers on random-weight checkpoints (float32 compute, CPU):
DeepSeek-V2 and DeepSeek-V3 (offload/models/deepseek.py, multi-head latent attention over a latent KV cache)
and GLM-4.5 (offload/models/glm4_moe.py). Prompts are longer than 64 tokens, so decode reads a cache that
prefill filled."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import assert_generate_fails_in_one_line, copy_with, inspect_json, run_cli
from oracle import assert_greedy_matches, assert_logits_match, ours, save_reference

VOCAB = 320
PROMPT_LEN = 70
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              moe_intermediate_size=32, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)

V2 = {
    "lite-qnull-greedy-dense1-shared2-yarn": dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                                                  n_shared_experts=2, first_k_dense_replace=1, rope_scaling=YARN),
    "qlora-grouplimited-shared1-scaled": dict(q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=3,
                                              topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                              n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=1.5),
    "bias-tied-top1": dict(q_lora_rank=24, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=1,
                           attention_bias=True, tie_word_embeddings=True, first_k_dense_replace=0),
    "sharded-bf16-yarn": dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                              first_k_dense_replace=1, rope_scaling=YARN, dtype=torch.bfloat16, shard_size="60KB"),
}
V3 = {
    "qlora-groups-yarn-dense1": dict(q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                     topk_group=2, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
                                     routed_scaling_factor=2.5, rope_scaling={**YARN, "mscale": 1.0,
                                                                              "mscale_all_dim": 1.0}),
    "qnull-group1-rotatehalf-shared2": dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                                            topk_group=1, n_shared_experts=2, first_k_dense_replace=0,
                                            norm_topk_prob=False, routed_scaling_factor=1.0, rope_interleave=False),
    "sharded-bf16": dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                         n_shared_experts=1, first_k_dense_replace=1, dtype=torch.bfloat16, shard_size="60KB"),
}
GLM = {
    "qknorm-bias-partial-groups": dict(head_dim=16, num_key_value_heads=2, use_qk_norm=True, attention_bias=True,
                                       partial_rotary_factor=0.5, n_routed_experts=8, num_experts_per_tok=2,
                                       n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                                       routed_scaling_factor=2.5),
    "plain-full-rotary-dense0": dict(head_dim=32, num_key_value_heads=4, partial_rotary_factor=1.0,
                                     n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2,
                                     first_k_dense_replace=0, norm_topk_prob=False),
    "sharded-bf16": dict(head_dim=16, num_key_value_heads=2, use_qk_norm=True, n_routed_experts=8,
                         num_experts_per_tok=2, first_k_dense_replace=1, dtype=torch.bfloat16, shard_size="60KB"),
}
SHAPES = {"deepseek_v2": V2, "deepseek_v3": V3, "glm4_moe": GLM}


def classes(family: str):
    import transformers as t

    return {"deepseek_v2": (t.DeepseekV2Config, t.DeepseekV2ForCausalLM),
            "deepseek_v3": (t.DeepseekV3Config, t.DeepseekV3ForCausalLM),
            "glm4_moe": (t.Glm4MoeConfig, t.Glm4MoeForCausalLM)}[family]


def with_random_correction_bias(model_cls):
    """`model_cls` whose routers' e_score_correction_bias is random (initialized to 0, it would go untested),
    bfloat16-exact so that a bfloat16 checkpoint holds it as the reference uses it."""
    def make(config):
        model = model_cls(config)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_((0.1 * torch.randn_like(buffer)).bfloat16().float())
        return model
    return make


def make(folder, family: str, shape: dict, seed: int = 0, tokenizer: bool = False):
    config_cls, model_cls = classes(family)
    shape = dict(shape)
    dtype, shard = shape.pop("dtype", torch.float32), shape.pop("shard_size", None)
    base = COMMON if family == "glm4_moe" else {**COMMON, **MLA}
    return save_reference(folder, with_random_correction_bias(model_cls), config_cls(**{**base, **shape}), dtype=dtype,
                          shard_size=shard, seed=seed, tokenizer=tokenizer)


CASES = [(family, name) for family, shapes in SHAPES.items() for name in shapes]


@pytest.mark.parametrize("family, name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_logits_match_transformers_after_prefill_and_16_decode_steps(tmp_path, family, name):
    shape = SHAPES[family][name]
    ref = make(tmp_path, family, shape, seed=CASES.index((family, name)))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    if shape.get("shard_size"):
        assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_logits_match(tmp_path, ref, VOCAB, prompt_len=PROMPT_LEN)


@pytest.mark.parametrize("family, name", [("deepseek_v2", "lite-qnull-greedy-dense1-shared2-yarn"),
                                          ("deepseek_v3", "qlora-groups-yarn-dense1"),
                                          ("glm4_moe", "qknorm-bias-partial-groups")])
def test_32_greedy_tokens_equal_transformers_through_the_api_and_generate_json(tmp_path, family, name):
    ref = make(tmp_path, family, SHAPES[family][name], seed=11, tokenizer=True)
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
    assert_greedy_matches(tmp_path, ref, prompt)


@pytest.fixture(scope="module")
def v3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepseek_v3")
    make(folder, "deepseek_v3", V3["qlora-groups-yarn-dense1"], seed=3, tokenizer=True)
    return folder


def test_the_decode_cache_holds_the_latent_not_per_head_keys_and_values(v3_folder):
    """(kv_lora_rank + qk_rope_head_dim) values per token per layer, and the memory plan counts those."""
    import offload
    from offload.models.mla import LatentKVCache

    model = ours(v3_folder, context=128)
    cfg = model.cfg
    assert isinstance(model.cache, LatentKVCache) and model.cache.tensors() == [model.cache.kv]
    per_token_per_layer = (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]) * 4  # float32
    assert model.cache.nbytes == cfg.num_hidden_layers * 128 * per_token_per_layer
    # Against the expanded cache it replaces: keys and values of every head, [H, Dn + Dr] and [H, Dv].
    expanded = cfg.num_attention_heads * (MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"] + MLA["v_head_dim"]) * 4
    assert per_token_per_layer < expanded
    with offload.load(v3_folder, device="cpu", dtype="float32", context=128) as rt:
        rope = rt.model.cos.nbytes + rt.model.sin.nbytes
        assert rt.store.plan.kv_bytes == rt.model.cache.nbytes + rope


def test_v3_routing_uses_the_correction_bias_for_the_choice_and_prefetch_guesses_the_same(v3_folder):
    model = ours(v3_folder)
    h = torch.randn(64, model.cfg.hidden_size)
    for layer, router in model.routers().items():
        weights, ids = router(h)
        assert torch.equal(router.choose(h).sort(dim=-1).values, ids.sort(dim=-1).values)
        # The weights are the unbiased scores, renormalized, times routed_scaling_factor.
        assert torch.allclose(weights.sum(dim=-1), torch.full((64,), 2.5))
        unbiased = router.bias
        router.bias = None
        changed = not torch.equal(router.choose(h).sort(dim=-1).values, ids.sort(dim=-1).values)
        router.bias = unbiased
        assert changed, f"layer {layer}: the bias changes no choice on these weights; it would go untested"


@pytest.mark.parametrize("change, needle", [
    (lambda c: c.update(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling \"dynamic\" is not supported"),
    (lambda c: c.update(topk_method="greedy"), "field 'topk_method' is \"greedy\""),
    (lambda c: c.update(scoring_func="softmax"), "field 'scoring_func' is \"softmax\""),
    (lambda c: c.update(n_group=3), "field 'n_group' (3) must divide the 16 routed experts"),
    (lambda c: c.pop("kv_lora_rank"), "missing field 'kv_lora_rank'"),
])
def test_an_unsupported_or_bad_field_is_one_line_naming_it(v3_folder, tmp_path, change, needle):
    assert_generate_fails_in_one_line(copy_with(v3_folder, tmp_path / "m", config=change), needle)


@pytest.mark.parametrize("change, needle", [
    (lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"), "has no tensor model.layers.1.self_attn.kv_b_proj"),
    # A latent rank of 24 where config.json says 32.
    (lambda t: t.__setitem__("model.layers.1.self_attn.kv_b_proj.weight", torch.zeros(4 * 28, 24)),
     "tensor model.layers.1.self_attn.kv_b_proj.weight has shape [112, 24]"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.kv_a_layernorm.weight", torch.zeros(24)),
     "tensor model.layers.0.self_attn.kv_a_layernorm.weight has shape [24]"),
])
def test_a_missing_kv_b_proj_or_a_wrong_latent_rank_is_one_line_naming_the_tensor(v3_folder, tmp_path, change,
                                                                                     needle):
    assert_generate_fails_in_one_line(copy_with(v3_folder, tmp_path / "m", tensors=change), needle)


DEEPSEEK_V2_LITE = {  # its published config.json (the fields that set its size and math)
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "bfloat16", "bos_token_id": 100000,
    "eos_token_id": 100001,
}


def test_inspect_plans_deepseek_v2_lite_from_its_config_alone_with_the_latent_cache(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V2_LITE))
    info = inspect_json(tmp_path, "--vram", "12GiB", "--ram", "32GiB", "--device", "cuda",
                        "--context", "4096")
    assert abs(info["params_total"] / 15.7e9 - 1) < 0.02           # published: 15.7B parameters
    # Published: 2.4B activated, a count that leaves the input embedding's 102400 x 2048 out.
    assert abs((info["params_active_per_token"] - 102400 * 2048) / 2.4e9 - 1) < 0.03
    assert info["experts_total"] == 26 * 64 and info["expert_uses_per_token"] == 26 * 6
    assert info["bytes_per_expert"] == 3 * 2048 * 1408 * 2
    # Per position: 27 layers x (512 + 64) latent values, and the rotary tables' row (cos, sin [64]), bf16.
    assert info["bytes_kv_per_token"] == (27 * (512 + 64) + 2 * 64) * 2
    assert info["memory_plan"]["device_tier"]["kv_bytes"] == 4096 * info["bytes_kv_per_token"]


def test_a_prompt_prefilled_in_chunks_gives_the_logits_of_one_pass(v3_folder):
    """Chunks after the first attend to the cached latents of the earlier ones through a mask (and a one-token
    chunk through the absorbed decode path): what chunked prefill and a reused prefix run."""
    model = ours(v3_folder)
    tokens = torch.randint(3, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(2))
    whole = model.forward(tokens, 0)
    for cuts in ((0, 30, 50, PROMPT_LEN), (0, 1, 2, 40, PROMPT_LEN - 1, PROMPT_LEN)):
        for start, end in itertools.pairwise(cuts):
            last = model.forward(tokens[start:end], start)
        torch.testing.assert_close(last, whole, atol=1e-4, rtol=0)


def test_dense_bits_quantize_the_latent_attention_and_cpu_experts_run_it(tmp_path):
    """`convert --dense-bits 8` keeps q_proj, kv_a_proj_with_mqa and o_proj quantized on the device (kv_b_proj,
    which decode absorbs, stays dense); --cpu-experts all computes every expert from the host tier."""
    from conftest import greedy_logits

    import offload
    from quant import QuantizedTensor

    shape = dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                 first_k_dense_replace=1, v_head_dim=16)  # o_proj's rows: 4 heads x 16, one group of 64
    make(tmp_path / "f", "deepseek_v2", shape, seed=9, tokenizer=True)
    prompt = list(range(3, 3 + PROMPT_LEN))
    with offload.load(tmp_path / "f", device="cpu", dtype="float32", context=128) as rt:
        seq, want = greedy_logits(rt, prompt, 4)
    with offload.load(tmp_path / "f", device="cpu", dtype="float32", context=128, cpu_experts="all") as rt:
        assert greedy_logits(rt, prompt, 4)[0] == seq and rt.stats()["cpu_expert_calls"] > 0
    result = run_cli("convert", tmp_path / "f", tmp_path / "q", "--bits", "4", "--group-size", "16", "--dense-bits", "8")
    assert result.returncode == 0, result.stderr
    with offload.load(tmp_path / "q", device="cpu", dtype="float32", context=128) as rt:
        attn = rt.model.blocks[1].attn
        assert isinstance(attn.qkv.wq, QuantizedTensor) and isinstance(attn.wo, QuantizedTensor)
        assert isinstance(attn.wkv_b, torch.Tensor)
        _, got = greedy_logits(rt, prompt, 0)
    assert 0 < (got - want[:1]).abs().max().item() <= 0.1 * want.abs().max().item()
