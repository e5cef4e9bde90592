"""A quantized weight meeting its input: x @ W.T, dequantized where it runs.

# T tokens, K input features, N output features
On CUDA, for one token (batch-1 decode), the fused Triton kernels of `quant.triton_gemv` read the packed
codes once and dequantize them in registers: the weight's bytes are read at ~4.5 bits instead of 16.
On the CPU, up to 16 tokens go through the compiled kernels of `quant.cpu_kernels`, which do the same
there. Everywhere else (a prefill of many tokens, a machine without triton or a C compiler) torch
dequantizes the weight and multiplies; on a GPU the temporary comes from the caching allocator and is reused.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .errors import UserError
from .quantize import QuantizedTensor, dequantize

# Weights dequantized at once where no fused kernel takes the input (8 MB in float32 on the CPU): the torch
# paths of quantized experts (quant/expert.py) and sparse experts (quant/sparse.py) go a block of rows at a time.
ROW_BLOCK_ELEMS = 1 << 21


@functools.cache
def fused_kernels():
    """The module `quant.triton_gemv` when triton imports, else None (the torch path is used)."""
    try:
        from . import triton_gemv
    except (ImportError, RuntimeError):
        return None
    return triton_gemv


def use_fused(x: torch.Tensor, fused: bool | None = None) -> bool:
    """Whether x [T, K] goes through the fused kernels. None: when x is one token on CUDA and triton is
    present; True: always (Triton's CPU interpreter runs them on CPU tensors, for tests); False: never."""
    if fused is None:
        return x.is_cuda and x.shape[0] == 1 and fused_kernels() is not None
    if fused:
        if x.shape[0] != 1:
            raise ValueError(f"the fused kernels take one token, got {x.shape[0]}")
        if fused_kernels() is None:
            raise UserError("the fused quantized kernels need triton, which is not installed")
    return fused


def linear(x: torch.Tensor, w: QuantizedTensor, fused: bool | None = None) -> torch.Tensor:
    """x [T, K] @ W.T for a quantized W [N, K] on x's device: [T, N] in x's dtype."""
    if use_fused(x, fused):
        y = fused_kernels().dequant_gemv(w.q, w.scale, w.zero, x[0], w.bits, w.group_size)  # float32 [N]
        return y.to(x.dtype)[None]
    if cpu_kernels.supports(x, w.bits, w.group_size):
        return cpu_kernels.qmatmul(x, w.q, w.scale, w.zero, w.bits, w.group_size)
    return F.linear(x, dequantize(w, x.dtype))
