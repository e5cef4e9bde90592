"""The memory plan (offload/store/memory.py): its arithmetic per attention kernel and context length, the
plan `inspect` makes for Mixtral-8x7B on a 24 GiB GPU, and, on the CPU, what a prefill and a loaded runtime
actually allocate against what the plan reserves for them."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

import offload
from conftest import make_checkpoint, run_cli
from offload.generate import prefill
from offload.models import expected_shapes, read_config
from offload.store import memory
from offload.store.memory import attention_backend, plan_memory, plan_workspace

GiB = 1 << 30

# Mixtral-8x7B-v0.1's config.json as published on the Hub.
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}


def mixtral(**overrides):
    return read_config({**MIXTRAL_8X7B, **overrides}, "config.json")


# ---- the arithmetic -----------------------------------------------------------------------------------------

def test_the_attention_kernel_planned_for_is_the_one_torch_picks_for_that_device_and_dtype():
    cfg = mixtral()
    assert attention_backend(cfg, torch.bfloat16, "cuda", 32768, (9, 0)) == "flash"
    assert attention_backend(cfg, torch.float16, "cuda", 32768, None) == "flash"       # planning: sm_80+ assumed
    assert attention_backend(cfg, torch.float16, "cuda", 32768, (7, 5)) == "math"      # T4: no flash before sm_80
    assert attention_backend(cfg, torch.float32, "cuda", 32768, (9, 0)) == "math"      # flash takes half types only
    assert attention_backend(cfg, torch.float32, "cpu", 32768) == "cpu"
    # Every query head with its own key head: torch's memory-efficient kernel takes float32 and masks.
    assert attention_backend(mixtral(num_key_value_heads=32), torch.float32, "cuda", 4096, (7, 5)) == "efficient"
    # A prompt longer than the sliding window needs a mask, which flash does not take.
    windowed = mixtral(sliding_window=4096)
    assert attention_backend(windowed, torch.bfloat16, "cuda", 4096, (9, 0)) == "flash"
    assert attention_backend(windowed, torch.bfloat16, "cuda", 8192, (9, 0)) == "math"


@pytest.mark.parametrize("context", [2048, 8192, 16384])
def test_flash_plans_no_scores_and_grows_linearly_with_the_context(context):
    """The fused kernels never build the [H, T, T] scores: the workspace is linear in the context, and holds
    the experts' [T, F] intermediates (all of a prompt's tokens routed to one expert, at worst)."""
    cfg = mixtral()
    ws, twice = (plan_workspace(cfg, n, torch.bfloat16, "cuda", (9, 0)) for n in (context, 2 * context))
    assert ws.backend == "flash" and ws.chunk_tokens == context and ws.own.pair == 0
    assert ws.prefill_chunk(context) == context
    assert ws.activations >= 3 * context * cfg.intermediate_size * 2
    assert twice.activations == 2 * ws.activations - cfg.vocab_size * 8  # linear (the last token's logits aside)
    assert twice.attention == 2 * ws.attention
    assert ws.library == memory.CUBLAS_WORKSPACE + memory.CUBLASLT_WORKSPACE + memory.ALLOCATOR_SLACK
    assert ws.dequant == 0


def test_mixtrals_full_context_on_flash_costs_gigabytes_not_the_scores_64_gib():
    cfg = mixtral()
    ws = plan_workspace(cfg, 32768, torch.bfloat16, "cuda", (9, 0))
    scores = cfg.num_attention_heads * 32768 * 32768 * 2  # what the old estimate reserved for them alone
    assert scores == 64 * GiB and ws.total < 6 * GiB


@pytest.mark.parametrize("dtype,capability", [(torch.float32, (9, 0)), (torch.float16, (7, 5))])
@pytest.mark.parametrize("context", [2048, 32768])
def test_the_math_kernel_is_bounded_by_chunked_prefill(dtype, capability, context):
    """The math kernel's float32 scores grow with tokens x keys: every prompt length is cut into chunks
    whose scores fit the quadratic budget, and the plan covers the largest chunk and the per-head keys."""
    cfg = mixtral()
    ws = plan_workspace(cfg, context, dtype, "cuda", capability)
    H, Hd, s = cfg.num_attention_heads, cfg.head_dim, dtype.itemsize
    assert ws.backend == "math" and ws.own.pair >= 13 * H  # scores, softmax and its mask check, per head
    expanded = context * H * Hd * (4 + (2 * s + 8 if s < 4 else 2 * s))  # keys and values per head, and float32
    assert ws.own.per_key == ws.masked.per_key == H * Hd * (4 + (2 * s + 8 if s < 4 else 2 * s))
    assert ws.attention >= expanded + memory.QUADRATIC_BYTES
    for P in sorted({1, 2, 100, 1000, 1597, 1598, 4000, context // 2, context}):
        if P > context:
            continue
        C = ws.prefill_chunk(P)
        assert 1 <= C <= P
        assert C == 1 or need(ws, C, P) <= ws.activations + ws.attention  # a chunk, masked, against P keys
        assert C == P or need(ws, C + 1, P) > ws.activations + ws.attention  # as large as fits
    assert ws.prefill_chunk(context) < context  # the longest prompt is cut
    assert ws.total < 6 * GiB


def test_quantized_prefill_counts_the_dequantized_blocks_and_dense_bits_weights():
    cfg = mixtral()
    plain = plan_workspace(cfg, 8192, torch.bfloat16, "cuda", (9, 0))
    assert plain.dequant == 0
    q4 = plan_workspace(cfg, 8192, torch.bfloat16, "cuda", (9, 0), quantized_experts=True)
    assert q4.dequant == (12 + 2) * (1 << 24)  # one 2^24-weight block: float32 codes, minus zero, times scale; bf16
    dense4 = plan_workspace(cfg, 8192, torch.bfloat16, "cuda", (9, 0), quantized_experts=True, dense_format=(4, 64))
    assert dense4.dequant == (12 + 2) * 4096 * 4096  # the largest attention projection, dequantized whole
    cpu = plan_workspace(cfg, 8192, torch.float32, "cpu", quantized_experts=True, threads=2)
    assert cpu.dequant == (12 + 4) * (1 << 21) and cpu.library == 0  # the CPU's smaller blocks; no CUDA libraries


def test_a_24_gib_gpu_plans_expert_slots_for_mixtral_at_its_full_context():
    cfg = mixtral()
    blob = cfg.expert_params * 2
    plan = plan_memory(cfg, 2, "cuda", 24 * GiB, 64 * GiB, 32768, blob)
    assert plan.workspace.backend == "flash"
    assert plan.margin_bytes == plan.workspace.total < 8 * GiB
    assert plan.device_slots >= 24  # 16 GiB left for experts after 3 GiB dense, 4 GiB KV cache, workspace
    assert plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + plan.expert_pool_bytes <= plan.vram_budget


def test_the_default_vram_keeps_a_headroom_for_what_cuda_loads_after_the_plan():
    cfg = mixtral()
    blob = cfg.expert_params * 2
    free = 40 * GiB
    plan = plan_memory(cfg, 2, "cuda", None, 64 * GiB, 4096, blob, free_device_bytes=free)
    assert plan.vram_budget == free - memory.DEFAULT_HEADROOM
    with pytest.raises(offload.UserError, match="less 1.00 GiB of headroom"):
        plan_memory(cfg, 2, "cuda", None, 64 * GiB, 4096, blob, free_device_bytes=plan.dense_bytes + plan.kv_bytes)


def need(ws, C: int, keys: int) -> int:
    """Activations of a C-token forward and its masked attention against `keys` keys, as the plan counts them."""
    fixed = ws.activations - ws.per_token * ws.chunk_tokens
    return ws.per_token * C + fixed + ws.masked.bytes(C, keys)


@pytest.mark.parametrize("start", [1000, 16000, 32000])
def test_a_prefill_after_a_reused_prefix_on_flash_is_chunked_into_the_plan(start):
    """After a reused prefix (a chat's history), a prompt runs at a later position with a mask, which flash
    does not take: torch runs the math kernel against every key. The chunks fit what the flash plan
    reserved, so a long history costs more passes, never more memory."""
    cfg = mixtral()
    ws = plan_workspace(cfg, 32768, torch.bfloat16, "cuda", (9, 0))
    assert ws.backend == "flash" and ws.masked.kernel == "math" and ws.masked.pair > 13 * cfg.num_attention_heads
    tokens = 32768 - start
    C = ws.prefill_chunk(tokens, start)
    assert 1 < C < tokens
    assert need(ws, C, start + tokens) <= ws.activations + ws.attention < need(ws, C + 1, start + tokens)
    assert ws.prefill_chunk(32768) == 32768  # the same prompt from position 0: one pass on flash


# ---- inspect of Mixtral-8x7B: its config, and shards that hold headers only ----------------------------------

def write_headers_only(folder, raw_config: dict) -> None:
    """A model folder with config.json and one safetensors file holding every tensor's header; the data
    is a hole (a sparse file), so a 93 GB checkpoint takes a few kB of disk. `inspect` reads headers only."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw_config))
    cfg = read_config(raw_config, "config.json")
    header, offset = {}, 0
    for name, shape in expected_shapes(cfg).items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + offset)


