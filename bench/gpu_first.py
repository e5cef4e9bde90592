"""The first GPU call's measurements, one stage at a time, each saved to one JSON record as soon as it is done.

What it measures, and against what (each figure a ratio against a bound or a peer measured in the same run):
  env      the device, its compute capability, SMs and memory; torch, Triton and CUDA versions; the attention
           kernel torch picks for a Mixtral prefill in bf16 (torch's own answer) against the one the memory
           plan planned for (offload/store/memory.py)
  slice    a 2-layer Mixtral-shaped slice (real dimensions, random bf16 weights) and its 4-bit conversion
           (experts quantized on the GPU: the CPU would take minutes)
  profile  `moe-offload profile` of each, copies on, prefetch 1: the trace (copies beside compute), decode
           time per token against its transfer bound (bytes moved / measured bandwidth), the share of
           copying hidden under compute, peak VRAM against --vram
  h2d      pinned host -> device bandwidth of a 256 MiB copy from memory pinned as the host tier pins it; the
           device memory CUDA's libraries took outside torch's allocator after a load (what the default
           --vram's headroom is for)
  compare  (a) moe-offload (prefetch 1, misses copied) against (b) transformers + accelerate under the same
           --vram and --ram on the bf16 slice: decode tokens/s of each, a/b (bench/compare.py's contenders,
           without its settings sweep)
  gemv     the fused Triton dequantize + GEMV kernels on one Mixtral expert at 8/4/3/2 bits: bytes of the
           blob per second against the device's memory bandwidth (its theoretical peak, and a device-to-device
           copy measured here); split-K on and off for w2; a small sweep of block shapes at 4 bits

    python bench/gpu_first.py --stage env --out bench/results/gpu-session/first-gpu.json
    python bench/gpu_first.py --dry-run        # the stages and what each runs; nothing is measured
    python bench/gpu_first.py --device cpu --model FOLDER --stage slice --stage profile --stage compare

Without a CUDA device it says so and exits 0, after checking that everything the stages call resolves with
the arguments they pass. `--device cpu --model FOLDER` runs the stages that can on a CPU over a small model
folder instead of the slice (its 4-bit conversion included): how CI runs this program's logic. The record
holds the device, torch and Triton versions; bench/gpu_session.sh runs the stages in order under one
deadline. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, bench_offload, compare

from common import PROMPT, save_record  # noqa: E402

STAGES = {  # name: (what it answers, the seconds it should take on an H100, the machine warm)
    "env": ("device, versions, the attention kernel torch picks against the plan's", 10),
    "slice": ("a 2-layer Mixtral-shaped slice in bf16 and its 4-bit conversion (quantized on the GPU)", 60),
    "profile": ("profile of the bf16 and 4-bit slices: trace, decode time vs transfer bound", 45),
    "h2d": ("pinned H2D bandwidth; device memory outside torch's allocator after a load", 15),
    "compare": ("(a) moe-offload vs (b) transformers + accelerate on the bf16 slice, same budgets", 60),
    "gemv": ("Triton dequantize + GEMV: GB/s of a Mixtral expert against the memory bandwidth", 40),
}
SLOTS = 6            # device slots of the slice's plan: misses every token, copies to hide
CONTEXT = 512
TOKENS = 24


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def load_record(out: Path, device: str) -> dict:
    """The record so far (each stage adds its part), or a new one naming the device and the versions."""
    if out.is_file():
        return json.loads(out.read_text())
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"benchmark": "first-gpu", "device": name, **versions(), "stages": {}}


def slice_folders(args) -> tuple[Path, Path]:
    """The float folder (the slice, or --model) and its 4-bit conversion."""
    if args.model:
        return args.model, args.work / f"{args.model.name}-q4"
    return args.work / "mixtral-slice", args.work / "mixtral-slice-q4"


def vram_for(folder: Path, slots: int, device: str = "cuda") -> int:
    """A --vram with room for `slots` experts after the dense part, KV cache and workspace (the store's plan)."""
    from offload.inspect import memory_plan

    plan = memory_plan(folder, device=device, context=CONTEXT, vram=10**15, ram=64 << 30)["plan"]
    return plan["dense_bytes"] + plan["kv_bytes"] + plan["margin_bytes"] + slots * plan["blob_bytes"]


def timed_cuda(fn, reps: int = 30) -> float:
    """Median seconds of fn() on the GPU, from CUDA events around each call, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# ---- stages -------------------------------------------------------------------------------------------------

def stage_env(args) -> dict:
    import torch.nn.functional as F

    if args.device != "cuda":
        return {"skipped": "the device and its attention kernels: a GPU only"}

    from offload.models import read_config
    from offload.store.memory import attention_backend

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    cap = torch.cuda.get_device_capability(dev)
    free, total = torch.cuda.mem_get_info(dev)
    out = {"device": torch.cuda.get_device_name(dev), "capability": list(cap), "sms": props.multi_processor_count,
           "memory_total_bytes": total, "memory_free_bytes": free, **versions()}
    # Which kernel torch runs for a Mixtral prefill (32 query heads over 8 key heads, head dim 128), causal:
    # the fused kernels are tried first; a backend that refuses raises under sdpa_kernel.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = read_config({"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                       "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8,
                       "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                       "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6}, "mixtral")
    picks = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q = torch.randn(1, 32, 1024, 128, device=dev, dtype=dtype)
        k = torch.randn(1, 8, 1024, 128, device=dev, dtype=dtype)
        runs = []
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("math", SDPBackend.MATH)):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
                runs.append(name)
            except RuntimeError:
                pass
        # torch's order of preference among those that run (cuDNN aside): flash, efficient, math.
        picks[str(dtype).removeprefix("torch.")] = {
            "torch_runs": runs, "torch_picks": runs[0] if runs else None,
            "plan": attention_backend(cfg, dtype, "cuda", 1024, cap)}
    out["attention_kernel"] = picks
    out["attention_plan_agrees"] = all(p["torch_picks"] == p["plan"] for p in picks.values())
    return out


def stage_slice(args) -> dict:
    import quant
    from bench_offload import write_mixtral_slice
    from offload.convert import convert

    bf16, q4 = slice_folders(args)
    t0 = time.perf_counter()
    if not (bf16 / "config.json").is_file():
        write_mixtral_slice(bf16, args.layers)
    t1 = time.perf_counter()
    # Quantize on the GPU: the same code (quant.quantize is device-agnostic), tens of times faster than the
    # CPU for 176M-parameter experts.
    real = quant.expert.quantize

    def on_gpu(w, bits, group_size):
        q = real(w.cuda(), bits, group_size)
        return type(q)(q.q.cpu(), q.scale.cpu(), q.zero.cpu(), q.shape, q.bits, q.group_size)

    quant.expert.quantize = on_gpu if args.device == "cuda" else real
    try:
        convert(bf16, q4, bits=4, group_size=64 if not args.model else 32, workers=2)
    finally:
        quant.expert.quantize = real
    return {"folder": str(bf16), "write_s": round(t1 - t0, 1), "convert_4bit_s": round(time.perf_counter() - t1, 1),
            "bf16_bytes": sum(p.stat().st_size for p in bf16.glob("*.safetensors")),
            "q4_experts_bytes": (q4 / "experts.bin").stat().st_size}


def stage_profile(args) -> dict:
    from offload.generate import Sampling
    from offload.profile import profile

    out = {}
    for name, folder in zip(("bf16", "q4"), slice_folders(args)):
        vram = vram_for(folder, SLOTS, args.device)
        result = profile(str(folder), PROMPT, args.results / f"profile-{name}", TOKENS, Sampling(), device=args.device,
                         context=CONTEXT, vram=vram, ram="32GiB", prefetch=1, cpu_experts="never")
        t = result.record["totals"]
        out[name] = {"vram": vram, "slots": SLOTS, "verdict": result.record["verdict"],
                     **{k: t[k] for k in ("tokens_per_s", "hit_rate", "h2d_bandwidth_bytes_per_s",
                                          "transfer_bound_s_per_token", "time_per_token_vs_transfer_bound",
                                          "decode_copy_hidden_fraction", "peak_vram_allocated_bytes",
                                          "peak_vram_reserved_bytes", "time_to_first_token_s")},
                     "peak_vram_vs_budget": round(t["peak_vram_allocated_bytes"] / vram, 4)}
        print(name, json.dumps(out[name]), flush=True)
    return out


def stage_h2d(args) -> dict:
    import offload
    from bench_offload import h2d_bandwidth

    if args.device != "cuda":
        return {"skipped": "pinned host -> device copies need a GPU"}
    rate = h2d_bandwidth()
    out = {"pinned_h2d_bytes_per_s": rate, "bytes": 256 << 20}
    # Memory outside torch's allocator once a runtime is loaded and warm (CUDA context, cuBLAS handles and
    # kernels, Triton's modules): what the default --vram keeps as headroom (memory.DEFAULT_HEADROOM).
    from offload.store.memory import DEFAULT_HEADROOM

    bf16, _ = slice_folders(args)
    with offload.load(str(bf16), device="cuda", context=CONTEXT, vram=vram_for(bf16, SLOTS), ram="32GiB",
                      cpu_experts="never") as rt:
        list(rt.generate_ids(rt.encode(PROMPT), 4))
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        outside = total - free - torch.cuda.memory_reserved()
    out.update({"outside_allocator_bytes": outside, "default_headroom_bytes": DEFAULT_HEADROOM,
                "headroom_covers_it": outside <= DEFAULT_HEADROOM})
    return out


def stage_compare(args) -> dict:
    from compare import hf_run, ours

    bf16, _ = slice_folders(args)
    vram, ram = vram_for(bf16, SLOTS, args.device), 32 << 30
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    a = ours(bf16, args.device, 16, 2, CONTEXT, prefetch=1, cpu_experts="never", vram=vram, ram=ram,
             dtype=str(dtype).removeprefix("torch."))
    b = hf_run(bf16, args.device, vram, ram, 16, 2, dtype)
    speed = {k: r.get("tokens_per_s") for k, r in (("a", a), ("b", b))}
    return {"vram": vram, "ram": ram, "a_moe_offload": a, "b_accelerate": b,
            "a_vs_b": round(speed["a"] / speed["b"], 3) if speed["a"] and speed["b"] else None}


def memory_bandwidth() -> dict:
    """The device's memory bandwidth: its theoretical peak where torch reports the clock and bus width, and a
    1 GiB device-to-device copy measured here (it reads and writes each byte: 2 x bytes / time)."""
    props = torch.cuda.get_device_properties(0)
    clock, width = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / timed_cuda(lambda: dst.copy_(src), reps=10)
    del src, dst
    return {"peak_bytes_per_s": 2 * clock * 1e3 * width / 8 if clock and width else None, "copy_bytes_per_s": copy}


def stage_gemv(args) -> dict:
    import quant
    from quant import triton_gemv as g

    if args.device != "cuda":
        return {"skipped": "the fused kernels run on a GPU (tests/test_triton_gemv.py runs them interpreted)"}
    D, F = 4096, 14336
    bw = memory_bandwidth()
    roof = bw["peak_bytes_per_s"] or bw["copy_bytes_per_s"]
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def random_blob(bits: int, group: int):
        """A blob of random codes with plausible scales and zeros: the kernels' speed does not depend on the
        values, and quantizing real weights here would take longer than the timing."""
        layout = quant.expert_layout(D, F, bits, group)
        blob = torch.randint(0, 256, (layout.nbytes,), dtype=torch.uint8, device="cuda", generator=gen)
        blob[: layout.header_nbytes] = torch.frombuffer(bytearray(layout.header()), dtype=torch.uint8).cuda()
        views = layout.views(blob)
        for name in ("w1", "w2", "w3"):
            views[f"{name}.scale"].fill_(0.01)
            views[f"{name}.zero"].fill_((1 << bits) / 2)
        return layout, views

    out = {"memory": bw, "shape": {"hidden": D, "ffn": F}, "widths": {}}
    dense = torch.randn(F, D, device="cuda", dtype=torch.bfloat16)
    fp16 = timed_cuda(lambda: torch.nn.functional.linear(x, dense)) * 3  # three matrices of an expert
    out["bf16_expert_gemv_bytes_per_s"] = 3 * dense.numel() * 2 / fp16
    del dense
    for bits, group in ((4, 64), (8, 64), (3, 64), (2, 16)):
        layout, views = random_blob(bits, group)
        t = timed_cuda(lambda: quant.expert_forward(layout, views, x, fused=True))
        row = {"blob_bytes": layout.nbytes, "seconds": t, "bytes_per_s": layout.nbytes / t,
               "vs_memory_bandwidth": round(layout.nbytes / t / roof, 3)}
        w2 = [views[f"w2.{p}"] for p in ("q", "scale", "zero")]
        h = torch.randn(F, device="cuda")
        w2_bytes = sum(v.numel() * v.element_size() for v in w2)
        for splits in (1, None):
            s = timed_cuda(lambda: g.dequant_gemv(*w2, h, bits, group, splits))
            row[f"w2_{'split_k' if splits is None else 'no_split'}_bytes_per_s"] = w2_bytes / s
        row["w2_splits"] = g.splits_for(D, F, bits, h.device)
        out["widths"][f"{bits}-bit g{group}"] = row
        print(f"{bits}-bit: {row['bytes_per_s'] / 1e9:.0f} GB/s ({row['vs_memory_bandwidth']:.0%} of the memory "
              f"bandwidth)", flush=True)
        args.save_partial(out)
    # Block shapes at 4 bits: rows per program x codes per step (each pair compiles once).
    layout, views = random_blob(4, 64)
    default, sweep = (g.BLOCK_N, g.BLOCK_K), {}
    try:
        for block_n, block_k in ((16, 128), (32, 256), (64, 256), (32, 512), (64, 128), (128, 256)):
            g.BLOCK_N, g.BLOCK_K = block_n, block_k
            t = timed_cuda(lambda: quant.expert_forward(layout, views, x, fused=True))
            sweep[f"{block_n}x{block_k}"] = round(layout.nbytes / t / roof, 3)
    finally:
        g.BLOCK_N, g.BLOCK_K = default
    out["block_sweep_4bit_vs_memory_bandwidth"] = sweep
    out["default_block"] = f"{default[0]}x{default[1]}"
    return out


def preflight() -> None:
    """What the stages call, resolved and bound to the arguments they pass, and the profile fields they read,
    checked without running anything: a rename elsewhere in the repository fails here (CI runs --dry-run),
    not minutes into a GPU call."""
    import inspect

    import quant
    from bench_offload import h2d_bandwidth, write_mixtral_slice
    from compare import hf_run, ours
    from offload.convert import convert
    from offload.generate import Sampling
    from offload.profile import profile
    from offload.profile.schema import load_schema
    from offload.store.memory import DEFAULT_HEADROOM, attention_backend  # noqa: F401  (the stages import them)

    x = Path("slice")
    calls = [(write_mixtral_slice, (x, 2), {}), (convert, (x, x, 4), dict(group_size=64, workers=2)),
             (quant.expert.quantize, (torch.zeros(1, 64), 4, 64), {}), (h2d_bandwidth, (), {}),
             (profile, (str(x), PROMPT, x, TOKENS, Sampling()),
              dict(device="cuda", context=CONTEXT, vram=1, ram="32GiB", prefetch=1, cpu_experts="never")),
             (ours, (x, "cuda", 16, 2, CONTEXT), dict(prefetch=1, cpu_experts="never", vram=1, ram=1)),
             (hf_run, (x, "cuda", 1, 1, 16, 2, torch.bfloat16), {})]
    try:
        from quant import triton_gemv as g

        calls += [(g.dequant_gemv, (x, x, x, x, 4, 64, None), {}), (g.splits_for, (1, 1, 4, x), {})]
        assert {"BLOCK_N", "BLOCK_K"} <= set(vars(g))
    except ImportError:  # no triton here: the gemv stage says so on the GPU
        pass
    for fn, args, kwargs in calls:
        inspect.signature(fn).bind(*args, **kwargs)
    read = {"tokens_per_s", "hit_rate", "h2d_bandwidth_bytes_per_s", "transfer_bound_s_per_token",
            "time_per_token_vs_transfer_bound", "decode_copy_hidden_fraction", "peak_vram_allocated_bytes",
            "peak_vram_reserved_bytes", "time_to_first_token_s"}
    missing = read - set(load_schema()["properties"]["totals"]["required"])
    assert not missing, f"profile.json's totals no longer hold {sorted(missing)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=list(STAGES), action="append", help="stage(s) to run, in order given "
                                                                           "(default: all, in the order listed)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu-session/first-gpu.json"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe-offload-first-gpu"),
                    help="where the slices are written (kept between stages)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: run what can run on a CPU, over --model (a check of this program's logic)")
    ap.add_argument("--model", type=Path, default=None, help="a model folder to use instead of the slice")
    ap.add_argument("--dry-run", action="store_true", help="say what each stage runs and measures; run nothing")
    args = ap.parse_args()
    stages = args.stage or list(STAGES)
    if args.device == "cpu" and not args.model:
        ap.error("--device cpu needs --model (a small model folder: the slice is for a GPU)")
    if args.dry_run or (args.device == "cuda" and not torch.cuda.is_available()):
        preflight()
        why = "dry run" if args.dry_run else "skipped: no CUDA device (these stages are for a GPU machine)"
        print(f"bench/gpu_first.py: {why}")
        for name in stages:
            print(f"  {name:8} ~{STAGES[name][1]:>3} s  {STAGES[name][0]}")
        return 0
    args.results = args.out.parent
    args.work.mkdir(parents=True, exist_ok=True)
    record = load_record(args.out, args.device)

    for name in stages:
        def save_partial(part, name=name):  # a stage cut short by the deadline keeps what it measured
            record["stages"][name] = {"partial": True, **part}
            save_record(record, args.out)

        args.save_partial = save_partial
        t0 = time.perf_counter()
        try:
            result = globals()[f"stage_{name}"](args)
        except Exception as exc:  # recorded, and the next stage still runs
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        record["stages"][name] = result
        save_record(record, args.out)
        print(f"{name}: {json.dumps(result)[:400]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
