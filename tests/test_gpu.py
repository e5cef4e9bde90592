"""GPU-only checks of the offload runtime: the invariant on CUDA, and no allocation on the copy path.

Skipped without CUDA (CI and development machines have none); run them on a GPU with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

import offload
from offload.generate import decode_one, prefill

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def greedy(folder, steps=12, cpu_experts="never", **options):
    # CPU experts off unless asked: "auto" decides from timings, and a miss run on the CPU computes differently.
    rt = offload.load(folder, device="cuda", dtype="float16", context=256, cpu_experts=cpu_experts, **options)
    ids = rt.encode("The quick brown fox jumps over the lazy dog")
    logits = [prefill(rt.model, torch.tensor(ids, device="cuda"))]
    for i in range(steps):
        logits.append(decode_one(rt.model, int(logits[-1].argmax()), len(ids) + i))
    torch.cuda.synchronize()
    return torch.stack(logits).cpu(), rt


def test_cuda_results_are_bit_identical_across_budgets_and_prefetch(tiny_checkpoint):
    reference, rt = greedy(tiny_checkpoint)
    plan = rt.store.plan
    fixed = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes
    for slots in (2, 5, 18):
        for prefetch in (0, 1, 2):
            logits, _ = greedy(tiny_checkpoint, vram=fixed + slots * plan.blob_bytes, prefetch=prefetch, cpu_experts="never")
            assert torch.equal(logits, reference), (slots, prefetch)


def test_no_device_memory_is_reserved_per_token(tiny_checkpoint):
    _, rt = greedy(tiny_checkpoint)
    plan = rt.store.plan
    logits, rt = greedy(tiny_checkpoint, vram=plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + 3 * plan.blob_bytes,
                        prefetch=1, cpu_experts="never")
    pos = rt.model.cache.length // 2
    decode_one(rt.model, 5, pos)  # warm-up: the caching allocator settles
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    for i in range(16):
        decode_one(rt.model, 5 + i, pos + 1 + i)
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    assert rt.store.stats()["expert_misses"] > 0
    # No new cudaMalloc segment and no reserved growth: every expert copy lands in a preallocated slot.
    assert after["segment.all.allocated"] == before["segment.all.allocated"]
    assert after["reserved_bytes.all.current"] == before["reserved_bytes.all.current"]


def test_the_copy_path_allocates_nothing(tiny_checkpoint):
    _, rt = greedy(tiny_checkpoint)
    store = rt.store
    for key in [(0, 0), (0, 1), (1, 2)]:
        store._host_slot(key)  # bring into RAM first: the disk read is not the hot path
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for key in [(0, 0), (0, 1), (1, 2)]:
        if key in store.dev_table:
            store.dev_table.remove(key)
        store._to_device(key, protected=set(), prefetch=False)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


def test_peak_vram_stays_within_the_budget(tiny_checkpoint):
    _, rt = greedy(tiny_checkpoint)
    plan = rt.store.plan
    vram = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + 4 * plan.blob_bytes
    del rt
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _, rt = greedy(tiny_checkpoint, vram=vram, prefetch=1)
    assert torch.cuda.max_memory_allocated() <= vram


def test_quantized_folder_decodes_through_the_fused_kernels(tiny_checkpoint, tmp_path, monkeypatch):
    """4-bit experts and 4-bit attention on CUDA: the invariant holds through the Triton kernels, and their
    logits agree with the torch dequantize-then-multiply path."""
    pytest.importorskip("triton")
    import quant
    from offload.convert import convert

    folder = convert(tiny_checkpoint, tmp_path / "q4", bits=4, group_size=32, dense_bits=4)
    assert quant.kernels.fused_kernels() is not None
    fused, rt = greedy(folder, cpu_experts="never")
    plan = rt.store.plan
    fixed = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes
    for slots, prefetch in ((2, 0), (5, 1), (18, 2)):
        logits, _ = greedy(folder, vram=fixed + slots * plan.blob_bytes, prefetch=prefetch, cpu_experts="never")
        assert torch.equal(logits, fused), (slots, prefetch)
    monkeypatch.setattr(quant.kernels, "fused_kernels", lambda: None)
    unfused, _ = greedy(folder, steps=3, cpu_experts="never")
    # Prefill too: an expert that gets one prompt token runs its fused kernel there (fusing is per call).
    similarity = torch.nn.functional.cosine_similarity(unfused.float(), fused[:4].float(), dim=-1)
    assert similarity.min() > 0.999


def test_the_host_tier_is_pinned_outside_torchs_rounding_allocator(tiny_checkpoint):
    if not hasattr(torch.cuda, "host_memory_stats"):
        pytest.skip("torch.cuda.host_memory_stats is newer than this torch")
    reference, rt = greedy(tiny_checkpoint)
    blob = rt.store.plan.blob_bytes
    torch.cuda.synchronize()
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    logits, rt = greedy(tiny_checkpoint, ram=5 * blob, prefetch=1)  # 5 host slots: streamed from disk
    host = rt.store.host
    assert host.is_pinned() and host.numel() == 5 * blob
    # torch's caching host allocator holds none of it (it would have rounded it up to a power of two) ...
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) - before < host.numel()
    # ... and copying from it gives what copying from an all-in-RAM tier gives.
    assert torch.equal(logits, reference)


# ---- issue 25: what only a GPU shows of the memory plan, host syncs, close() and split-K ----------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_attention_kernel_the_plan_assumes_is_the_one_torch_runs(tiny_checkpoint, dtype):
    """The plan reserves linear memory for flash and chunks the math kernel: flash must run exactly where
    the plan says so (a prefill's causal grouped-query attention, as offload/models/attention.py calls it)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from offload.models import open_checkpoint
    from offload.store.memory import attention_backend

    cfg = open_checkpoint(tiny_checkpoint).config
    H, K, Hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = torch.randn(1, H, 256, Hd, device="cuda", dtype=dtype)
    k = torch.randn(1, K, 256, Hd, device="cuda", dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        flash = True
    except RuntimeError:
        flash = False
    planned = attention_backend(cfg, dtype, "cuda", 256, torch.cuda.get_device_capability())
    assert (planned == "flash") == flash, (planned, flash)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_prefill_of_the_whole_context_allocates_less_than_the_planned_workspace(tiny_checkpoint, dtype):
    rt = offload.load(tiny_checkpoint, device="cuda", dtype=dtype, context=512, cpu_experts="never")
    ws = rt.store.plan.workspace
    ids = rt.encode("The quick brown fox jumps over the lazy dog. " * 60)[:511]
    prompt = torch.tensor(ids, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    prefill(rt.model, prompt, ws.prefill_chunk(len(ids)))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert 0 < peak <= ws.total, (ws.backend, peak, ws)
    rt.close()


def test_a_prompt_after_a_reused_prefix_allocates_less_than_the_planned_workspace(tiny_checkpoint):
    """After 300 cached positions the prompt passes a mask, which flash does not take: torch runs the math
    kernel against every key, in the plan's chunks, within the flash plan's workspace."""
    rt = offload.load(tiny_checkpoint, device="cuda", dtype="float16", context=512, cpu_experts="never")
    ws = rt.store.plan.workspace
    ids = rt.encode("The quick brown fox jumps over the lazy dog. " * 60)[:510]
    prefill(rt.model, torch.tensor(ids[:300], device="cuda"))
    rest = torch.tensor(ids[300:], device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    prefill(rt.model, rest, ws.prefill_chunk(len(rest), 300), start=300)
    torch.cuda.synchronize()
    assert 0 < torch.cuda.max_memory_allocated() - base <= ws.total
    rt.close()


def test_a_decode_step_synchronizes_once_per_layer_and_twice_per_token(tiny_checkpoint):
    """torch's sync debug mode warns at every operation that makes the host wait for the GPU. Per decode step:
    one per layer (the MoE block's one transfer), one for sampling, and the sampled token's copy back to the
    device (a blocking copy from pageable memory, on a stream that sampling has just drained)."""
    import warnings

    _, rt = greedy(tiny_checkpoint)
    plan = rt.store.plan
    vram = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + 3 * plan.blob_bytes  # misses every token
    rt = offload.load(tiny_checkpoint, device="cuda", dtype="float16", context=256, prefetch=1, cpu_experts="never",
                      vram=vram)
    steps = rt.generate_ids(rt.encode("The quick brown fox"), 9)
    next(steps)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens = list(steps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(tokens) == 8 and syncs and rt.store.stats()["expert_misses"] > 0
    assert len(syncs) <= (rt.config.num_hidden_layers + 2) * len(tokens)


def test_close_gives_the_device_memory_back_and_a_second_load_works(tiny_checkpoint):
    import gc

    _, rt = greedy(tiny_checkpoint)
    plan = rt.store.plan
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    rt.close()
    gc.collect()
    assert torch.cuda.memory_allocated() <= held - plan.expert_pool_bytes - plan.kv_bytes
    logits, again = greedy(tiny_checkpoint)
    reference, _ = greedy(tiny_checkpoint)
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 64), (2, 16), (8, 64)])
def test_split_k_gives_the_unsplit_result_on_cuda(bits, group):
    pytest.importorskip("triton")
    import quant
    from quant import triton_gemv as g

    q = quant.quantize(torch.randn(512, 4096, device="cuda") * 0.02, bits, group)
    x = torch.randn(4096, device="cuda")
    ref = quant.linear(x[None], q, fused=False)[0].float()
    one = g.dequant_gemv(q.q, q.scale, q.zero, x, bits, group, 1)
    split = g.dequant_gemv(q.q, q.scale, q.zero, x, bits, group)
    assert g.splits_for(512, 4096, bits, x.device) > 1
    for y in (one, split):
        assert torch.allclose(y, ref, atol=1e-4 * float(ref.abs().max()))
    again = g.dequant_gemv(q.q, q.scale, q.zero, x, bits, group)
    assert torch.equal(split, again)  # partial sums added in a fixed order: the same bits every call


@pytest.mark.parametrize("quantized", [False, True])
def test_cpu_experts_all_on_cuda_keeps_every_expert_in_ram_and_follows_the_gpu(tiny_checkpoint, tmp_path, quantized):
    """--cpu-experts all on a GPU: no expert slot on the device, every expert (prefill too) computed on the CPU
    from the host tier (the C kernels for a quantized folder), logits close to the all-GPU run's (the CPU
    rounds differently) and the same at every --ram."""
    folder = tiny_checkpoint
    if quantized:
        from offload.convert import convert

        folder = convert(tiny_checkpoint, tmp_path / "q4", bits=4, group_size=32)
    on_gpu, _ = greedy(folder)
    logits, rt = greedy(folder, cpu_experts="all")
    stats = rt.store.stats()
    assert rt.store.plan.device_slots == 0 and stats["expert_hits"] == 0 and stats["cpu_experts"] == "all"
    assert stats["cpu_expert_calls"] > 0 and stats["bytes_h2d"] == 0
    assert torch.allclose(logits, on_gpu, atol=5e-2, rtol=5e-2)
    streamed, _ = greedy(folder, cpu_experts="all", ram=3 * rt.store.plan.blob_bytes, prefetch=1)
    assert torch.equal(streamed, logits)


def test_sparse_experts_on_cuda_give_the_same_logits_at_every_budget_and_move_bases_and_chunks(tmp_path):
    """Sparse blobs (`convert --sparse`) on CUDA: a miss copies the base on a copy stream, the up projection
    runs on the slot, the missing chunks come through the staging buffers and are placed by a kernel on that
    stream. The logits are the same at every budget and prefetch depth, and every byte moved is a base or whole
    chunks, fewer than whole blobs."""
    from offload.convert import convert
    from offload.demo import DEMO_DIR
    from quant import sparse

    folder = convert(DEMO_DIR, tmp_path / "sparse", 4, 64, sparse=0.6, calibration_tokens=256)
    reference, rt = greedy(folder)
    plan, layout = rt.store.plan, rt.store.layout
    rt.close()
    fixed = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + getattr(plan, "staging_bytes", 0)
    base, chunk = sparse.base_nbytes(layout), layout.extra["chunk_nbytes"]
    for slots, prefetch in ((4, 0), (6, 1), (12, 2)):
        logits, rt = greedy(folder, vram=fixed + slots * plan.blob_bytes, prefetch=prefetch)
        stats = rt.store.stats()
        rt.close()
        assert torch.equal(logits, reference), (slots, prefetch)
        fills = stats["expert_misses"] + stats["prefetch_issued"]
        assert 0 < stats["bytes_h2d"] < fills * layout.nbytes
        assert (stats["bytes_h2d"] - fills * base) % chunk == 0
