"""Row-wise quantization of lookup-table rows (MoLE tables): symmetric absmax per group of G values.

A row is one expert's output for one token, D values. Each group of G consecutive values keeps one
float16 scale = absmax / qmax; values are stored as round(x / scale):

    bits 8: int8 codes in [-127, 127], one per byte                      codes [..., D]
    bits 4: codes in [-7, 7] stored +8 as nibbles, element 2i in the low  codes [..., D/2] (uint8)
            nibble of byte i and element 2i+1 in the high nibble
    scales: float16 [..., D/G]

Symmetric codes need no zero point, so a row dequantizes with one multiply per value on the device,
right after its bytes arrive. Shapes: any leading dimensions, the last one is D.
"""

from __future__ import annotations

import torch

from .errors import UserError

ROW_BITS = (8, 4)
QMAX = {8: 127, 4: 7}


def check_row_format(dim: int, bits: int, group_size: int) -> None:
    """Refuse a (D, bits, G) combination the codes cannot represent."""
    if bits not in ROW_BITS:
        raise UserError(f"row quantization supports {ROW_BITS} bits, got {bits}")
    if group_size <= 0 or dim % group_size:
        raise UserError(f"row group size {group_size} must divide the row length {dim}")
    if bits == 4 and dim % 2:
        raise UserError(f"4-bit rows pack two values per byte: row length {dim} must be even")


def code_shape(dim: int, bits: int) -> int:
    """Length of the last dimension of the codes of a D-value row."""
    return dim // 2 if bits == 4 else dim


def quantize_rows(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (codes [..., D or D/2] int8/uint8, scales [..., D/G] float16)."""
    D = x.shape[-1]
    check_row_format(D, bits, group_size)
    groups = x.float().unflatten(-1, (D // group_size, group_size))          # [..., D/G, G]
    scales = (groups.abs().amax(-1) / QMAX[bits]).to(torch.float16)
    # Divide by the scale as stored (fp16), so dequantization reproduces exactly what was rounded.
    safe = scales.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
    q = torch.round(groups / safe).clamp(-QMAX[bits], QMAX[bits]).flatten(-2).to(torch.int8)  # [..., D]
    if bits == 8:
        return q, scales
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4), scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_rows`, on whatever device the codes are: -> [..., D] in `dtype`."""
    if bits == 8:
        q = codes.view(torch.int8).float()
    elif bits == 4:
        u = codes.view(torch.uint8)
        q = torch.stack(((u & 0xF), (u >> 4)), dim=-1).flatten(-2).float() - 8.0  # [..., D]
    else:
        raise UserError(f"row quantization supports {ROW_BITS} bits, got {bits}")
    groups = q.unflatten(-1, (q.shape[-1] // group_size, group_size)) * scales.float().unsqueeze(-1)
    return groups.flatten(-2).to(dtype)
