"""Sparse experts (FloE): the up projection moves whole, the gate and down weights one neuron at a time.

# T tokens, D hidden, F ffn, n active neurons, C bytes per neuron chunk, G group size
A SwiGLU expert computes w2(silu(w1 x) * w3 x) (w1 gate, w3 up [F, D]; w2 down [D, F]). Its sparse form:

    v = w3 x                                   # [T, F], the up projection (group-wise quantized)
    neuron i is active for token t  iff  |v[t, i]| > thr           (thr: the expert's calibrated threshold)
    y = w2[:, A] (silu(w1[A] x) * v[A])         # over the active neurons A only

so the sparse model is defined by the thresholds alone. The blob (kind "sparse"):

    thr      float32 [1]                        the expert's threshold
    w3.q, w3.scale, w3.zero                     the up projection, as quant.quantize stores it (`bits`, `group_size`)
    chunks   uint8   [F, C]                     neuron i's gate row w1[i] and down column w2[:, i], one chunk

Everything before `chunks` is the blob's base: a device slot that holds the base and the chunks of some
neurons can compute every token whose active neurons it holds (offload/store/partial.py). A chunk is the
row [w1[i], w2[:, i]] of 2D values, either float16 (`chunk_bits` 16) or quantized group-wise along it
(`chunk_bits` 8/4/3/2, groups of `chunk_group` values, never straddling the gate/down border):

    codes uint8 [P] (P = pack.packed_length(2D, bits), padded to even) | scale fp16 [2D/G] | zero fp16 [2D/G]

The compute below reads only the base and the chunks of the active neurons: `active_neurons` decides
which, from the up projection; `forward_active` reads them (from a whole blob, or a device slot), in ascending
neuron order, with dropped (token, neuron) pairs multiplied by zero. What is computed therefore depends on
x and the thresholds only, never on which chunks a slot happened to hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import pack as _pack
from .blob import BlobLayout
from .errors import UserError
from .kernels import ROW_BLOCK_ELEMS, linear
from .quantize import QuantizedTensor, dequantize_parts, quantize, quantized_shapes

KIND = "sparse"
CHUNK_BITS = (16, 8, 4, 3, 2)
CHUNK_ALIGN = 16   # bytes: chunk rows start 16-byte aligned in every tier (the scale view needs 2)


def _codes_nbytes(hidden: int, chunk_bits: int) -> int:
    n = _pack.packed_length(2 * hidden, chunk_bits)
    return n + (n & 1)  # float16 scales follow: keep them 2-byte aligned


def chunk_nbytes(hidden: int, chunk_bits: int, chunk_group: int) -> int:
    """Bytes of one neuron's chunk (gate row and down column, 2D values), padded to CHUNK_ALIGN."""
    if chunk_bits == 16:
        n = 4 * hidden
    else:
        n = _codes_nbytes(hidden, chunk_bits) + 2 * 2 * (2 * hidden // chunk_group)
    return -(-n // CHUNK_ALIGN) * CHUNK_ALIGN


def check_format(hidden: int, ffn: int, bits: int, group_size: int, chunk_bits: int, chunk_group: int) -> None:
    """Refuse a combination the sparse blob cannot hold, naming the option."""
    quantized_shapes((ffn, hidden), bits, group_size)  # the up projection's format
    if chunk_bits not in CHUNK_BITS:
        raise UserError(f"--chunk-bits must be one of {', '.join(map(str, CHUNK_BITS))}, got {chunk_bits}")
    if chunk_bits != 16 and (chunk_group <= 0 or hidden % chunk_group):
        raise UserError(f"the chunk group size {chunk_group} does not divide hidden_size {hidden} (a chunk's gate "
                        f"row and down column are quantized in groups that must not straddle them)")


def sparse_layout(hidden: int, ffn: int, bits: int, group_size: int, chunk_bits: int,
                  chunk_group: int) -> BlobLayout:
    """The blob layout of a sparse expert: threshold, up projection at `bits`, then F neuron chunks."""
    check_format(hidden, ffn, bits, group_size, chunk_bits, chunk_group)
    C = chunk_nbytes(hidden, chunk_bits, chunk_group)
    tensors = [("thr", torch.float32, (1,))]
    tensors += [(f"w3.{part}", dtype, shape)
                for part, (shape, dtype) in quantized_shapes((ffn, hidden), bits, group_size).items()]
    tensors.append(("chunks", torch.uint8, (ffn, C)))
    return BlobLayout.build(tensors, kind=KIND, bits=bits, group_size=group_size,
                            extra={"hidden": hidden, "ffn": ffn, "chunk_bits": chunk_bits,
                                   "chunk_group": chunk_group if chunk_bits != 16 else 0, "chunk_nbytes": C})


def base_nbytes(layout: BlobLayout) -> int:
    """Bytes before the chunks (header, threshold, up projection): what every use of the expert needs."""
    return layout.record("chunks").offset


def pack_chunks(w1: torch.Tensor, w2: torch.Tensor, layout: BlobLayout) -> torch.Tensor:
    """The neuron-major chunks [F, C] uint8 of gate w1 [F, D] and down w2 [D, F]."""
    D, cb, G, C = (layout.extra[k] for k in ("hidden", "chunk_bits", "chunk_group", "chunk_nbytes"))
    rows = torch.cat([w1.float(), w2.float().T], dim=1)  # [F, 2D]: neuron i's gate row, then its down column
    out = torch.zeros(rows.shape[0], C, dtype=torch.uint8)
    if cb == 16:
        out[:, :4 * D] = rows.to(torch.float16).view(torch.uint8)
        return out
    q = quantize(rows, cb, G)
    P, n = _codes_nbytes(D, cb), 2 * D // G
    out[:, :q.q.shape[1]] = q.q
    out[:, P:P + 2 * n] = q.scale.view(torch.uint8)
    out[:, P + 2 * n:P + 4 * n] = q.zero.view(torch.uint8)
    return out


def pack_sparse(w1: torch.Tensor, w2: torch.Tensor, up: QuantizedTensor, threshold: float,
                layout: BlobLayout) -> torch.Tensor:
    """One expert's sparse blob (a new CPU uint8 tensor) from its gate w1 [F, D], down w2 [D, F], quantized up
    projection `up` and calibrated threshold."""
    D, Fn = layout.extra["hidden"], layout.extra["ffn"]
    if tuple(w1.shape) != (Fn, D) or tuple(w2.shape) != (D, Fn) or up.shape != (Fn, D):
        raise UserError(f"expert shapes {tuple(w1.shape)}, {tuple(w2.shape)}, {up.shape} do not match the sparse "
                        f"layout (w1, w3 [{Fn}, {D}], w2 [{D}, {Fn}])")
    return layout.pack({"thr": torch.tensor([threshold], dtype=torch.float32),
                        **{f"w3.{part}": t for part, t in up.parts.items()},
                        "chunks": pack_chunks(w1, w2, layout)})


def chunk_weights(layout: BlobLayout, chunks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks [n, C] -> (gate rows [n, D], down columns [n, D]) in `dtype`, on the chunks' device."""
    D, cb, G = (layout.extra[k] for k in ("hidden", "chunk_bits", "chunk_group"))
    if cb == 16:
        rows = chunks[:, :4 * D].view(torch.float16).to(dtype)
    else:
        P, n = _codes_nbytes(D, cb), 2 * D // G
        rows = dequantize_parts(chunks[:, :P], chunks[:, P:P + 2 * n].view(torch.float16),
                                chunks[:, P + 2 * n:P + 4 * n].view(torch.float16), 2 * D, cb, G, dtype)
    return rows[:, :D], rows[:, D:]


def up_projection(layout: BlobLayout, views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """v = w3 x: [T, F] in x's dtype, through the quantized kernels where they take x, else a row block of
    the dequantized up projection at a time."""
    q, scale, zero = views["w3.q"], views["w3.scale"], views["w3.zero"]
    Fn, D = layout.extra["ffn"], layout.extra["hidden"]
    if x.shape[0] <= 16:
        return linear(x, QuantizedTensor(q, scale, zero, (Fn, D), layout.bits, layout.group_size))
    step = max(1, ROW_BLOCK_ELEMS // D)
    return torch.cat([F.linear(x, dequantize_parts(q[r:r + step], scale[r:r + step], zero[r:r + step], D,
                                                   layout.bits, layout.group_size, x.dtype))
                      for r in range(0, Fn, step)], dim=1)


def active_neurons(layout: BlobLayout, views: dict[str, torch.Tensor],
                   x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The up projection v [T, F], which (token, neuron) pairs are active (mask [T, F], |v| > thr) and the
    neurons active for any token (idx [n], ascending, on x's device). Finding idx's length syncs with the
    device (it has a data-dependent shape): a partial copy needs it on the host anyway."""
    v = up_projection(layout, views, x)
    mask = v.float().abs() > views["thr"].to(x.device)
    return v, mask, mask.any(0).nonzero().flatten()


def forward_active(layout: BlobLayout, x: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
    """y = w2[:, A] (silu(w1[A] x) * v[A]) for x [T, D], reading the chunks of the neurons idx [n] (ascending) from
    the chunk rows [F, C] of a blob or device slot, each (token, neuron) pair that is not active multiplied by
    zero; [T, D] in x's dtype. A block of neurons at a time (ROW_BLOCK_ELEMS gate and down values): the dequantized
    weights stay within the workspace the memory plan reserves for quantized experts, however many are active;
    the blocks depend on idx alone, so the result does too."""
    if idx.numel() == 0:
        return torch.zeros_like(x)
    step = max(1, ROW_BLOCK_ELEMS // (2 * layout.extra["hidden"]))
    y = None
    for r in range(0, idx.numel(), step):
        block = idx[r:r + step]                                                      # [b]
        gate, down = chunk_weights(layout, rows.index_select(0, block), x.dtype)     # [b, D] each
        h = F.silu(F.linear(x, gate)) * (v[:, block] * mask[:, block].to(v.dtype))  # [T, b]
        # down.T made contiguous: with every neuron active (in one block) this is the dense F.linear(h, w2) call.
        part = F.linear(h, down.T.contiguous())                                      # [T, D]
        y = part if y is None else y.add_(part)
    return y


def expert_forward(layout: BlobLayout, views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The sparse expert on x [T, D] from a whole blob: reads the base and the active neurons' chunks only."""
    if layout.kind != KIND:
        raise UserError(f"sparse expert_forward needs a sparse blob layout, got kind {layout.kind!r}")
    v, mask, idx = active_neurons(layout, views, x)
    return forward_active(layout, x, v, mask, idx, views["chunks"])


def unpack_sparse(layout: BlobLayout, blob: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict:
    """A blob's threshold and its dequantized w1, w2, w3 (for tests and dense references)."""
    views = layout.views(blob)
    Fn, D = layout.extra["ffn"], layout.extra["hidden"]
    gate, down = chunk_weights(layout, views["chunks"], dtype)
    w3 = dequantize_parts(views["w3.q"], views["w3.scale"], views["w3.zero"], D, layout.bits, layout.group_size,
                          dtype)
    assert w3.shape == (Fn, D)
    return {"thr": float(views["thr"][0]), "w1": gate, "w2": down.T.contiguous(), "w3": w3}