def test_inspect_plans_expert_slots_for_mixtral_8x7b_on_a_24_gib_gpu_at_32768(tmp_path, monkeypatch):
    folder = tmp_path / "Mixtral-8x7B-v0.1"
    write_headers_only(folder, MIXTRAL_8X7B)
    args = ["inspect", folder, "--device", "cuda", "--vram", "24GiB", "--ram", "64GiB", "--context", "32768"]
    result = run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)["memory_plan"]["device_tier"]
    assert d["expert_slots"] >= 24 and d["workspace"]["backend"] == "flash"
    assert d["workspace"]["chunk_tokens"] == 32768 and d["workspace"]["assumed_sm80"] is True
    monkeypatch.setenv("COLUMNS", "200")  # the table's rows on one line each
    table = run_cli(*args)
    assert table.returncode == 0, table.stderr
    assert "flash attention" in table.stdout and "sm_80+ assumed" in table.stdout


# ---- on the CPU: what a prefill allocates, against the plan ---------------------------------------------------

def peak_allocated(fn) -> int:
    """The most bytes allocated at once above what was allocated before, while fn() runs: every allocation
    and free the profiler records (the CPU allocator keeps no peak of its own)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def long_prompt(rt, tokens: int) -> torch.Tensor:
    ids = rt.encode("The quick brown fox jumps over the lazy dog. " * 200)
    assert len(ids) >= tokens
    return torch.tensor(ids[:tokens])


@pytest.fixture(scope="module")
def windowed_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("windowed")
    make_checkpoint(folder, layers=2, experts=4, sliding_window=96)
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_long_prefill_allocates_less_than_the_plan_reserves(tiny_checkpoint, dtype):
    """The whole context in one prefill (512 tokens), the largest the plan reserves for, through torch's CPU
    attention kernel; the measured peak stays within the workspace, and the workspace is not a wild
    overestimate of it either (the activations of the worst routing, every token to one expert, come on
    top of what this routing allocates)."""
    rt = offload.load(tiny_checkpoint, device="cpu", dtype=dtype, context=512)
    ws = rt.store.plan.workspace
    prompt = long_prompt(rt, 511)
    peak = peak_allocated(lambda: prefill(rt.model, prompt, ws.prefill_chunk(len(prompt))))
    assert ws.backend == "cpu" and 0 < peak <= ws.total
    assert ws.total < 4 * peak
    rt.close()


def test_a_prefill_of_a_quantized_folder_allocates_less_than_the_plan_reserves(tiny_checkpoint, tmp_path):
    from offload.convert import convert

    folder = convert(tiny_checkpoint, tmp_path / "q4", bits=4, group_size=32, dense_bits=8)
    rt = offload.load(folder, device="cpu", context=512)
    ws = rt.store.plan.workspace
    assert ws.dequant > 0
    prompt = long_prompt(rt, 511)
    peak = peak_allocated(lambda: prefill(rt.model, prompt, ws.prefill_chunk(len(prompt))))
    assert 0 < peak <= ws.total
    rt.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_math_kernels_chunked_prefill_allocates_less_than_its_plan(tiny_checkpoint, monkeypatch, dtype):
    """The math kernel (forced on the CPU, as a GPU without flash runs it) with a quadratic budget small
    enough that the prompt is cut into chunks: each chunk's scores stay within the plan, which is made for
    a GPU (its library workspaces left out here), and chunking gives the one-pass logits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rt = offload.load(tiny_checkpoint, device="cpu", dtype=str(dtype).removeprefix("torch."), context=512)
    cfg = rt.config
    budget = 1 << 20
    ws = plan_workspace(cfg, 512, dtype, "cuda", (7, 5), quadratic_bytes=budget)
    assert ws.backend == "math"
    prompt = long_prompt(rt, 480)
    chunk = ws.prefill_chunk(len(prompt))
    assert 1 < chunk < len(prompt)
    with sdpa_kernel([SDPBackend.MATH]):
        chunked = prefill(rt.model, prompt, chunk)
        peak = peak_allocated(lambda: prefill(rt.model, prompt, chunk))
        whole = prefill(rt.model, prompt)
    assert 0 < peak <= ws.total - ws.library
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(chunked, whole, atol=tolerance * whole.abs().max().item())
    rt.close()


