"""The formats layer: folders on disk, read and checked without knowing the runtime or any model family.

    checkpoint.py   a Hugging Face model folder: config.json, safetensors headers, tensors read on demand
    converted.py    the folder `moe-offload convert` writes: experts.bin of quantized blobs, moe_offload.json

Imports quant only (the blob layout, file helpers, the error type).
"""
