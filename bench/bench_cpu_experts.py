"""CPU experts at memory speed: each expert kind against the time of reading its bytes from RAM, and CPU-only
decode of a Mixtral-shaped slice against the torch path the runtime had before and against llama.cpp.

What it measures, and against what (every figure is a ratio against a baseline measured in this run):
  * kernels: one expert forward (gate, up, SiLU, down) as the runtime computes it on the CPU
    (`quant.expert_forward`; for bf16 weights `quant.cpu_kernels.hexpert`) for T = 1, 4, 16 tokens, on Mixtral-8x7B's expert shape (D 4096,
    F 14336) and Qwen3-30B-A3B's (D 2048, F 768), for bf16 and 8-bit g64, 4-bit g64, 3-bit g64, 2-bit g16
    and MXFP4 blobs; median of --repeats calls. The bound: the blob's bytes over the RAM read bandwidth measured in this
    process with the same thread count (`quant.cpu_kernels.read_bandwidth`: the best of 5 passes of 512-bit
    loads over 1 GiB); the figure is time / bound. Each call reads another copy of the expert (768 MB of
    copies in turn, more than the CPU's caches), as decode does. Beside it, the torch path (dequantize a
    block of rows, then matmul; for bf16 torch's matmuls: what ran before the kernels) at T = 1, and for
    4-bit torch's own int4 CPU kernel
    (`_weight_int4pack_mm_for_cpu`, bfloat16 activations: the other option measured), so the choice is
    made by measurement;
  * decode: a Mixtral-shaped slice (`bench_offload.write_mixtral_slice`: real dimensions, --layers layers,
    random bf16 weights) loaded on the CPU in bfloat16 with every expert in RAM (`--cpu-experts all`), at bf16 and converted to 8
    and 4 bits; ms per decoded token, greedy, median of --tokens steps, with the kernels and with the torch
    path (`quant.cpu_kernels.torch_path()`) on the same loaded model; and llama.cpp (llama-cpp-python, when
    installed: bench/peer_llamacpp.py) at Q8_0 and Q4_0 on a GGUF converted from the same slice, same
    thread count. The converted slices quantize by round-to-nearest over each group's range instead of the
    project's search (which takes about 40 s per Mixtral matrix on 2 cores): the bytes and so the speed are
    the same, only the values differ.

    python bench/bench_cpu_experts.py --work /tmp/cpu-bench   # kernels, 1- and 4-layer slices, 2 threads
    python bench/bench_cpu_experts.py --skip-decode        # kernels only

Writes bench/results/cpu-experts-cpu.json, and names the kernel path that ran ("avx512", "portable", or
"torch" on a machine without a C compiler). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import offload  # noqa: E402
import quant  # noqa: E402
from common import RESULTS, device_name, load_average, save_record  # noqa: E402
from quant import cpu_kernels, mxfp4  # noqa: E402
from quant.blob import BlobLayout  # noqa: E402
from quant.pack import pack  # noqa: E402

SHAPES = {"mixtral-8x7b": (4096, 14336), "qwen3-30b-a3b": (2048, 768)}
KINDS = {"bf16": None, "8-bit g64": (8, 64), "4-bit g64": (4, 64), "3-bit g64": (3, 64), "2-bit g16": (2, 16),
         "mxfp4": "mxfp4"}
TOKENS = (1, 4, 16)
PROMPT = "The for statement is used to iterate over the elements of a sequence"


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def random_blob(D: int, F_: int, fmt, gen: torch.Generator) -> tuple[BlobLayout, torch.Tensor]:
    """A quantized expert blob (`fmt`: (bits, group size), or "mxfp4") with random codes, scales and zeros
    (the kernels' speed does not depend on them)."""
    if fmt == "mxfp4":
        layout = mxfp4.expert_layout(D, F_)
        return layout, layout.pack({r.name: torch.randint(100 if r.name.endswith("scales") else 0,
                                                          130 if r.name.endswith("scales") else 256,
                                                          r.shape, dtype=torch.uint8, generator=gen)
                                    for r in layout.records})
    bits, group_size = fmt
    layout = quant.expert_layout(D, F_, bits, group_size)
    tensors = {}
    for name, (rows, cols) in {"w1": (F_, D), "w2": (D, F_), "w3": (F_, D)}.items():
        tensors[f"{name}.q"] = pack(torch.randint(0, 2 ** bits, (rows, cols), generator=gen), bits)
        tensors[f"{name}.scale"] = (torch.rand(rows, cols // group_size, generator=gen) * 1e-3 + 1e-4).half()
        tensors[f"{name}.zero"] = (torch.rand(rows, cols // group_size, generator=gen) * (2 ** bits - 1)).half()
    return layout, layout.pack(tensors)


def int4pack_expert(layout: BlobLayout, views: dict) -> callable:
    """torch's own int4 CPU kernel on the same expert (bf16 activations, scales and zero offsets in bf16):
    the weights repacked once into its layout, then three weight-only matmuls."""
    packed = {}
    for name in ("w1", "w2", "w3"):
        w = quant.QuantizedTensor(views[f"{name}.q"], views[f"{name}.scale"], views[f"{name}.zero"],
                                  (views[f"{name}.scale"].shape[0], views[f"{name}.scale"].shape[1] * layout.group_size),
                                  layout.bits, layout.group_size)
        codes = quant.pack.unpack(w.q, 4, w.shape[1]).to(torch.int32)
        scale = w.scale.float()
        offset = (8 - w.zero.float()) * scale      # (code - z) s = (code - 8) s + (8 - z) s
        sz = torch.stack([scale, offset], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/G, N, 2]
        packed[name] = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), sz)

    def mm(x, name):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[name][0], layout.group_size, packed[name][1])

    return lambda x: mm(F.silu(mm(x, "w1")) * mm(x, "w3"), "w2")


ROTATE_BYTES = 768 << 20  # experts cycled through per setting: more than any CPU's last-level cache


def rotating(calls: list) -> callable:
    """One call of the list after another: each timed call reads an expert that is not in the CPU's caches,
    as in decode, where a token's experts were last read a whole forward pass ago."""
    state = {"i": 0}

    def call(x):
        state["i"] = (state["i"] + 1) % len(calls)
        return calls[state["i"]](x)

    return call


def kernel_rows(repeats: int, bandwidth: float, shapes: list[str], kinds: list[str]) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        D, F_ = SHAPES[shape]
        for kind, fmt in ((k, KINDS[k]) for k in kinds):
            nbytes = (3 * D * F_ * 2 if fmt is None else mxfp4.expert_layout(D, F_).nbytes if fmt == "mxfp4"
                      else quant.expert_layout(D, F_, *fmt).nbytes)
            copies = max(2, -(-ROTATE_BYTES // nbytes))
            if fmt is None:
                experts = [[(torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16)
                            for s in ((F_, D), (D, F_), (F_, D))] for _ in range(copies)]
                forward = rotating([lambda x, w=w: half_expert(x, *w) for w in experts])
                dtype = torch.bfloat16
            else:
                blobs = [random_blob(D, F_, fmt, gen) for _ in range(copies)]
                layout = blobs[0][0]
                views = [layout.views(blob) for _, blob in blobs]
                forward = rotating([lambda x, v=v: quant.expert_forward(layout, v, x) for v in views])
                dtype = torch.float32
            bound_ms = nbytes / bandwidth * 1e3
            for T in TOKENS:
                x = torch.randn(T, D, generator=gen).to(dtype)
                ms = median_ms(lambda: forward(x), repeats)
                row = {"shape": shape, "kind": kind, "tokens": T, "blob_bytes": nbytes, "ms": round(ms, 3),
                       "read_bound_ms": round(bound_ms, 3), "x_bound": round(ms / bound_ms, 2)}
                if T == 1:
                    with cpu_kernels.torch_path():
                        before = median_ms(lambda: forward(x), max(1, repeats // 3))
                    row.update(torch_path_ms=round(before, 2), speedup_vs_torch_path=round(before / ms, 1))
                if fmt == (4, 64):
                    other = rotating([int4pack_expert(layout, v) for v in views])
                    row["torch_int4pack_ms"] = round(median_ms(lambda: other(x.to(torch.bfloat16)), repeats), 3)
                rows.append(row)
                extra = (f"  (torch path {row['torch_path_ms']:.1f} ms, {row['speedup_vs_torch_path']}x)"
                         if "torch_path_ms" in row else "")
                extra += f"  (torch int4pack {row['torch_int4pack_ms']:.2f} ms)" if "torch_int4pack_ms" in row else ""
                print(f"  {shape:14s} {kind:10s} T={T:2d}: {ms:8.3f} ms, bound {bound_ms:7.3f} ms, "
                      f"{row['x_bound']:5.2f}x{extra}", flush=True)
    return rows


def half_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """A bf16 expert as the runtime computes it on the CPU (offload/store/sources.py): the kernels when they
    take it, else torch's matmuls (inside `cpu_kernels.torch_path()`: before the kernels)."""
    if cpu_kernels.supports_half(x, w1.dtype):
        return cpu_kernels.hexpert(x, w1, w2, w3)
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def rtn_pack_expert(w1, w2, w3, bits: int, group_size: int) -> torch.Tensor:
    """`quant.pack_expert`'s blob by round-to-nearest over each group's [min, max] (the bench's fast stand-in
    for the project's quantizer search; same layout and bytes)."""
    F_, D = w1.shape
    layout = quant.expert_layout(D, F_, bits, group_size)
    tensors = {}
    top = 2 ** bits - 1
    for name, w in zip(("w1", "w2", "w3"), (w1, w2, w3)):
        g = w.float().unflatten(1, (-1, group_size))                     # [rows, groups, G]
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / top).clamp_min(1e-8).half()
        zero = (-lo / scale.float()).half()
        codes = (g / scale.float()[..., None] + zero.float()[..., None]).round().clamp(0, top).flatten(1)
        tensors.update({f"{name}.q": pack(codes.to(torch.uint8), bits), f"{name}.scale": scale, f"{name}.zero": zero})
    return layout.pack(tensors)


def decode_ms(rt, prompt_ids: list[int], tokens: int) -> float:
    """Median wall time of a greedy decode step (the prefill and the first step are not counted)."""
    stamps = []
    for _ in rt.generate_ids(prompt_ids, tokens + 1):
        stamps.append(time.perf_counter())
    return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])) * 1e3


def decode_rows(work: Path, layers: int, tokens: int, threads: int, peer: bool, gguf_cache: Path) -> list[dict]:
    from bench_offload import write_mixtral_slice

    from offload.convert import convert

    src = work / f"mixtral-slice-{layers}"
    if not (src / "config.json").is_file():
        print(f"writing a {layers}-layer Mixtral-shaped slice to {src} ...", flush=True)
        write_mixtral_slice(src, layers)
    rows = []
    folders = {"bf16": src}
    for bits in (8, 4):
        dst = work / f"mixtral-slice-{layers}-{bits}bit-rtn"
        if not dst.exists():
            print(f"converting to {bits} bits (round-to-nearest) ...", flush=True)
            real = quant.pack_expert
            quant.pack_expert = rtn_pack_expert
            try:
                convert(src, dst, bits=bits, group_size=64)
            finally:
                quant.pack_expert = real
        folders[f"{bits}-bit g64"] = dst
    for kind, folder in folders.items():
        # --cpu-experts all: every expert computed from the host tier, with no second copy in a CPU "device"
        # slot pool (the 4-layer bf16 slice is 11 GB)
        with offload.load(folder, device="cpu", dtype="bfloat16", context=256, threads=threads,
                          cpu_experts="all") as rt:
            prompt_ids = rt.tokenizer.encode(PROMPT)
            row = {"model": f"mixtral-slice-{layers}", "kind": kind, "contender": "moe-offload",
                   "ms_per_token": round(decode_ms(rt, prompt_ids, tokens), 2)}
            if kind != "bf16":
                with cpu_kernels.torch_path():
                    before = decode_ms(rt, prompt_ids, max(2, tokens // 4))
                row.update(torch_path_ms_per_token=round(before, 1),
                           speedup_vs_torch_path=round(before / row["ms_per_token"], 1))
        rows.append(row)
        print(f"  {kind:10s}: {row['ms_per_token']:8.1f} ms/token"
              + (f"  (torch path {row['torch_path_ms_per_token']:.0f} ms, {row['speedup_vs_torch_path']}x)"
                 if "torch_path_ms_per_token" in row else ""), flush=True)
        del rt
    if peer:
        rows += peer_rows(src, gguf_cache, layers, tokens, threads, rows)
    return rows


def peer_rows(src: Path, gguf_cache: Path, layers: int, tokens: int, threads: int, ours: list[dict]) -> list[dict]:
    try:
        import peer_llamacpp
    except ImportError:
        return [{"contender": "llama.cpp", "skipped": "bench/peer_llamacpp.py is missing"}]
    version = peer_llamacpp.available()
    if version is None:
        print("  llama.cpp: llama-cpp-python is not installed (see bench/peer_llamacpp.py); skipped", flush=True)
        return [{"contender": "llama.cpp", "skipped": "llama-cpp-python is not installed"}]
    rows = []
    mine = {r["kind"]: r["ms_per_token"] for r in ours}
    for quant_name, kind in (("Q8_0", "8-bit g64"), ("Q4_0", "4-bit g64")):
        gguf = peer_llamacpp.to_gguf(src, gguf_cache, quant_name)
        got = peer_llamacpp.decode_ms_per_token(gguf, threads, PROMPT, tokens)
        row = {"model": f"mixtral-slice-{layers}", "kind": quant_name, "contender": "llama.cpp",
               "version": version, "ms_per_token": round(got["ms_per_token"], 2),
               "moe_offload_kind": kind, "moe_offload_vs_llamacpp": round(got["ms_per_token"] / mine[kind], 2)}
        rows.append(row)
        print(f"  llama.cpp {quant_name}: {row['ms_per_token']:.1f} ms/token (moe-offload {kind}: "
              f"{mine[kind]:.1f} ms, {row['moe_offload_vs_llamacpp']}x llama.cpp's speed)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9, help="timed calls per kernel setting (median)")
    ap.add_argument("--layers", default="1,4", help="layers of the Mixtral-shaped decode slices (comma-separated)")
    ap.add_argument("--peer-layers", default="1", help="the slices llama.cpp also decodes (its conversion of a "
                                                       "4-layer slice writes 20 GB of GGUFs)")
    ap.add_argument("--gguf-cache", default=None, help="folder for llama.cpp's GGUFs (default: WORK/gguf)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per decode setting")
    ap.add_argument("--work", default=None, help="folder for the slices (GBs; default a temporary folder)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="expert shapes for the kernel part")
    ap.add_argument("--kinds", default=",".join(KINDS), help="expert kinds for the kernel part")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--no-peer", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = cpu_kernels.path()
    bandwidth = cpu_kernels.read_bandwidth(threads=args.threads)
    print(f"kernel path: {path}; RAM read bandwidth {bandwidth / 1e9:.1f} GB/s at {args.threads} threads", flush=True)
    device = device_name("cpu")
    out = Path(args.out) if args.out else RESULTS / "cpu-experts-cpu.json"
    record = {"benchmark": "bench_cpu_experts", "device": device, "threads": args.threads, "kernel_path": path,
              "read_bandwidth_GBps": round(bandwidth / 1e9, 2), "torch": torch.__version__,
              "load_average_before": load_average(), "command": " ".join(sys.argv)}
    if not args.skip_kernels:
        record["kernels"] = kernel_rows(args.repeats, bandwidth, args.shapes.split(","), args.kinds.split(","))
        save_record(record, out)
    if not args.skip_decode:
        with (nullcontext(Path(args.work)) if args.work else tempfile.TemporaryDirectory()) as work:
            work = Path(work)
            work.mkdir(parents=True, exist_ok=True)
            record["decode"] = []
            peer_layers = {int(n) for n in args.peer_layers.split(",") if n}
            for layers in (int(n) for n in args.layers.split(",")):
                record["decode"] += decode_rows(work, layers, args.tokens, args.threads,
                                                not args.no_peer and layers in peer_layers,
                                                Path(args.gguf_cache) if args.gguf_cache else work / "gguf")
                save_record(record, out)
    record["load_average_after"] = load_average()
    save_record(record, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
