"""Bit packing of integer codes into uint8 storage, along the last dimension, for 8, 4, 3 and 2 bits.

Codes are unsigned integers in [0, 2**bits). A row of n codes becomes a row of bytes:

    bits 8: one code per byte                                            n bytes
    bits 4: code 2i in the low nibble of byte i, code 2i+1 in the high    ceil(n/2) bytes
    bits 2: code 4i+j in bits 2j..2j+1 of byte i                          ceil(n/4) bytes
    bits 3: codes 8i..8i+7 as one little-endian 24-bit word in bytes      3*ceil(n/8) bytes
            3i..3i+2, code 8i+j in bits 3j..3j+2 of that word

A row whose length is not a multiple of the codes per unit is padded with zero codes; `unpack` takes the
true length back and drops them. Every code of a row starts at a fixed bit position computable from its
index, which is what the fused GPU kernel (`quant.triton_gemv`) relies on.
"""

from __future__ import annotations

import torch

from .errors import UserError

BITS = (8, 4, 3, 2)
# bits -> (codes per unit, bytes per unit): the smallest whole-byte group of codes.
_UNIT = {8: (1, 1), 4: (2, 1), 3: (8, 3), 2: (4, 1)}


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise UserError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")


def packed_length(n: int, bits: int) -> int:
    """Bytes that a row of n codes takes."""
    check_bits(bits)
    codes, nbytes = _UNIT[bits]
    return -(-n // codes) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., n] (any integer dtype, values in [0, 2**bits)) -> uint8 [..., packed_length(n, bits)]."""
    check_bits(bits)
    per, nbytes = _UNIT[bits]
    n = codes.shape[-1]
    pad = -n % per
    c = codes.to(torch.int32)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    units = c.unflatten(-1, (c.shape[-1] // per, per))                     # [..., n/per, per]
    shifts = torch.arange(per, dtype=torch.int32, device=c.device) * bits  # bit position of each code in its unit
    # Codes occupy disjoint bits, so the sum of the shifted codes is their bitwise or.
    word = (units << shifts).sum(-1, dtype=torch.int32)                    # [..., n/per]
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=c.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF                       # [..., n/per, nbytes]
    return out.flatten(-2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [..., packed_length(n, bits)] -> uint8 codes [..., n]; the inverse of `pack`."""
    check_bits(bits)
    per, nbytes = _UNIT[bits]
    if packed.shape[-1] != packed_length(n, bits):
        raise UserError(f"{bits}-bit codes of a row of {n} take {packed_length(n, bits)} bytes, "
                        f"got {packed.shape[-1]}")
    u = packed.view(torch.uint8)
    if bits == 8:
        return u.clone()
    if bits in (4, 2):
        # Whole codes per byte: stay in uint8 (the CPU expert path unpacks on every call).
        shifts = torch.arange(per, dtype=torch.uint8, device=u.device) * bits
        codes = (u.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)                 # [..., bytes, per]
        return codes.flatten(-2)[..., :n]
    b = packed.view(torch.uint8).to(torch.int32).unflatten(-1, (-1, nbytes))  # [..., units, nbytes]
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=b.device) * 8
    word = (b << byte_shifts).sum(-1, dtype=torch.int32)                        # [..., units]
    shifts = torch.arange(per, dtype=torch.int32, device=b.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)                  # [..., units, per]
    return codes.flatten(-2)[..., :n].to(torch.uint8)
