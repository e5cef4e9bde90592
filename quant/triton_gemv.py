"""Fused dequantize + GEMV on CUDA (Triton) for batch-1 decode with quantized expert blobs.

# D hidden, F ffn, K input features of one matrix, N its output features, B bits, G group size
For one token a weight is read exactly once, so the packed codes go straight from the blob into
registers, are dequantized there and multiplied: no dequantized copy of the weight is ever written,
and the bytes read are the blob's (~4.5 bits per weight at 4-bit/G64 instead of 16).

`quant.kernels.fused_kernels()` imports this module when triton is present; `quant.expert_forward` and
`quant.linear` call it for one token on CUDA (`fused=True` forces it, e.g. under the interpreter). The packed
format is `quant.pack`'s: row r of a matrix is a little-endian bit stream, code k at bit k*B, so
    byte = (k * B) // 8,  shift = (k * B) % 8,  code = (bytes[byte] | bytes[byte + 1] << 8) >> shift
with the second byte needed only at 3 bits, where a code may straddle two bytes.

Two kernels: `_gate_up_kernel` computes silu(w1 x) * w3 x for a block of F rows (one pass over x,
two matrices), `_gemv_kernel` computes w2 h. Accumulation is float32 and h stays float32 between them.
Validated against the torch path with Triton's CPU interpreter (TRITON_INTERPRET=1) in CI, compiled to
machine code for sm_80 and sm_90 in CI too (no GPU needed), and run on CUDA by the `gpu`-marked tests in
tests/test_quant.py.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .blob import BlobLayout

BLOCK_N = 16    # output rows per program
BLOCK_K = 128   # input features per step of a program's loop
# Multiply-adds fused (FMA), as Triton has always compiled them; said explicitly, since Triton 3.9 warns that
# its default will change.
FP_FUSION = True


@triton.jit
def _dot_rows(q_ptr, s_ptr, z_ptr, x_ptr, rows, row_ok, K, row_bytes, n_groups,
              BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k W[row, k] * x[k] for a block of rows, W dequantized in registers: float32 [BLOCK_N]."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_base = rows.to(tl.int64)[:, None] * row_bytes   # [BLOCK_N, 1] byte offset of each row
    group_base = rows.to(tl.int64)[:, None] * n_groups
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)                 # [BLOCK_K]
        k_ok = ks < K
        mask = row_ok[:, None] & k_ok[None, :]
        bit = ks * BITS
        byte = (bit // 8)[None, :]
        shift = (bit % 8)[None, :]
        b = tl.load(q_ptr + row_base + byte, mask=mask, other=0).to(tl.int32)
        if BITS == 3:
            # A 3-bit code may straddle two bytes; the last code of a row never reads past the row.
            nxt = mask & (byte + 1 < row_bytes)
            b = b | (tl.load(q_ptr + row_base + byte + 1, mask=nxt, other=0).to(tl.int32) << 8)
        code = ((b >> shift) & ((1 << BITS) - 1)).to(tl.float32)
        g = group_base + (ks // GROUP)[None, :]
        s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g, mask=mask, other=0.0).to(tl.float32)
        xk = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        acc += tl.sum((code - z) * s * xk[None, :], axis=1)
    return acc


@triton.jit
def _gemv_kernel(q_ptr, s_ptr, z_ptr, x_ptr, y_ptr, N, K, row_bytes, n_groups,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = _dot_rows(q_ptr, s_ptr, z_ptr, x_ptr, rows, row_ok, K, row_bytes, n_groups, BITS, GROUP, BLOCK_N, BLOCK_K)
    tl.store(y_ptr + rows, acc, mask=row_ok)


@triton.jit
def _gate_up_kernel(q1_ptr, s1_ptr, z1_ptr, q3_ptr, s3_ptr, z3_ptr, x_ptr, h_ptr, N, K, row_bytes, n_groups,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    a = _dot_rows(q1_ptr, s1_ptr, z1_ptr, x_ptr, rows, row_ok, K, row_bytes, n_groups, BITS, GROUP, BLOCK_N, BLOCK_K)
    b = _dot_rows(q3_ptr, s3_ptr, z3_ptr, x_ptr, rows, row_ok, K, row_bytes, n_groups, BITS, GROUP, BLOCK_N, BLOCK_K)
    tl.store(h_ptr + rows, a / (1.0 + tl.exp(-a)) * b, mask=row_ok)   # silu(a) * b


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it x's (`--device cuda:1`); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dequant_gemv(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, x: torch.Tensor,
                 bits: int, group_size: int) -> torch.Tensor:
    """W x for one quantized matrix (packed [N, bytes], scale/zero [N, K/G]) and x [K]: float32 [N]."""
    n, n_groups = scale.shape
    k = n_groups * group_size
    y = torch.empty(n, dtype=torch.float32, device=x.device)
    with _on(x.device):
        _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](packed, scale, zero, x.contiguous(), y, n, k, packed.shape[1],
                                                 n_groups, BITS=bits, GROUP=group_size, BLOCK_N=BLOCK_N,
                                                 BLOCK_K=BLOCK_K, enable_fp_fusion=FP_FUSION)
    return y


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
