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
