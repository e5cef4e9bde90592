"""Quantized expert blobs: the blob layout, group-wise quantization, bit packing and dequantization.

Imports nothing from `offload` (the runtime depends on this package, never the reverse). The fused
CUDA kernel lives in `quant.triton_gemv` and is imported only by whoever asks for it.
"""

from .blob import BlobLayout
from .errors import UserError
from .expert import expert_forward, expert_layout, pack_expert, unpack_expert
from .quantize import QuantizedTensor, dequantize, quantize

__all__ = ["BlobLayout", "UserError", "QuantizedTensor", "quantize", "dequantize",
           "expert_layout", "pack_expert", "unpack_expert", "expert_forward"]