def test_after_a_reused_prefix_the_masked_chunks_allocate_less_than_the_flash_plan(tiny_checkpoint):
    """A GPU plan for flash, and a prompt run after 300 cached positions: with a mask, which flash does not
    take, torch runs the math kernel (forced here on the CPU), in the plan's chunks; they stay within the
    workspace the flash plan reserved (its library workspaces aside, which the CPU has none of)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rt = offload.load(tiny_checkpoint, device="cpu", dtype="bfloat16", context=512)  # flash takes half types
    ws = plan_workspace(rt.config, 512, torch.bfloat16, "cuda", (9, 0))
    assert ws.backend == "flash" and ws.masked.kernel == "math"
    prompt = long_prompt(rt, 510)
    prefill(rt.model, prompt[:300])  # the reused prefix: its keys and values are in the cache
    rest = prompt[300:]
    chunk = ws.prefill_chunk(len(rest), 300)
    assert chunk < len(rest)
    with sdpa_kernel([SDPBackend.MATH]):
        peak = peak_allocated(lambda: prefill(rt.model, rest, chunk, start=300))
    assert 0 < peak <= ws.total - ws.library
    rt.close()


def test_a_prompt_beyond_the_sliding_window_is_prefilled_in_planned_chunks(windowed_checkpoint, monkeypatch):
    """A prompt longer than the window takes the masked path, whose [T, S] mask is quadratic: with a small
    quadratic budget the runtime's generation prefills in chunks, each within the plan, same tokens."""
    monkeypatch.setattr(memory, "QUADRATIC_BYTES", 1 << 17)
    rt = offload.load(windowed_checkpoint, device="cpu", context=512)
    ws = rt.store.plan.workspace
    prompt = long_prompt(rt, 400)
    chunk = ws.prefill_chunk(len(prompt))
    assert ws.own.pair > 0 and 1 < chunk < len(prompt)
    calls = []
    forward = rt.model.forward
    rt.model.forward = lambda ids, pos, *a: (calls.append((len(ids), pos)), forward(ids, pos, *a))[1]
    tokens = list(rt.generate_ids(prompt.tolist(), 4))
    assert calls[0] == (chunk, 0) and sum(n for n, _ in calls[:-3]) == len(prompt)
    rt.model.forward = forward
    peak = peak_allocated(lambda: prefill(rt.model, prompt, chunk))
    assert peak <= ws.total
    monkeypatch.setattr(memory, "QUADRATIC_BYTES", 1 << 40)
    with offload.load(windowed_checkpoint, device="cpu", context=512) as whole:
        assert whole.store.plan.workspace.prefill_chunk(len(prompt)) == len(prompt)
        assert list(whole.generate_ids(prompt.tolist(), 4)) == tokens
    rt.close()


