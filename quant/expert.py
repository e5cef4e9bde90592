"""Quantized Mixtral experts: one blob per expert (quant.blob layout), and its forward on any device.

# D hidden, F ffn, T tokens, G group size, B bits
An expert computes w2(silu(w1 x) * w3 x) with w1, w3 [F, D] and w2 [D, F]. Its quantized blob holds,
for each of w1, w2, w3 (rows = output features, quantized along the input dimension):

    {name}.q      uint8    [rows, pack.packed_length(cols, B)]   packed codes (quant.pack)
    {name}.scale  float16  [rows, cols / G]
    {name}.zero   float16  [rows, cols / G]                       weight = (code - zero) * scale

On CUDA, one token (batch-1 decode) goes through the fused dequantize + GEMV kernels of
`quant.triton_gemv`; on the CPU, up to 16 tokens go through the fused kernels of `quant.cpu_kernels`
(the whole expert in one call). Otherwise (a prefill, or no kernels) the forward dequantizes a block of
rows at a time and multiplies, so the temporary weights stay a few MB (the whole w1 would be 235 MB in
float32 for Mixtral-8x7B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels, mxfp4, sparse
from .blob import BlobLayout
from .errors import UserError
from .kernels import ROW_BLOCK_ELEMS, fused_kernels, use_fused
from .quantize import dequantize_parts, quantize, quantized_shapes

NAMES = ("w1", "w2", "w3")
GPU_ROW_BLOCK_ELEMS = 1 << 24  # on a GPU (prefill): 4 blocks of a Mixtral matrix, ~200 MB of float32 temporaries


def _shapes(hidden: int, ffn: int) -> dict[str, tuple[int, int]]:
    return {"w1": (ffn, hidden), "w2": (hidden, ffn), "w3": (ffn, hidden)}


def expert_layout(hidden: int, ffn: int, bits: int, group_size: int) -> BlobLayout:
    """The blob layout of a quantized expert with w1, w3 [F, D] and w2 [D, F]."""
    tensors = [(f"{name}.{part}", dtype, part_shape)
               for name, shape in _shapes(hidden, ffn).items()
               for part, (part_shape, dtype) in quantized_shapes(shape, bits, group_size).items()]
    return BlobLayout.build(tensors, kind="quant", bits=bits, group_size=group_size,
                            extra={"hidden": hidden, "ffn": ffn})


def pack_expert(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantize one expert's weights (w1, w3 [F, D], w2 [D, F]) into a new CPU uint8 blob."""
    ffn, hidden = w1.shape
    for name, w in zip(NAMES, (w1, w2, w3)):
        if tuple(w.shape) != _shapes(hidden, ffn)[name]:
            raise UserError(f"expert {name} has shape {tuple(w.shape)}, expected {_shapes(hidden, ffn)[name]} "
                            f"(w1, w3 [ffn, hidden] and w2 [hidden, ffn])")
    layout = expert_layout(hidden, ffn, bits, group_size)
    tensors = {}
    for name, w in zip(NAMES, (w1, w2, w3)):
        q = quantize(w, bits, group_size)
        tensors.update({f"{name}.{part}": t for part, t in q.parts.items()})
    return layout.pack(tensors)


def unpack_expert(layout: BlobLayout, blob: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The dequantized w1, w2, w3 of a blob, in `dtype` (for tests and inspection; the forward streams)."""
    views = layout.views(blob)
    return {name: _dequantize_rows(layout, views, name, 0, layout.record(f"{name}.q").shape[0], dtype)
            for name in NAMES}


def expert_forward(layout: BlobLayout, blob_views: dict[str, torch.Tensor], x: torch.Tensor,
                   fused: bool | None = None) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) for x [T, D], dequantizing on the fly on x's device; returns [T, D] in x's dtype.

    `fused` as in `quant.kernels.use_fused`: by default the Triton kernels run one token on CUDA; on the CPU
    the compiled kernels run when `quant.cpu_kernels.supports` the call."""
    if layout.kind == "mxfp4":
        return mxfp4.expert_forward(layout, blob_views, x, _row_block, fused)
    if layout.kind == sparse.KIND:
        return sparse.expert_forward(layout, blob_views, x)
    if layout.kind != "quant":
        raise UserError(f"expert_forward needs a quantized blob layout, got kind {layout.kind!r}")
    if use_fused(x, fused):
        return fused_kernels().expert_forward_fused(layout, blob_views, x)
    if cpu_kernels.supports(x, layout.bits, layout.group_size):
        return cpu_kernels.qexpert(x, blob_views, layout.bits, layout.group_size)

    def rows(name: str, r0: int, r1: int) -> torch.Tensor:
        return _dequantize_rows(layout, blob_views, name, r0, r1, x.dtype)

    ffn, hidden = blob_views["w1.scale"].shape[0], blob_views["w2.scale"].shape[0]
    step = _row_block(x, hidden)
    h = torch.cat([F.silu(x @ rows("w1", r, r + step).T) * (x @ rows("w3", r, r + step).T)  # [T, block of F]
                   for r in range(0, ffn, step)], dim=1)                                      # [T, F]
    step = _row_block(x, ffn)
    return torch.cat([h @ rows("w2", r, r + step).T for r in range(0, hidden, step)], dim=1)  # [T, D]


def experts_forward(layout: BlobLayout, blob_views: list[dict[str, torch.Tensor]],
                    xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """`expert_forward` of several experts of one layout, expert i on xs[i], with the same results: on the CPU,
    group-wise experts the compiled kernels take run in one call (`cpu_kernels.qexperts`: one thread region
    for all of them, where a fine-grained layer's 8 small experts would pay 8), the rest one by one."""
    if (layout.kind == "quant" and 1 < len(xs) <= cpu_kernels.MAX_GROUP
            and all(cpu_kernels.supports(x, layout.bits, layout.group_size) for x in xs)):
        return cpu_kernels.qexperts(xs, blob_views, layout.bits, layout.group_size)
    return [expert_forward(layout, v, x) for v, x in zip(blob_views, xs)]


def _row_block(x: torch.Tensor, cols: int) -> int:
    """Rows to dequantize at once: a few MB on the CPU; on a GPU larger blocks (each costs kernel launches),
    still bounded, since a whole Mixtral matrix in float32 temporaries would outgrow the planned workspace."""
    return max(1, (ROW_BLOCK_ELEMS if x.device.type == "cpu" else GPU_ROW_BLOCK_ELEMS) // cols)


def _dequantize_rows(layout: BlobLayout, views: dict[str, torch.Tensor], name: str, r0: int, r1: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Rows r0:r1 of weight `name` in `dtype`: [r1 - r0, cols]."""
    scale = views[f"{name}.scale"][r0:r1]
    cols = scale.shape[1] * layout.group_size
    return dequantize_parts(views[f"{name}.q"][r0:r1], scale, views[f"{name}.zero"][r0:r1], cols,
                            layout.bits, layout.group_size, dtype)
