"""The converted-folder format that `moe-offload convert` writes and the runtime reads.

    config.json, tokenizer files      copied from the source
    model.safetensors                 every dense tensor (attention, norms, routers, embeddings, lm_head), fp16;
                                      with --dense-bits 8|4 each attention projection W is stored quantized
                                      instead, as W.q (uint8 codes), W.scale and W.zero (fp16), group 64
    experts.bin                       a file header, then one quantized (or sparse) blob per expert at a fixed stride, in
                                      (layer, expert) order: one pread moves one whole expert
    moe_offload.json                  how it was made (source, its fingerprint, bits, group sizes, dense bits,
                                      and with --sparse the target, chunk bits and calibration), written last

experts.bin: bytes [0, 4096) hold MAGIC, a version and a JSON index (layers, experts, stride, blob bytes);
"layers" counts the layers that have experts (a model's dense layers have none), and the blob of expert e
of the i-th of them starts at 4096 + (i * E + e) * stride and begins with its own BlobLayout header.

This file holds the format's constants and readers (and the experts.bin header writer); the writing
itself is offload/convert.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import quant
from quant.blob import is_count
from quant.errors import UserError

from .checkpoint import Checkpoint

INFO_FILE = "moe_offload.json"
EXPERTS_FILE = "experts.bin"
FORMAT = "moe-offload-quantized-experts"
MAGIC = b"MOEXPRTS"
FILE_VERSION = 1
FILE_HEADER = 4096
STRIDE_ALIGN = 4096  # blobs on page boundaries: aligned reads, O_DIRECT-friendly
BITS = (8, 4, 3, 2, "mxfp4")  # group-wise integer bits, or MXFP4 (quant/mxfp4.py; group 32)
DENSE_BITS = (16, 8, 4)
# Attention projections are quantized in groups of 64 whatever the experts use: every Mixtral-class
# attention dimension is a multiple of 64, and 64 keeps fp16 scale + zero at 0.5 bits per weight.
DENSE_GROUP_SIZE = 64
SPARSE_CHUNK_BITS = (16, 8, 4, 3, 2)  # --sparse: a neuron chunk float16 or group-wise (quant/sparse.py)
PARTIAL_MARKER = ".moe-offload-partial"  # in DST.partial/ from its mkdir on: proof that convert made the folder
# Copied as they are. The routing prior (offload/store/prior.py) too: quantized experts shift the routing a
# little, not which experts follow which tokens, so the copy still starts the cache policy warm.
COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
          "special_tokens_map.json", "tokenizer.model", "routing-prior.safetensors")



def read_info(folder: Path) -> dict | None:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{path}: not a moe-offload conversion record")
    # The fields the reader acts on, each what this build writes and reads.
    for field, allowed in (("version", (FILE_VERSION,)), ("bits", BITS), ("dense_bits", DENSE_BITS),
                           ("experts_file", (EXPERTS_FILE,))):
        value = info.get(field, 16 if field == "dense_bits" else None)
        if isinstance(value, bool) or value not in allowed:
            raise UserError(f"{path}: field '{field}' is {json.dumps(value)}; this build reads "
                            f"{' or '.join(json.dumps(a) for a in allowed)}")
    sizes = ("group_size", "dense_group_size") if info.get("dense_bits", 16) != 16 else ("group_size",)
    for field in sizes:
        if not is_count(info.get(field)) or not info[field]:
            raise UserError(f"{path}: field '{field}' must be a positive integer, got {json.dumps(info.get(field))}")
    sparse = info.get("sparse")
    if sparse is not None:
        target = sparse.get("target") if isinstance(sparse, dict) else None
        if (not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 <= target < 1
                or sparse.get("chunk_bits") not in SPARSE_CHUNK_BITS or info["bits"] == "mxfp4"):
            raise UserError(f"{path}: field 'sparse' is {json.dumps(sparse)}; this build reads a target in [0, 1) "
                            f"and chunk_bits {' or '.join(map(str, SPARSE_CHUNK_BITS))} over group-wise bits")
    return info


def dense_format(info: dict | None) -> tuple[int, int] | None:
    """(bits, group size) of the attention projections of a converted folder; None when they are plain fp16."""
    if not info or info.get("dense_bits", 16) == 16:
        return None
    return int(info["dense_bits"]), int(info["dense_group_size"])


def stored_shapes(shapes: dict[str, tuple[int, ...]], quantized: set[str] | dict,
                  fmt: tuple[int, int] | None) -> dict[str, tuple[int, ...]]:
    """`shapes` as a converted folder stores them: with a dense format, each weight W named in `quantized`
    as W.q, W.scale and W.zero (quant.quantized_shapes)."""
    if fmt is None:
        return dict(shapes)
    out = {}
    for name, shape in shapes.items():
        if name in quantized:
            out.update({f"{name}.{part}": s for part, (s, _) in quant.quantized_shapes(shape, *fmt).items()})
        else:
            out[name] = shape
    return out


def read_quantized(ckpt: Checkpoint, name: str, shape: tuple[int, int], fmt: tuple[int, int],
                   device) -> quant.QuantizedTensor:
    """The quantized weight `name` [shape] of a converted folder (stored as name.q/.scale/.zero), on `device`."""
    parts = {}
    for part, (_, dtype) in quant.quantized_shapes(shape, *fmt).items():
        loc = ckpt.locations[f"{name}.{part}"]
        if loc.dtype != dtype:
            raise UserError(f"{loc.file}: tensor {name}.{part} is {loc.dtype}, a {fmt[0]}-bit weight stores {dtype}")
        parts[part] = ckpt.read(f"{name}.{part}", device=device)
    return quant.QuantizedTensor(parts["q"], parts["scale"], parts["zero"], shape, *fmt)


def write_experts_header(f, layers: int, experts: int, stride: int, blob_bytes: int) -> None:
    body = json.dumps({"layers": layers, "experts": experts, "stride": stride, "blob_bytes": blob_bytes}).encode()
    raw = MAGIC + struct.pack("<II", FILE_VERSION, len(body)) + body
    f.write(raw + b"\x00" * (FILE_HEADER - len(raw)))


def read_experts_header(path: Path) -> dict:
    """Check experts.bin's header and size; the index dict."""
    try:
        with open(path, "rb") as f:
            raw = f.read(FILE_HEADER)
        size = path.stat().st_size
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) < 16 or raw[:8] != MAGIC:
        raise UserError(f"{path}: not a moe-offload experts file (bad magic)")
    version, n = struct.unpack_from("<II", raw, 8)
    if version != FILE_VERSION:
        raise UserError(f"{path}: experts file version {version} is not supported (this build reads {FILE_VERSION})")
    try:
        index = json.loads(raw[16:16 + n])
    except ValueError as exc:
        raise UserError(f"{path}: corrupt experts header ({exc})") from None
    for key in ("layers", "experts", "stride", "blob_bytes"):
        value = index.get(key) if isinstance(index, dict) else None
        if not is_count(value):
            raise UserError(f"{path}: corrupt experts header ('{key}' must be a non-negative integer, got {value!r})")
    need = FILE_HEADER + index["layers"] * index["experts"] * index["stride"]
    if size != need:
        raise UserError(f"{path}: is {size} bytes, its header implies {need} (truncated or corrupt)")
    return index
