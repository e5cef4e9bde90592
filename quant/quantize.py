"""Group-wise asymmetric quantization of a 2-D weight along its rows, and its inverse.

A weight W [out, in] is cut into groups of G consecutive input columns. Each group keeps a float16
scale s and a float16 zero point z (in code units); its values become codes q in [0, 2**bits):

    W[r, g*G + j]  ~  (q[r, g*G + j] - z[r, g]) * s[r, g]          codes packed with quant.pack

The (s, z) of each group are chosen without calibration data to minimise the squared error
||W - deq(q(W))||^2 of the group itself, as the fp16 values that are stored:

1. candidate ranges: the group's [min, max] shrunk around its centre by each factor in a small grid
   (clipping a few outliers buys resolution for all other values, which pays off at 2-3 bits);
2. from each candidate, a few rounds of Lloyd-style alternation: (a) round the codes given (s, z),
   (b) refit (s, z) in closed form by least squares given the codes (w ~ s*q + b is a line fit);
   each round cannot increase the error before the fp16 cast, and the cast is applied at every step
   so that what is compared is what will be stored;
3. a sweep of the zero point by fractions of a step around the best so far (which values sit near a
   grid point: a local search does not move them at 8 bits), then a polish of more rounds;
per group, the best (s, z) scored anywhere wins.

This is HQQ's setting (fp16 scale and zero per group, no data) with the L2 objective solved directly
rather than HQQ's proximal l_p updates of the zero point alone; tests/hqq_ref.py checks it against HQQ.
Rows are processed in chunks, so memory stays bounded for a whole Mixtral expert matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import pack as _pack
from .errors import UserError

# Shrink factors of the [min, max] range tried per group, by bit width: more clipping helps fewer bits.
SHRINK = {
    8: (1.0, 0.97, 0.94),
    4: (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7),
    3: (1.0, 0.94, 0.88, 0.82, 0.76, 0.7, 0.64, 0.58),
    2: (1.0, 0.92, 0.84, 0.76, 0.68, 0.6, 0.52, 0.44),
}
GRID_ROUNDS = 1     # rounds scored from each candidate range (1: the candidate itself)
POLISH_ROUNDS = 4   # refit rounds from the best candidate of each group
OFFSETS = 8         # shifts of the zero point tried, by fractions of a step, before the polish
CHUNK_ELEMS = 1 << 21  # values per row chunk: bounds the temporaries (~8 MB each in float32)


@dataclass(frozen=True)
class QuantizedTensor:
    """A 2-D weight as packed codes plus float16 scale and zero point per group of `group_size` columns."""

    q: torch.Tensor       # uint8 [out, pack.packed_length(in, bits)]
    scale: torch.Tensor   # float16 [out, in / group_size]
    zero: torch.Tensor    # float16 [out, in / group_size], in code units
    shape: tuple[int, int]
    bits: int
    group_size: int

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors by part name, as `quantized_shapes` names them (a blob or safetensors stores
        weight W as W.q, W.scale, W.zero)."""
        return {"q": self.q, "scale": self.scale, "zero": self.zero}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    @property
    def bits_per_param(self) -> float:
        """Storage bits per weight, codes (with any row padding), scales and zeros all counted."""
        return self.nbytes * 8 / (self.shape[0] * self.shape[1])


