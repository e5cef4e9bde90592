"""gpt-oss (offload/models/gpt_oss.py) against transformers' GptOssForCausalLM on random-weight checkpoints
(float32 compute, CPU): attention sinks, alternating sliding and full attention, YaRN, the biased top-k-then-
softmax router, fused biased experts with the clamped SwiGLU; and its MXFP4 experts read as the Hub ships
them (quant/mxfp4.py), checked against transformers' own dequantization."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_generate_fails_in_one_line, copy_with, inspect_json, run_cli
from oracle import assert_greedy_matches, assert_logits_match, ours, save_reference
from safetensors.torch import load_file, save_file

VOCAB = 320
PROMPT_LEN = 40
YARN = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 64, "rope_theta": 150000.0}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, rope_parameters=YARN)
SHAPES = {
    # A window of 8 under a 40-token prompt; a clamp low enough that gate and up values meet it.
    "window8-top2-of-8-clamped": dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=8, swiglu_limit=0.3),
    "top1-no-attention-bias-full-only": dict(num_local_experts=4, num_experts_per_tok=1, attention_bias=False,
                                             sliding_window=16, layer_types=["full_attention"] * 4),
    "top4-of-8-mha-window16": dict(num_local_experts=8, num_experts_per_tok=4, num_key_value_heads=4,
                                   sliding_window=16),
    "sharded-bf16": dict(num_local_experts=8, num_experts_per_tok=2, sliding_window=8, dtype=torch.bfloat16,
                         shard_size="60KB"),
}


def widened(config):
    """GptOssForCausalLM with weights that make each part matter: a wider router (random init routes near
    uniformly), sinks of a size that takes a real share of the softmax, experts large enough to reach the clamp."""
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.router.weight"):
                p.mul_(8)
            elif name.endswith("sinks"):
                p.copy_(torch.randn_like(p))
            elif name.endswith(("gate_up_proj", "down_proj")):
                p.mul_(4)
    return model


def make(folder, shape: dict, seed: int = 0, tokenizer: bool = False):
    from transformers import GptOssConfig

    shape = dict(shape)
    dtype, shard = shape.pop("dtype", torch.float32), shape.pop("shard_size", None)
    config = GptOssConfig(**{**COMMON, **shape})
    config._attn_implementation = "eager"  # gpt-oss's reference attention (sinks); SDPA is not offered
    return save_reference(folder, widened, config, dtype=dtype, shard_size=shard, seed=seed, tokenizer=tokenizer)


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers_after_prefill_and_16_decode_steps(tmp_path, name):
    ref = make(tmp_path, SHAPES[name], seed=list(SHAPES).index(name))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt_oss"
    if SHAPES[name].get("shard_size"):
        assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_logits_match(tmp_path, ref, VOCAB, prompt_len=PROMPT_LEN)


def test_32_greedy_tokens_equal_transformers_through_the_api_and_generate_json(tmp_path):
    ref = make(tmp_path, SHAPES["window8-top2-of-8-clamped"], seed=11, tokenizer=True)
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    assert_greedy_matches(tmp_path, ref, prompt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    make(folder, SHAPES["window8-top2-of-8-clamped"], seed=3, tokenizer=True)
    return folder


def test_the_parts_are_what_the_config_says(folder):
    """Sinks in every layer, windows on the sliding layers only, the biased router's choice equals its forward's."""
    from offload.models.gpt_oss import SinkAttention

    model = ours(folder)
    assert [b.attn.window for b in model.blocks] == [8, None, 8, None]
    assert all(isinstance(b.attn, SinkAttention) for b in model.blocks)
    h = torch.randn(32, model.cfg.hidden_size)
    for router in model.routers().values():
        weights, ids = router(h)
        assert torch.equal(router.choose(h), ids)
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(32))


@pytest.mark.parametrize("change, needle", [
    (lambda c: c.update(quantization_config={"quant_method": "bitsandbytes"}),
     "field 'quantization_config.quant_method' is \"bitsandbytes\""),
    (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
     "rope scaling \"dynamic\" is not supported"),
    (lambda c: c.update(swiglu_limit=-1), "field 'swiglu_limit' must be a positive number"),
    (lambda c: c.update(layer_types=["sliding_attention", "chunked_attention"] * 2), "field 'layer_types'"),
    (lambda c: c.pop("num_local_experts"), "missing field 'num_local_experts'"),
])
def test_an_unsupported_or_bad_field_is_one_line_naming_it(folder, tmp_path, change, needle):
    assert_generate_fails_in_one_line(copy_with(folder, tmp_path / "m", config=change), needle)


def test_a_missing_sink_or_a_misshapen_fused_expert_is_one_line_naming_the_tensor(folder, tmp_path):
    no_sink = copy_with(folder, tmp_path / "no-sink", tensors=lambda t: t.pop("model.layers.2.self_attn.sinks"))
    assert_generate_fails_in_one_line(no_sink, "has no tensor model.layers.2.self_attn.sinks")
    name = "model.layers.1.mlp.experts.down_proj"
    cut = copy_with(folder, tmp_path / "cut", tensors=lambda t: t.__setitem__(name, t[name][:4].contiguous()))
    assert_generate_fails_in_one_line(cut, f"tensor {name} has shape [4, 32, 64]")


# ---- MXFP4 experts as the Hub ships them ------------------------------------------------------------------

def write_mxfp4(folder, dst, ref, seed: int = 0):
    """`folder`'s checkpoint with each layer's expert weights replaced by random MXFP4 blocks and scales in the
    Hub's layout (gate_up_proj_blocks [E, 2F, D/32, 16], ...), config.json saying so; `ref` gets the weights
    transformers' own convert_moe_packed_tensors makes of them. Returns {tensor name: (blocks, scales)}."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    shutil.copytree(folder, dst)
    tensors = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    packed = {}
    for i, layer in enumerate(ref.model.layers):
        experts = layer.mlp.experts
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            E, cols, rows = tensors.pop(name).shape  # stored [E, in, out]; MXFP4 rows are outputs
            blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
            blocks[..., 0] = (blocks[..., 0] & 0xF0) | 0x7  # a +6 in every block: it sets the block's scale
            scales = torch.randint(121, 125, (E, rows, cols // 32), dtype=torch.uint8, generator=g)
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            packed[name] = blocks, scales
            with torch.no_grad():
                getattr(experts, proj).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(tensors, dst / "model.safetensors")
    raw = json.loads((dst / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(raw))
    return packed


@pytest.fixture(scope="module")
def mxfp4_folder(tmp_path_factory):
    """(MXFP4 folder, the reference on its dequantized weights, the blocks and scales written)."""
    base = tmp_path_factory.mktemp("gpt_oss_float")
    ref = make(base / "f", SHAPES["window8-top2-of-8-clamped"], seed=5, tokenizer=True)
    packed = write_mxfp4(base / "f", base / "mx", ref)
    return base / "mx", ref, packed


def test_mxfp4_experts_dequantize_bit_for_bit_as_transformers(mxfp4_folder):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from offload.models import open_checkpoint
    from offload.store.sources import FusedExperts
    from quant import mxfp4

    folder, _, packed = mxfp4_folder
    ckpt = open_checkpoint(folder)
    source = FusedExperts(ckpt, torch.float32)
    assert source.layout.kind == "mxfp4" and source.layout.extra["ffn"] == "gpt_oss"
    blob = torch.zeros(source.layout.nbytes, dtype=torch.uint8)
    for layer, e in ((0, 0), (1, 5), (3, 7)):
        source.read_into((layer, e), blob)
        views = source.layout.views(blob)
        for proj, rec in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
            blocks, scales = packed[f"model.layers.{layer}.mlp.experts.{proj}"]
            want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)[e]       # [in, out]
            assert torch.equal(mxfp4.weight(views, rec, torch.float32).T, want)
            assert torch.equal(views[f"{rec}.blocks"], blocks[e]) and torch.equal(views[f"{rec}.scales"], scales[e])
    ckpt.close()


def test_mxfp4_greedy_equals_transformers_on_the_dequantized_weights(mxfp4_folder):
    folder, ref, _ = mxfp4_folder
    assert_greedy_matches(folder, ref, " ".join(["The quick brown fox jumps over the lazy dog."] * 4))


def test_mxfp4_blobs_tiers_and_copies_carry_4_25_bits_per_weight(mxfp4_folder):
    """Disk, pinned RAM, device slots and bytes_h2d all hold the MXFP4 bytes: never a widened copy; and budgets
    never change the tokens."""
    from conftest import greedy_logits

    import offload

    folder, ref, _ = mxfp4_folder
    D, F_ = ref.config.hidden_size, ref.config.intermediate_size
    with offload.load(folder, device="cpu", dtype="float32", context=64) as rt:
        layout, plan = rt.store.layout, rt.store.plan
        weights = sum(r.nbytes for r in layout.records if not r.name.endswith(".bias"))
        assert weights * 8 == 4.25 * 3 * D * F_                     # 4 bits a weight + an 8-bit scale per 32
        biases = sum(r.nbytes for r in layout.records if r.name.endswith(".bias"))
        assert layout.nbytes - layout.header_nbytes <= weights + biases + 256 * len(layout.records)
        assert rt.store.host.dtype == torch.uint8 and rt.store.host.shape[1] == layout.nbytes
        seq, logits = greedy_logits(rt, list(range(3, 40)), 8)
    vram = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + 3 * plan.blob_bytes
    with offload.load(folder, device="cpu", dtype="float32", context=64, vram=vram) as rt:
        got_seq, got = greedy_logits(rt, list(range(3, 40)), 8)
        stats = rt.stats()
    assert got_seq == seq and torch.equal(got, logits)
    assert stats["device_slots"] == 3 and stats["expert_misses"] > 0
    assert stats["bytes_h2d"] == stats["expert_misses"] * layout.nbytes


@pytest.mark.parametrize("change, needle", [
    (lambda t: t.pop("model.layers.2.mlp.experts.down_proj_scales"), "has no tensor model.layers.2.mlp.experts.down_proj_scales"),
    (lambda t: t.__setitem__("model.layers.0.mlp.experts.gate_up_proj_scales",
                             t["model.layers.0.mlp.experts.gate_up_proj_scales"][:, :, :1].contiguous()),
     "tensor model.layers.0.mlp.experts.gate_up_proj_scales has shape [8, 64, 1]"),
])
def test_mxfp4_a_missing_or_disagreeing_scales_tensor_is_one_line(mxfp4_folder, tmp_path, change, needle):
    folder, _, _ = mxfp4_folder
    assert_generate_fails_in_one_line(copy_with(folder, tmp_path / "m", tensors=change), needle)


def test_mxfp4_quantize_rounds_as_the_reference_and_round_trips_its_own_values():
    """A weight made of MXFP4 values (each block's largest magnitude 6 x its scale, so the rounded-up scale is
    that scale) quantizes back to the same blocks and scales; halfway values round away from zero."""
    from quant import mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (16, 4, 16), dtype=torch.uint8, generator=g)
    blocks[:, :, 0] = (blocks[:, :, 0] & 0xF0) | 0x7  # a +6 in every block
    scales = torch.randint(110, 135, (16, 4), dtype=torch.uint8, generator=g)
    w = mxfp4.dequantize(blocks, scales)
    got_blocks, got_scales = mxfp4.quantize(w)
    assert torch.equal(got_scales, scales) and torch.equal(got_blocks, blocks)
    # One block of scale 1 (largest 6): 0.25 -> 0.5, 1.25 -> 1.5, 2.5 -> 3, 5 -> 6, -0.75 -> -1 (ties away from 0).
    row = torch.zeros(1, 32)
    row[0, :6] = torch.tensor([6.0, 0.25, 1.25, 2.5, 5.0, -0.75])
    assert mxfp4.dequantize(*mxfp4.quantize(row))[0, :6].tolist() == [6.0, 0.5, 1.5, 3.0, 6.0, -1.0]


def test_convert_mxfp4_from_the_float_model_gives_back_the_shipped_blocks_and_scales(mxfp4_folder, tmp_path):
    """The float checkpoint of the dequantized MXFP4 weights, converted with --bits mxfp4, holds the very blocks
    and scales the Hub layout had (the reference rounding inverts dequantization), and generates alike; an MXFP4
    folder, or a group-wise --bits for gpt-oss, is a one-line refusal."""
    from conftest import greedy_logits

    import offload

    folder, ref, packed = mxfp4_folder
    float_folder = tmp_path / "f"
    ref.save_pretrained(float_folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            shutil.copy(folder / name, float_folder / name)
    result = run_cli("convert", float_folder, tmp_path / "q", "--bits", "mxfp4")
    assert result.returncode == 0, result.stderr
    with offload.load(tmp_path / "q", device="cpu", dtype="float32", context=64) as rt:
        store = rt.store
        assert store.layout.kind == "mxfp4" and store.layout.extra["ffn"] == "gpt_oss"
        blob = torch.zeros(store.layout.nbytes, dtype=torch.uint8)
        for layer, e in ((0, 1), (2, 6)):
            store.source.read_into((layer, e), blob)
            views = store.layout.views(blob)
            for proj, rec in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
                blocks, scales = packed[f"model.layers.{layer}.mlp.experts.{proj}"]
                assert torch.equal(views[f"{rec}.blocks"], blocks[e]) and torch.equal(views[f"{rec}.scales"], scales[e])
        seq, got = greedy_logits(rt, list(range(3, 40)), 4)
    with offload.load(folder, device="cpu", dtype="float32", context=64) as rt:
        want_seq, want = greedy_logits(rt, list(range(3, 40)), 4)
    # The experts are the shipped bytes; convert keeps the dense part in fp16, hence not equal, but close.
    assert seq == want_seq and (got - want).abs().max().item() <= 0.01 * want.abs().max().item()
    one_line_convert = run_cli("convert", folder, tmp_path / "again", "--bits", "mxfp4")
    assert one_line_convert.returncode == 2 and "already ship in MXFP4" in one_line_convert.stderr
    four = run_cli("convert", float_folder, tmp_path / "q4", "--bits", "4")
    assert four.returncode == 2 and "convert to --bits mxfp4 only" in four.stderr


def test_convert_mxfp4_from_any_family_follows_the_float_model(tmp_path):
    """A SwiGLU family's experts (Mixtral's w1, w2, w3) in MXFP4: 4.25 bits a weight, close to the float model."""
    from conftest import greedy_logits, make_checkpoint

    import offload

    make_checkpoint(tmp_path / "f", layers=2, experts=4)
    result = run_cli("convert", tmp_path / "f", tmp_path / "q", "--bits", "mxfp4")
    assert result.returncode == 0, result.stderr
    with offload.load(tmp_path / "f", device="cpu", dtype="float32", context=64) as rt:
        _, want = greedy_logits(rt, [1, 17, 42, 99], 0)
    with offload.load(tmp_path / "q", device="cpu", dtype="float32", context=64) as rt:
        layout = rt.store.layout
        assert layout.kind == "mxfp4" and layout.extra["ffn"] == "swiglu"
        assert sum(r.nbytes for r in layout.records) * 8 == 4.25 * rt.config.expert_params
        _, got = greedy_logits(rt, [1, 17, 42, 99], 0)
    assert 0 < (got - want).abs().max().item() <= 0.1 * want.abs().max().item()
    info = json.loads(run_cli("inspect", tmp_path / "q", "--json").stdout)
    assert info["quantized"].startswith("experts MXFP4")


GPT_OSS_20B = {  # its published config.json
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}


def test_inspect_plans_gpt_oss_20b_from_its_config_alone_in_8_gib_with_mxfp4_experts_streamed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT_OSS_20B))
    info = inspect_json(tmp_path, "--vram", "8GiB", "--ram", "16GiB", "--device", "cuda",
                        "--context", "4096")
    assert abs(info["params_total"] / 20.9e9 - 1) < 0.02              # published: 20.9B parameters
    assert info["experts_total"] == 24 * 32 and info["expert_uses_per_token"] == 24 * 4
    weights = 3 * 2880 * 2880
    # An expert as shipped: 4.25 bits a weight, its biases (bfloat16) and the blob's header and alignment.
    assert weights * 4.25 / 8 < info["bytes_per_expert"] < weights * 4.25 / 8 + 64 * 1024
    assert "MXFP4" in info["quantized"]
    plan = info["memory_plan"]
    assert plan["blob_bytes"] == info["bytes_per_expert"]
    tier = plan["device_tier"]
    assert 0 < tier["expert_slots"] < 24 * 32 and tier["used_bytes"] <= 8 * 2**30   # runs in 8 GiB, experts streamed
    assert not plan["all_experts_on_device"] and plan["host_tier"]["expert_slots"] == 24 * 32  # all fit in 16 GiB