# ---- on the CPU: what the device tier holds, measured, against the plan ---------------------------------------

def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("quantized", [False, True])
def test_what_the_device_tier_holds_is_what_the_plan_says(tiny_checkpoint, tmp_path, quantized):
    """Measured from the tensors themselves, not from the plan: the slot pool, the dense weights and the
    KV cache with its rotary tables each take exactly their planned bytes, and the store reports that
    measurement as its peak on a CPU."""
    folder = tiny_checkpoint
    if quantized:
        from offload.convert import convert

        folder = convert(tiny_checkpoint, tmp_path / "q4", bits=4, group_size=32, dense_bits=4)
    plan0 = offload.load(folder, device="cpu", context=256).store.plan
    vram = plan0.dense_bytes + plan0.kv_bytes + plan0.margin_bytes + 5 * plan0.blob_bytes
    with offload.load(folder, device="cpu", context=256, vram=vram) as rt:
        plan, store, m = rt.store.plan, rt.store, rt.model
        assert plan.device_slots == 5
        assert storage_bytes([store.dev]) == plan.expert_pool_bytes
        assert storage_bytes(m.dense_tensors()) == plan.dense_bytes
        assert storage_bytes([m.cache.k, m.cache.v, m.cos, m.sin]) == plan.kv_bytes
        list(rt.generate_ids(rt.encode("The quick brown fox"), 6))
        held = store.held_device_bytes()
        assert held == plan.dense_bytes + plan.kv_bytes + plan.expert_pool_bytes
        assert rt.stats()["peak_vram_bytes"] == held <= vram
