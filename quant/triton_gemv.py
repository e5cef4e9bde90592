"""Fused dequantize + GEMV on CUDA (Triton) for batch-1 decode with quantized expert blobs.

# D hidden, F ffn, K input features of one matrix, N its output features, B bits, G group size
For one token a weight is read exactly once, so the packed codes go straight from the blob into
registers, are dequantized there and multiplied: no dequantized copy of the weight is ever written,
and the bytes read are the blob's (~4.5 bits per weight at 4-bit/G64 instead of 16).

`quant.kernels.fused_kernels()` imports this module when triton is present; `quant.expert_forward` and
`quant.linear` call it for one token on CUDA (`fused=True` forces it, e.g. under the interpreter). The packed
format is `quant.pack`'s: row r of a matrix is a little-endian bit stream, code k at bit k*B, read here a
unit at a time (the fewest whole bytes holding whole codes: 1 byte at 8, 4 and 2 bits, 3 bytes of 8 codes
at 3 bits), each row's units contiguous, so a program's loads are wide and never read a byte twice.

Two kernels: `_gate_up_kernel` computes silu(w1 x) * w3 x for a block of F rows (one pass over x,
two matrices), `_gemv_kernel` computes w2 h, its K range split over programs when the rows alone would not
fill the device (split-K; partial sums added by torch in a fixed order). Scales and zeros are read once
per unit, not per code. Accumulation is float32 and h stays float32 between them.
Validated against the torch path with Triton's CPU interpreter (TRITON_INTERPRET=1) in CI, compiled to
machine code for sm_80 and sm_90 in CI too (no GPU needed), and run on CUDA by the `gpu`-marked tests in
tests/test_quant.py.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .blob import BlobLayout

BLOCK_N = 32    # output rows per program
BLOCK_K = 256   # input features (codes) per step of a program's loop
# Split-K: a matrix with few rows for the device (w2 of Mixtral: 4096 rows, K = 14336) would leave SMs idle
# with one program per block of rows; its K range is cut into splits, each program writes a partial sum,
# and torch adds them in a fixed order (no atomics: the result must not depend on timing).
PROGRAMS_PER_SM = 4
# Multiply-adds fused (FMA), as Triton has always compiled them; said explicitly, since Triton 3.9 warns that
# its default will change.
FP_FUSION = True


@triton.jit
def _dot_rows(q_ptr, s_ptr, z_ptr, x_ptr, rows, row_ok, K, row_bytes, n_groups, BITS: tl.constexpr,
              GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k W[row, k] * x[k] for a block of rows, W dequantized in registers: float32 [BLOCK_N].

    The packed codes are read a unit at a time (quant.pack: 8, 4 or 2 bits, one byte holds 1, 2 or 4 codes;
    3 bits, 3 bytes hold 8), contiguous bytes per row, so loads vectorize; unit u holds codes u*PER + j.
    This program sums over units [program_id(1) * span, ...) of every row (split-K: `span` = the units per
    split, a multiple of the step). Where a group holds whole units (GROUP a multiple of PER), scale and zero
    are read once per unit and applied to the unit's partial dot: s * (sum_j c_j x_j - z * sum_j x_j)."""
    PER: tl.constexpr = 8 if BITS == 3 else 8 // BITS          # codes per unit
    UNIT: tl.constexpr = 3 if BITS == 3 else 1                 # bytes per unit
    BU: tl.constexpr = BLOCK_K // PER                          # units per step
    MASK: tl.constexpr = (1 << BITS) - 1
    units = tl.cdiv(K, PER)
    span = tl.cdiv(tl.cdiv(units, tl.num_programs(1)), BU) * BU
    u_begin = tl.program_id(1) * span
    u_end = tl.minimum(u_begin + span, units)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_base = rows.to(tl.int64)[:, None] * row_bytes         # [BLOCK_N, 1] byte offset of each row
    group_base = rows.to(tl.int64)[:, None] * n_groups
    for u0 in range(u_begin, u_end, BU):
        us = u0 + tl.arange(0, BU)                             # [BU]
        u_ok = us < u_end
        mask = row_ok[:, None] & u_ok[None, :]
        at = q_ptr + row_base + (us * UNIT)[None, :]
        word = tl.load(at, mask=mask, other=0).to(tl.int32)   # [BLOCK_N, BU]
        if UNIT == 3:  # a little-endian 24-bit word of 8 codes
            word = word | (tl.load(at + 1, mask=mask, other=0).to(tl.int32) << 8)
            word = word | (tl.load(at + 2, mask=mask, other=0).to(tl.int32) << 16)
        if GROUP % PER == 0:
            g = group_base + (us * PER // GROUP)[None, :]
            s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g, mask=mask, other=0.0).to(tl.float32)
            cx = tl.zeros([BLOCK_N, BU], dtype=tl.float32)
            xs = tl.zeros([BU], dtype=tl.float32)
            for j in tl.static_range(PER):
                ks = us * PER + j
                xj = tl.load(x_ptr + ks, mask=u_ok & (ks < K), other=0.0).to(tl.float32)
                cx += ((word >> (j * BITS)) & MASK).to(tl.float32) * xj[None, :]
                xs += xj
            acc += tl.sum(s * (cx - z * xs[None, :]), axis=1)
        else:  # a unit spans two groups: scale and zero per code
            for j in tl.static_range(PER):
                ks = us * PER + j
                k_ok = u_ok & (ks < K)
                m = row_ok[:, None] & k_ok[None, :]
                g = group_base + (ks // GROUP)[None, :]
                s = tl.load(s_ptr + g, mask=m, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g, mask=m, other=0.0).to(tl.float32)
                xj = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                acc += tl.sum((((word >> (j * BITS)) & MASK).to(tl.float32) - z) * s * xj[None, :], axis=1)
    return acc


@triton.jit
def _gemv_kernel(q_ptr, s_ptr, z_ptr, x_ptr, y_ptr, N, K, row_bytes, n_groups,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[split, rows] = the rows' dot products over this program's split of K (y: [splits, N] float32)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = _dot_rows(q_ptr, s_ptr, z_ptr, x_ptr, rows, row_ok, K, row_bytes, n_groups, BITS, GROUP, BLOCK_N, BLOCK_K)
    tl.store(y_ptr + tl.program_id(1).to(tl.int64) * N + rows, acc, mask=row_ok)


@triton.jit
def _gate_up_kernel(q1_ptr, s1_ptr, z1_ptr, q3_ptr, s3_ptr, z3_ptr, x_ptr, h_ptr, N, K, row_bytes, n_groups,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[rows] = silu(w1 x) * (w3 x): the whole K per program (silu needs whole sums; F rows are plenty)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    a = _dot_rows(q1_ptr, s1_ptr, z1_ptr, x_ptr, rows, row_ok, K, row_bytes, n_groups, BITS, GROUP, BLOCK_N, BLOCK_K)
    b = _dot_rows(q3_ptr, s3_ptr, z3_ptr, x_ptr, rows, row_ok, K, row_bytes, n_groups, BITS, GROUP, BLOCK_N, BLOCK_K)
    tl.store(h_ptr + rows, a / (1.0 + tl.exp(-a)) * b, mask=row_ok)   # silu(a) * b


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """Programs that keep the device busy: a few per SM on a GPU; under the interpreter (CPU tensors) a
    fixed count, so tests there take the split-K path too."""
    if device.type != "cuda":
        return 16
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def splits_for(n: int, k: int, bits: int, device: torch.device) -> int:
    """Split-K count of a GEMV with n rows and k inputs on `device`: enough programs for the device, each
    split at least one step of BLOCK_K codes. A function of the shapes and the device only."""
    row_programs = triton.cdiv(n, BLOCK_N)
    return max(1, min(_programs_wanted(device) // row_programs, triton.cdiv(k, BLOCK_K)))


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it x's (`--device cuda:1`); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dequant_gemv(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, x: torch.Tensor,
                 bits: int, group_size: int, splits: int | None = None) -> torch.Tensor:
    """W x for one quantized matrix (packed [N, bytes], scale/zero [N, K/G]) and x [K]: float32 [N].
    `splits`: split-K count (default `splits_for` the shape and device)."""
    n, n_groups = scale.shape
    k = n_groups * group_size
    splits = splits or splits_for(n, k, bits, x.device)
    y = torch.empty(splits, n, dtype=torch.float32, device=x.device)  # [splits, N] partial sums
    with _on(x.device):
        _gemv_kernel[(triton.cdiv(n, BLOCK_N), splits)](packed, scale, zero, x.contiguous(), y, n, k, packed.shape[1],
                                                        n_groups, BITS=bits, GROUP=group_size, BLOCK_N=BLOCK_N,
                                                        BLOCK_K=BLOCK_K, enable_fp_fusion=FP_FUSION)
    return y[0] if splits == 1 else y.sum(0)


def expert_forward_fused(layout: BlobLayout, blob_views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`quant.expert_forward` for one token x [1, D] with the fused kernels: [1, D] in x's dtype."""
    v, bits, group = blob_views, layout.bits, layout.group_size
    ffn, n_groups = v["w1.scale"].shape
    hidden = n_groups * group
    xv = x.reshape(-1).contiguous()                                          # [D]
    h = torch.empty(ffn, dtype=torch.float32, device=x.device)              # [F]
    with _on(x.device):
        _gate_up_kernel[(triton.cdiv(ffn, BLOCK_N),)](
            v["w1.q"], v["w1.scale"], v["w1.zero"], v["w3.q"], v["w3.scale"], v["w3.zero"], xv, h,
            ffn, hidden, v["w1.q"].shape[1], n_groups, BITS=bits, GROUP=group, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            enable_fp_fusion=FP_FUSION)
    y = dequant_gemv(v["w2.q"], v["w2.scale"], v["w2.zero"], h, bits, group)  # [D]
    return y.to(x.dtype).reshape(1, hidden)


# ---- MXFP4 (quant/mxfp4.py): 4-bit E2M1 values, two per byte, one power-of-two scale per 32 ----------------

MX_BLOCK_K = 256  # values per step of a program's loop (128 bytes of a row)


@triton.jit
def _mxfp4_gemv_kernel(b_ptr, s_ptr, x_ptr, bias_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[rows] = W[rows] x (+ bias[rows]) for W in MXFP4 (blocks [N, K/2] bytes, scales [N, K/32] biased
    exponents), dequantized in registers: each byte holds the even value in its low nibble; a value is
    sign (bit 3), exponent e (bits 2-1), mantissa m (bit 0): m/2 when e = 0, else (1 + m/2) 2^(e-1)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    half = K // 2
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, half, BLOCK_K // 2):
        j = k0 + tl.arange(0, BLOCK_K // 2)                        # byte index in the row
        ok = row_ok[:, None] & (j < half)[None, :]
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * half + j[None, :], mask=ok, other=0).to(tl.int32)
        s = tl.load(s_ptr + rows.to(tl.int64)[:, None] * (K // 32) + (j // 16)[None, :], mask=ok, other=127)
        scale = tl.exp2(s.to(tl.float32) - 127.0)
        xe = tl.load(x_ptr + 2 * j, mask=j < half, other=0).to(tl.float32)
        xo = tl.load(x_ptr + 2 * j + 1, mask=j < half, other=0).to(tl.float32)
        lo, hi = b & 0xF, b >> 4
        acc += tl.sum((_e2m1(lo) * xe[None, :] + _e2m1(hi) * xo[None, :]) * scale, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    tl.store(y_ptr + rows, acc, mask=row_ok)


@triton.jit
def _e2m1(code):
    """The float32 value of 4-bit E2M1 codes (int32)."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((code & 8) != 0, -mag, mag)


def mxfp4_gemv(blocks: torch.Tensor, scales: torch.Tensor, x: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """W x (+ bias) for one MXFP4 matrix (blocks [N, K/32, 16], scales [N, K/32]) and x [K]: float32 [N]."""
    n, groups = scales.shape
    y = torch.empty(n, dtype=torch.float32, device=x.device)
    with _on(x.device):
        _mxfp4_gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
            blocks, scales, x.contiguous(), bias if bias is not None else y, y, n, groups * 32,
            HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_K=MX_BLOCK_K, enable_fp_fusion=FP_FUSION)
    return y


def mxfp4_expert_forward(layout: BlobLayout, views: dict[str, torch.Tensor], x: torch.Tensor,
                         clamped_swiglu) -> torch.Tensor:
    """`quant.mxfp4.expert_forward` for one token x [1, D] with the fused kernel: [1, D] in x's dtype. The
    activation between the matrices runs in torch on one [F] vector (gpt-oss's: `clamped_swiglu`, passed in by
    quant/mxfp4.py, which imports this module through quant.kernels)."""
    xv = x.reshape(-1)

    def gemv(name: str, v: torch.Tensor, bias: bool = False) -> torch.Tensor:
        return mxfp4_gemv(views[f"{name}.blocks"], views[f"{name}.scales"], v, views[f"{name}.bias"] if bias else None)

    if layout.extra.get("ffn") == "gpt_oss":
        h = clamped_swiglu(gemv("gate_up", xv, True), layout.extra["swiglu_limit"],
                                 layout.extra["swiglu_alpha"])                           # float32 [F]
        y = gemv("down", h, True)
    else:
        a = gemv("w1", xv)
        y = gemv("w2", a / (1.0 + torch.exp(-a)) * gemv("w3", xv))
    return y.to(x.dtype).reshape(1, -1)