def quantized_shapes(shape: tuple[int, int], bits: int, group_size: int) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
    """The stored parts of a quantized weight [out, in]: {"q" | "scale" | "zero": (shape, dtype)}."""
    check_format(shape, bits, group_size)
    rows, cols = shape
    return {"q": ((rows, _pack.packed_length(cols, bits)), torch.uint8),
            "scale": ((rows, cols // group_size), torch.float16),
            "zero": ((rows, cols // group_size), torch.float16)}


def quantized_nbytes(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Bytes a weight [out, in] takes quantized (codes, scales and zeros)."""
    return sum(r * c * dt.itemsize for (r, c), dt in quantized_shapes(shape, bits, group_size).values())


def check_format(shape: tuple[int, ...], bits: int, group_size: int) -> None:
    """Refuse a (shape, bits, group size) combination this format cannot hold."""
    _pack.check_bits(bits)
    if len(shape) != 2:
        raise UserError(f"quantize expects a 2-D weight [out, in], got shape {tuple(shape)}")
    if group_size <= 0 or shape[1] % group_size:
        raise UserError(f"group size {group_size} does not divide the row length {shape[1]}")


def quantize(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Quantize weight [out, in] group-wise along rows to `bits` (8, 4, 3 or 2); calibration-free."""
    check_format(tuple(weight.shape), bits, group_size)
    out_f, in_f = weight.shape
    if not torch.isfinite(weight).all():
        raise UserError("the weight to quantize holds NaN or infinite values")
    groups_per_row = in_f // group_size
    rows_per_chunk = max(1, CHUNK_ELEMS // max(1, in_f))
    q_rows, scales, zeros = [], [], []
    for r in range(0, out_f, rows_per_chunk):
        w = weight[r:r + rows_per_chunk].to(torch.float32).reshape(-1, group_size)  # [rows * in/G, G]
        s, z, fitted = _fit_groups(w, bits)
        if not fitted.all():
            # Every candidate scale overflowed float16: the fallback (1, 0) it kept would store garbage.
            g = int((~fitted).flatten().nonzero()[0])
            lo, hi = float(w[g].min()), float(w[g].max())
            raise UserError(f"values too large for float16 scales: row {r + g // groups_per_row} of the weight to "
                            f"quantize has a group spanning {lo:.4g} .. {hi:.4g}, more than {bits}-bit codes with "
                            f"a float16 scale reach ({torch.finfo(torch.float16).max * ((1 << bits) - 1):.4g})")
        codes = _codes(w, s, z, bits).reshape(-1, in_f).to(torch.uint8)
        q_rows.append(_pack.pack(codes, bits))
        scales.append(s.reshape(-1, groups_per_row).to(torch.float16))
        zeros.append(z.reshape(-1, groups_per_row).to(torch.float16))
    return QuantizedTensor(torch.cat(q_rows), torch.cat(scales), torch.cat(zeros), (out_f, in_f), bits, group_size)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] that `q` stands for, in `dtype`, on q's device."""
    return dequantize_parts(q.q, q.scale, q.zero, q.shape[1], q.bits, q.group_size, dtype)


def dequantize_parts(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int,
                     bits: int, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of packed codes with their scales and zeros -> weight rows [rows, in_features] in `dtype`.

    Works on any row slice (the expert path dequantizes a chunk of rows at a time) and any device.
    The arithmetic is float32 whatever `dtype`: a bf16 zero point would be off by up to 1/32 of a step.
    """
    codes = _pack.unpack(packed, bits, in_features).to(torch.float32)
    codes = codes.unflatten(-1, (in_features // group_size, group_size))         # [rows, in/G, G]
    w = (codes - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return w.flatten(-2).to(dtype)


def _codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes of w [N, G] for per-group (s, z) [N, 1]: round(w / s + z) clipped to the code range."""
    return torch.addcmul(z, w, 1.0 / s).round_().clamp_(0, (1 << bits) - 1)


def _fit_groups(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) [N, 1], float32 values exactly representable in float16, for w [N, G], and
    whether each group found a candidate range whose scale float16 holds (where not, (s, z) mean nothing)."""
    qmax = (1 << bits) - 1
    n = w.shape[1]
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    # A scale floor keeps |z| = |lo| / s within fp16's exact-integer range, and constant groups valid.
    amax = torch.maximum(lo.abs(), hi.abs())
    floor = torch.where(amax > 0, amax / 1024, torch.ones_like(amax)).clamp_min(2 ** -24)
    sum_w, sum_ww = w.sum(1, keepdim=True), (w * w).sum(1, keepdim=True)
    stats = (n, sum_w, sum_ww, floor)

    best = [torch.full_like(lo, float("inf"), dtype=torch.float64), torch.ones_like(lo), torch.zeros_like(lo)]

    def keep_best(s, z, err):
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1], best[2] = torch.where(better, s, best[1]), torch.where(better, z, best[2])

    for shrink in SHRINK[bits]:
        s = (2 * half * shrink / qmax).clamp_min(floor)
        s, z = _to_fp16(s, (centre - half * shrink) / -s)
        for _ in range(GRID_ROUNDS):
            err, s_next, z_next = _refit(w, s, z, bits, stats)
            keep_best(s, z, err)
            s, z = s_next, z_next
    fitted = torch.isfinite(best[0])
    # Slide the grid by fractions of a step: moves which values sit near a grid point, which the
    # least-squares rounds (a local search) do not reach at 8 bits.
    s = best[1]
    for k in range(OFFSETS):
        z = (best[2] + (k + 0.5) / OFFSETS - 0.5).to(torch.float16).to(torch.float32)
        keep_best(s, z, _refit(w, s, z, bits, stats)[0])
    s, z = best[1], best[2]
    for _ in range(POLISH_ROUNDS):
        err, s_next, z_next = _refit(w, s, z, bits, stats)
        keep_best(s, z, err)
        s, z = s_next, z_next
    return best[1], best[2], fitted


def _refit(w, s, z, bits, stats):
    """One round from (s, z): round the codes, then refit (s, z) to them by least squares.

    Returns the squared error of the *input* (s, z) with its codes, from the sums the fit needs anyway
    (sum (w - s(q - z))^2 expanded in sum q, q^2, qw, w, w^2), and the refit (s, z) as fp16 values.
    The refit is the line w ~ a*q + b; its zero z = -b/a is cast to fp16 first (at 8 bits fp16 holds z
    to 1/8 of a code), then the scale is refit by least squares for that stored zero and cast too.
    """
    n, sum_w, sum_ww, floor = stats
    q = _codes(w, s, z, bits)
    sum_q = q.sum(1, keepdim=True)
    sum_qq = (q * q).sum(1, keepdim=True)
    sum_qw = (q * w).sum(1, keepdim=True)
    # In float64: the terms nearly cancel at 8 bits, where the error is ~1e-5 of sum w^2.
    s64, c64 = s.double(), (s * z).double()
    err = (sum_ww.double() + s64 * s64 * sum_qq.double() + n * c64 * c64 - 2 * s64 * sum_qw.double()
           + 2 * c64 * sum_w.double() - 2 * s64 * c64 * sum_q.double())
    var = n * sum_qq - sum_q * sum_q                          # n^2 times the variance of the codes
    fit = var > 0                                             # all-equal codes: keep (s, z)
    a = torch.where(fit, (n * sum_qw - sum_q * sum_w) / torch.where(fit, var, 1.0), s).clamp_min(floor)
    new_z = torch.where(fit, (a * sum_q - sum_w) / (n * a), z).to(torch.float16).to(torch.float32)
    # Scale for the stored zero: minimise sum (w - s (q - z))^2 over s alone.
    num = sum_qw - new_z * sum_w
    den = sum_qq - 2 * new_z * sum_q + n * new_z * new_z
    ok = fit & (den > 0) & (num > 0)
    new_s = torch.where(ok, num / torch.where(ok, den, 1.0), a).clamp_min(floor)
    return err, new_s.to(torch.float16).to(torch.float32), new_z


def _to_fp16(s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round (s, z) to the float16 values that will be stored, kept as float32."""
    return s.to(torch.float16).to(torch.float32), z.to(torch.float16).to(torch.float32)
