"""Fused CPU kernels for quantized experts: `cpu_kernels.c`, compiled on first use, called through ctypes.

# T tokens, K input features, N output features, D hidden, F expert ffn
The expert forward on the CPU used to dequantize blocks of rows and multiply (quant.expert's torch path):
at batch 1 that reads the packed bytes, writes and rereads float32 temporaries, and costs 15-60x the time
of reading the blob. These kernels read each packed byte once and keep codes in registers (see the C file
for the arithmetic), so a quantized expert costs about what reading its bytes from RAM costs.

Building: the first call compiles the C file with the system's C compiler (`cc`, or $CC) for this CPU
(-O3 -march=native -fopenmp), into a cache folder keyed by the source, the compiler and the CPU
($MOE_OFFLOAD_KERNEL_CACHE, default ~/.cache/moe-offload/kernels); later processes load the built library.
Without a compiler (or when it fails) the kernels are unavailable and the torch path runs: `path()` says
which ("avx512", "portable" or "torch"), and MOE_OFFLOAD_CPU_KERNELS=torch forces the torch path.

Threads: the kernels use torch's thread count (`torch.get_num_threads()`, which `--threads` sets). The call
releases the GIL, so CPU experts can run while Python queues GPU work.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared"]
MAX_TOKENS = 16  # above this the torch path (dequantize a block, then a BLAS matmul) is the faster one
_ENV = "MOE_OFFLOAD_CPU_KERNELS"

_c_int, _i64, _ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_OFFLOAD_KERNEL_CACHE") or Path.home() / ".cache" / "moe-offload" / "kernels")


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build(cc: str, march: str = "native") -> Path:
    """The shared library for this source, compiler, target (-march) and CPU, compiled once (atomically)
    into the cache."""
    version = subprocess.run([cc, "--version"], check=True, capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    flags = [*FLAGS, f"-march={march}"]
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    lib = cache_dir() / f"moe_cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        done = subprocess.run([cc, *flags, "-o", str(out), str(SOURCE), "-lm"], check=False, capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(out, lib)  # another process may have built the same file meanwhile: identical bytes
    return lib


_torch_forced = False


@contextlib.contextmanager
def torch_path():
    """Within this block quantized experts take the torch path on the CPU, as before these kernels existed
    (what the benchmark compares them with)."""
    global _torch_forced
    before, _torch_forced = _torch_forced, True
    try:
        yield
    finally:
        _torch_forced = before


def _library() -> ctypes.CDLL | None:
    return None if _torch_forced else _native()


@functools.cache
def _native() -> ctypes.CDLL | None:
    """The kernels built for this CPU, or None (no compiler, a failed build, or the torch path forced by
    the environment)."""
    if os.environ.get(_ENV, "").lower() == "torch" or platform.system() != "Linux":
        return None
    return load()


def load(march: str = "native") -> ctypes.CDLL | None:
    """Build (or find in the cache) and load the kernels for -march=`march`; None when that fails."""
    cc = _compiler()
    if cc is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc, march)))
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None
    lib.moe_isa.restype = _c_int
    lib.moe_qmatmul_work.restype = lib.moe_qexpert_work.restype = _i64
    lib.moe_qmatmul_work.argtypes = lib.moe_qexpert_work.argtypes = [_c_int] * 5
    lib.moe_qmatmul.restype = _c_int
    lib.moe_qmatmul.argtypes = [_c_int] * 5 + [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _c_int]
    lib.moe_qexperts.restype = _c_int
    lib.moe_qexperts.argtypes = [_c_int] * 5 + [_ptr] * 5 + [_c_int]
    lib.moe_mxfp4_matmul.restype = _c_int
    lib.moe_mxfp4_matmul.argtypes = [_c_int] * 3 + [_ptr] * 5 + [_c_int]
    lib.moe_hexpert.restype = _c_int
    lib.moe_hexpert.argtypes = [_c_int] * 4 + [_ptr] * 6 + [_c_int]
    lib.moe_read_bandwidth.restype = ctypes.c_double
    lib.moe_read_bandwidth.argtypes = [_ptr, _i64, _c_int, _c_int]
    return lib


def path() -> str:
    """Which CPU path quantized experts take: "avx512" or "portable" (the compiled kernels), or "torch"."""
    lib = _library()
    if lib is None:
        return "torch"
    return "avx512" if lib.moe_isa() == 512 else "portable"


def supports(x: torch.Tensor, bits: int, group_size: int) -> bool:
    """Whether x [T, K] meets a weight of this format through the kernels (else the torch path runs)."""
    return (x.device.type == "cpu" and 1 <= x.shape[0] <= MAX_TOKENS and bits in (8, 4, 3, 2)
            and group_size % 16 == 0 and 16 <= group_size <= 256 and _library() is not None)


def _float_input(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def _rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> list:
    for t, dtype in ((q, torch.uint8), (scale, torch.float16), (zero, torch.float16)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"kernel operand must be contiguous {dtype}, got {t.dtype}")
    return [q.data_ptr(), q.shape[1], scale.data_ptr(), zero.data_ptr()]


def qmatmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
            group_size: int, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [T, K] @ W.T for W [N, K] stored as codes q, scale, zero (quant.quantize): [T, N] in x's dtype.
    `lib`: a library from `load` (tests); default the one built for this CPU."""
    lib = lib or _library()
    T, K = x.shape
    N = q.shape[0]
    xf = _float_input(x)
    y = torch.empty(T, N, dtype=torch.float32)
    work = torch.empty(lib.moe_qmatmul_work(bits, group_size, N, K, T), dtype=torch.float32)
    q_ptr, q_row, s_ptr, z_ptr = _rows(q, scale, zero)
    if lib.moe_qmatmul(bits, group_size, N, K, T, q_ptr, q_row, s_ptr, z_ptr, xf.data_ptr(), y.data_ptr(),
                       work.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"the CPU kernel does not take a {bits}-bit [{N}, {K}] weight in groups of {group_size}")
    return y.to(x.dtype)


