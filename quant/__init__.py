"""Quantized expert blobs: the blob layout, group-wise quantization, bit packing and dequantization.

Imports nothing from `offload` (the runtime depends on this package, never the reverse). The fused
CUDA kernels live in `quant.triton_gemv`, imported on first use when triton is installed.
"""

from .blob import BlobLayout
from .errors import UserError
from .expert import expert_forward, expert_layout, experts_forward, pack_expert, unpack_expert
from .kernels import linear
from .quantize import QuantizedTensor, dequantize, quantize, quantized_nbytes, quantized_shapes

__all__ = ["BlobLayout", "UserError", "QuantizedTensor", "quantize", "dequantize",
           "quantized_shapes", "quantized_nbytes", "linear",
           "expert_layout", "pack_expert", "unpack_expert", "expert_forward", "experts_forward"]
