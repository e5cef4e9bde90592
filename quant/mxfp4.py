"""MXFP4 expert blobs: weights as the OCP microscaling format stores them (gpt-oss ships its experts so).

# R rows (output features), C cols (input features), D hidden, F ffn, T tokens
A weight [R, C] is cut along C into blocks of 32 values. Each value is a 4-bit E2M1 float (sign, 2 exponent
bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), two per byte (the even column in the
low nibble); each block has one E8M0 scale, a power of two stored as its biased exponent (value 2^(s-127)):

    {name}.blocks  uint8  [R, C / 32, 16]     the Hub's `*_blocks` layout, one expert's slice
    {name}.scales  uint8  [R, C / 32]         the Hub's `*_scales`

4.25 bits per weight, read, kept and copied as they are; only compute widens them. A blob of kind "mxfp4"
holds either a SwiGLU expert (w1, w2, w3: `convert --bits mxfp4` from any family) or a gpt-oss expert
(gate_up [2F, D] with gate and up rows interleaved, down [D, F], and their biases `{name}.bias`, whose
activation is the clamped SwiGLU below); the header's `extra["ffn"]` says which ("swiglu" | "gpt_oss").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .blob import BlobLayout
from .errors import UserError

BLOCK = 32  # values per scale
# E2M1 code -> value: the low three bits index the magnitudes, the high bit is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
GPT_OSS_ALPHA = 1.702


def clamped_swiglu(gate_up: torch.Tensor, limit: float, alpha: float = GPT_OSS_ALPHA) -> torch.Tensor:
    """gpt-oss's activation of gate_up [T, 2F] (gate and up interleaved: even and odd columns) -> [T, F]:
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit), as transformers orders it."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [R, C/32, 16] and scales uint8 [R, C/32] -> weights [R, C] in `dtype`, exactly as
    transformers' convert_moe_packed_tensors computes them (a table lookup per nibble, then ldexp)."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    R, G, B = blocks.shape
    out = torch.empty(R, G, 2 * B, dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).int()]
    out[..., 1::2] = lut[(blocks >> 4).int()]
    torch.ldexp(out, (scales.int() - SCALE_BIAS)[..., None], out=out)
    return out.view(R, G * 2 * B)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] (C a multiple of 32) -> (blocks [R, C/32, 16], scales [R, C/32]), rounded as the reference
    quantizer (triton_kernels' downcast_to_mxfp_torch, which transformers and gpt-oss use) rounds a bfloat16
    weight: each block's scale is its largest magnitude / 6 rounded up to a power of two; each value, divided
    by it, goes to the nearest E2M1 value (ties away from zero), saturating at 6."""
    R, C = w.shape
    if C % BLOCK:
        raise UserError(f"MXFP4 needs rows that are a multiple of {BLOCK} values, got {C}")
    src = w.to(torch.bfloat16).float().view(R, C // BLOCK, BLOCK)
    scale = (src.abs().amax(dim=-1, keepdim=True) / 6.0).view(torch.int32)
    scale = (scale + 0x007FFFFF) & 0x7F800000                                   # round up to a power of two
    step = scale.view(torch.float32)
    q = (src * torch.where(step == 0, torch.zeros_like(step), 1.0 / step)).view(torch.int32)
    sign = (q >> 28) & 0x8                                                      # the sign bit, as bit 3
    exponent = (q >> 23) & 0xFF
    mantissa = q & 0x7FFFFF
    # Below 1 (biased exponent < 127) E2M1 is subnormal: put the implicit bit into the mantissa and shift.
    small = exponent < SCALE_BIAS
    shift = (SCALE_BIAS - 1 - exponent).clamp(min=0, max=31)
    mantissa = torch.where(small, (0x400000 | (mantissa >> 1)) >> shift, mantissa)
    exponent = exponent.clamp(min=SCALE_BIAS - 1) - (SCALE_BIAS - 1)
    # Two exponent bits and one mantissa bit plus the next bit; +1 then >> 1 rounds, min saturates at 6.
    code = ((((exponent << 2) | (mantissa >> 21)) + 1) >> 1).clamp(max=0x7) | sign
    code = code.to(torch.uint8).view(R, C // BLOCK, BLOCK // 2, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return blocks.contiguous(), (scale.view(R, C // BLOCK) >> 23).to(torch.uint8)


def weight_records(name: str, rows: int, cols: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The blob records of one MXFP4 weight [rows, cols]."""
    if cols % BLOCK:
        raise UserError(f"MXFP4 weight {name} has rows of {cols} values, not a multiple of {BLOCK}")
    return [(f"{name}.blocks", torch.uint8, (rows, cols // BLOCK, BLOCK // 2)),
            (f"{name}.scales", torch.uint8, (rows, cols // BLOCK))]


def expert_layout(hidden: int, ffn: int, gpt_oss: dict | None = None,
                  bias_dtype: torch.dtype = torch.float32) -> BlobLayout:
    """The MXFP4 blob of a SwiGLU expert (w1, w3 [F, D], w2 [D, F]), or with `gpt_oss` ({"swiglu_limit",
    "swiglu_alpha"}) of a gpt-oss expert (gate_up [2F, D], down [D, F] and their biases in `bias_dtype`)."""
    if gpt_oss is None:
        tensors = (weight_records("w1", ffn, hidden) + weight_records("w2", hidden, ffn)
                   + weight_records("w3", ffn, hidden))
        extra = {"ffn": "swiglu"}
    else:
        tensors = (weight_records("gate_up", 2 * ffn, hidden) + [("gate_up.bias", bias_dtype, (2 * ffn,))]
                   + weight_records("down", hidden, ffn) + [("down.bias", bias_dtype, (hidden,))])
        extra = {"ffn": "gpt_oss", "swiglu_limit": float(gpt_oss["swiglu_limit"]),
                 "swiglu_alpha": float(gpt_oss["swiglu_alpha"])}
    return BlobLayout.build(tensors, kind="mxfp4", bits=4, group_size=BLOCK,
                            extra={"hidden": hidden, "ffn_size": ffn, **extra})


def pack_expert(weights: dict[str, torch.Tensor], layout: BlobLayout) -> torch.Tensor:
    """A new CPU uint8 blob of `layout` from float weights by name (w1, w2, w3; or gate_up [2F, D], down
    [D, F] and the biases gate_up.bias, down.bias), quantized here."""
    tensors = {}
    for name, w in weights.items():
        if name.endswith(".bias"):
            tensors[name] = w
        else:
            tensors[f"{name}.blocks"], tensors[f"{name}.scales"] = quantize(w)
    return layout.pack(tensors)


def weight(views: dict[str, torch.Tensor], name: str, dtype: torch.dtype, r0: int = 0,
           r1: int | None = None) -> torch.Tensor:
    """Rows r0:r1 (default all) of weight `name` of a blob's views, dequantized: [rows, cols] in `dtype`."""
    return dequantize(views[f"{name}.blocks"][r0:r1], views[f"{name}.scales"][r0:r1], dtype)


def _linear(x: torch.Tensor, views: dict[str, torch.Tensor], name: str, row_block, bias: bool = False) -> torch.Tensor:
    """x [T, C] @ W.T (+ its bias) for MXFP4 weight `name` [R, C]: on the CPU through quant.cpu_kernels' fused
    kernel (1..16 tokens), else dequantized `row_block(x, C)` rows at a time, so the temporary stays a few MB
    (the store's memory plan budgets one block, quant/expert.py's size)."""
    rows, cols = views[f"{name}.scales"].shape[0], views[f"{name}.scales"].shape[1] * BLOCK
    b = views[f"{name}.bias"].to(x.dtype) if bias else None
    if cpu_kernels.supports_mxfp4(x):  # the CPU's fused kernel: codes stay packed
        y = cpu_kernels.mxfp4_matmul(x, views[f"{name}.blocks"].view(rows, -1), views[f"{name}.scales"])
        return y if b is None else y + b
    step = row_block(x, cols)
    return torch.cat([F.linear(x, weight(views, name, x.dtype, r, r + step), None if b is None else b[r:r + step])
                      for r in range(0, rows, step)], dim=1)


def expert_forward(layout: BlobLayout, views: dict[str, torch.Tensor], x: torch.Tensor, row_block,
                   fused: bool | None = None) -> torch.Tensor:
    """The expert of an MXFP4 blob on x [T, D] -> [T, D] in x's dtype, on x's device (quant.expert_forward
    calls it, with its `row_block` rule). One CUDA token runs the fused dequantize + GEMV kernels
    (quant/triton_gemv.py), CPU tokens the fused C kernel (quant/cpu_kernels.c); otherwise weights are
    dequantized a block of rows at a time, then multiplied."""
    from .kernels import fused_kernels, use_fused

    if layout.kind != "mxfp4":
        raise UserError(f"an MXFP4 expert needs a blob of kind 'mxfp4', got {layout.kind!r}")
    if use_fused(x, fused):
        return fused_kernels().mxfp4_expert_forward(layout, views, x, clamped_swiglu)
    if layout.extra.get("ffn") == "gpt_oss":
        gate_up = _linear(x, views, "gate_up", row_block, bias=True)                          # [T, 2F]
        h = clamped_swiglu(gate_up, layout.extra["swiglu_limit"], layout.extra["swiglu_alpha"])  # [T, F]
        return _linear(h, views, "down", row_block, bias=True)
    h = F.silu(_linear(x, views, "w1", row_block)) * _linear(x, views, "w3", row_block)  # [T, F]
    return _linear(h, views, "w2", row_block)