def qexpert(x: torch.Tensor, parts: dict[str, torch.Tensor], bits: int, group_size: int,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for x [T, D] and an expert's quantized parts ("w1.q", "w1.scale", "w1.zero",
    ... as a quantized blob names them): [T, D] in x's dtype. `lib` as in `qmatmul`."""
    return qexperts([x], [parts], bits, group_size, lib=lib)[0]


MAX_GROUP = 64  # experts in one `qexperts` call (the C side's MAX_GROUP)


def qexperts(xs: list[torch.Tensor], parts: list[dict[str, torch.Tensor]], bits: int, group_size: int,
             lib: ctypes.CDLL | None = None) -> list[torch.Tensor]:
    """`qexpert` of several experts of one layer (alike: bits, group size, shapes), expert i on xs[i]
    [T_i, D], in one call and one thread region: each result is the one its expert gives alone."""
    lib = lib or _library()
    if not 1 <= len(xs) == len(parts) <= MAX_GROUP:
        raise ValueError(f"qexperts takes 1 to {MAX_GROUP} experts with one input each, got {len(parts)} "
                         f"experts and {len(xs)} inputs")
    D, F = xs[0].shape[1], parts[0]["w1.q"].shape[0]
    x = torch.cat([_float_input(t) for t in xs]) if len(xs) > 1 else _float_input(xs[0])  # [sum T_i, D]
    y = torch.empty(x.shape[0], D, dtype=torch.float32)
    work = torch.empty(lib.moe_qexpert_work(bits, group_size, D, F, x.shape[0]), dtype=torch.float32)
    counts = (ctypes.c_int * len(xs))(*(t.shape[0] for t in xs))
    ptrs = torch.tensor([a for p in parts for name in ("w1", "w2", "w3")
                         for a in _rows(p[f"{name}.q"], p[f"{name}.scale"], p[f"{name}.zero"])], dtype=torch.int64)
    if lib.moe_qexperts(len(xs), bits, group_size, D, F, ctypes.addressof(counts), ptrs.data_ptr(), x.data_ptr(),
                        y.data_ptr(), work.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"the CPU kernel does not take {bits}-bit experts [{F}, {D}] in groups of {group_size}")
    return [out.to(t.dtype) for out, t in zip(y.split([t.shape[0] for t in xs]), xs)]


