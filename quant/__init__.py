"""Quantized expert blobs: the blob layout, group-wise quantization, bit packing and dequantization.

Imports nothing from `offload` (the runtime depends on this package, never the reverse).
"""

from .blob import BlobLayout
from .errors import UserError

__all__ = ["BlobLayout", "UserError"]