MXFP4_INTERPRETER_CHECK = """
import torch
from quant import mxfp4
from quant.expert import _row_block
torch.manual_seed(0)
for D, F_ in ((64, 96), (96, 64)):
    for act in (None, {"swiglu_limit": 0.5, "swiglu_alpha": 1.702}):
        layout = mxfp4.expert_layout(D, F_, act)
        if act:
            w = {"gate_up": torch.randn(2 * F_, D) * .1, "gate_up.bias": torch.randn(2 * F_) * .1,
                 "down": torch.randn(D, F_) * .1, "down.bias": torch.randn(D) * .1}
        else:
            w = {"w1": torch.randn(F_, D) * .1, "w2": torch.randn(D, F_) * .1, "w3": torch.randn(F_, D) * .1}
        views = layout.views(mxfp4.pack_expert(w, layout))
        x = torch.randn(1, D)
        fused, ref = (mxfp4.expert_forward(layout, views, x, _row_block, fused=f) for f in (True, False))
        assert torch.allclose(fused, ref, atol=1e-5), (D, F_, act, (fused - ref).abs().max())
print("ok")
"""


def test_mxfp4_fused_gemv_matches_the_dequantized_matmul_in_the_interpreter():
    """quant/triton_gemv.py's MXFP4 kernel (both expert kinds), run by Triton's CPU interpreter."""
    from conftest import run_in_triton_interpreter

    pytest.importorskip("triton")
    run_in_triton_interpreter(MXFP4_INTERPRETER_CHECK)


def test_mxfp4_kernel_compiles_to_cubin_for_ampere_and_hopper():
    """No GPU needed: Triton carries its own ptxas."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from quant import triton_gemv as g

    for arch in (80, 90):
        for x, bias, has_bias in (("*fp16", "*fp32", False), ("*bf16", "*bf16", True), ("*fp32", "*fp32", True)):
            signature = {"b_ptr": "*u8", "s_ptr": "*u8", "x_ptr": x, "bias_ptr": bias, "y_ptr": "*fp32", "N": "i32",
                         "K": "i32", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
            constexprs = {"HAS_BIAS": has_bias, "BLOCK_N": g.BLOCK_N, "BLOCK_K": g.MX_BLOCK_K}
            source = ASTSource(fn=g._mxfp4_gemv_kernel, signature=signature, constexprs=constexprs)
            compiled = compile(source, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": g.FP_FUSION})
            assert compiled.asm.get("cubin"), (arch, x, has_bias)