def supports_mxfp4(x: torch.Tensor) -> bool:
    """Whether x [T, K] meets an MXFP4 weight through the kernels."""
    return x.device.type == "cpu" and 1 <= x.shape[0] <= MAX_TOKENS and _library() is not None


def mxfp4_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [T, K] @ W.T for an MXFP4 weight W [N, K] stored as blocks uint8 [N, K/32, 16] and E8M0 scales uint8
    [N, K/32] (quant/mxfp4.py): [T, N] in x's dtype. `lib` as in `qmatmul`."""
    lib = lib or _library()
    T, K = x.shape
    N = blocks.shape[0]
    for t in (blocks, scales):
        if t.dtype != torch.uint8 or not t.is_contiguous():
            raise ValueError(f"MXFP4 operands must be contiguous uint8, got {t.dtype}")
    xf = _float_input(x)
    y = torch.empty(T, N, dtype=torch.float32)
    work = torch.empty(lib.moe_qmatmul_work(4, 32, N, K, T), dtype=torch.float32)
    if lib.moe_mxfp4_matmul(N, K, T, blocks.data_ptr(), scales.data_ptr(), xf.data_ptr(), y.data_ptr(),
                            work.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"the CPU kernel does not take an MXFP4 weight [{N}, {K}]")
    return y.to(x.dtype)


HALF_KINDS = {torch.bfloat16: 0, torch.float16: 1}


def supports_half(x: torch.Tensor, weight_dtype: torch.dtype) -> bool:
    """Whether a half-precision (bf16/fp16) expert meets x [T, D] through the kernels: for one token only,
    where torch's bf16 matrix-vector product takes 1.5x the kernel's time; from 4 tokens on torch's
    matrix-matrix path is the faster (bench/results/cpu-experts-cpu.json)."""
    return (x.device.type == "cpu" and x.shape[0] == 1 and weight_dtype in HALF_KINDS
            and _library() is not None)


def hexpert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
            lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for x [T, D] and bfloat16 or float16 weights w1, w3 [F, D], w2 [D, F], summed
    in float32: [T, D] in x's dtype. `lib` as in `qmatmul`."""
    lib = lib or _library()
    T, D = x.shape
    F = w1.shape[0]
    for w in (w1, w2, w3):
        if w.dtype != w1.dtype or not w.is_contiguous():
            raise ValueError(f"kernel weights must be contiguous and of one dtype, got {w.dtype}")
    xf = _float_input(x)
    y = torch.empty(T, D, dtype=torch.float32)
    work = torch.empty(3 * T * F, dtype=torch.float32)
    if lib.moe_hexpert(HALF_KINDS[w1.dtype], D, F, T, w1.data_ptr(), w2.data_ptr(), w3.data_ptr(), xf.data_ptr(),
                       y.data_ptr(), work.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"the CPU kernel does not take a {w1.dtype} expert")
    return y.to(x.dtype)


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, threads: int | None = None) -> float:
    """Bytes per second of reading a fresh `nbytes` buffer from RAM with `threads` threads (default torch's):
    the best of `repeats` passes of wide loads. What the benchmark calls the memory-read bound."""
    lib = _library()
    buf = torch.ones(nbytes // 4096 * 4096, dtype=torch.uint8)
    threads = threads or torch.get_num_threads()
    if lib is None:  # no kernels: torch's own reduction, a lower estimate
        import time
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.view(torch.int64).sum()
            best = max(best, buf.numel() / (time.perf_counter() - t0))
        return best
    return lib.moe_read_bandwidth(buf.data_ptr(), buf.numel(), threads, repeats)
