"""One expert = one contiguous, aligned blob: a small self-describing header, then every tensor of the expert.

This is the single definition of the blob layout, shared by plain (fp16/bf16/fp32) experts read from a
checkpoint and by quantized experts written by `moe-offload convert`. One read from disk and one copy
to the GPU move a whole expert.

    offset 0                 header (magic, version, JSON layout), zero-padded to HEADER_ALIGN
    offset header_nbytes     tensor 0 (e.g. w1 or w1.q), each starting at a multiple of TENSOR_ALIGN
    ...                      tensor n-1
    total nbytes             padded to TENSOR_ALIGN

The header's JSON holds: format version, kind ("dense" | "quant"), bits, group size, and one record per
tensor (name, dtype, shape, offset, nbytes). Every expert of a model has the same layout, so the header
bytes are identical across experts and a reader checks each blob by comparing its header bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import torch

from .errors import UserError

MAGIC = b"MOEBLOB\x00"
VERSION = 1
HEADER_ALIGN = 256   # payload starts here, so GPU loads of the first tensor are aligned
TENSOR_ALIGN = 256   # every tensor starts at a multiple of this (>= the 128-byte line CUDA likes)
_PREFIX = struct.Struct("<8sII")  # magic, version, json length

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def is_count(x) -> bool:
    """A size, offset or count read from a JSON header: a non-negative integer (not a bool, a float or a
    string). The one check for every header the project reads (blobs, experts.bin, safetensors, configs)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def is_positive_number(x) -> bool:
    """A positive, finite JSON number (an epsilon, a rope theta): not a bool (JSON `true` is a Python int), a
    string or NaN."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # from the start of the blob
    nbytes: int


@dataclass(frozen=True)
class BlobLayout:
    """Where each tensor of an expert lives inside its blob; identical for every expert of a model."""

    records: tuple[TensorRecord, ...]
    nbytes: int                 # whole blob, header included
    kind: str = "dense"         # "dense": w1/w2/w3 as they are; "quant": packed codes + scales + zeros
    bits: int = 16
    group_size: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def build(cls, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], kind: str = "dense",
              bits: int = 16, group_size: int = 0, extra: dict | None = None) -> "BlobLayout":
        """Lay out named tensors (name, dtype, shape) one after another, each aligned."""
        extra = dict(extra or {})
        # The header length depends on the offsets, which depend on the header length: two passes settle it.
        header = HEADER_ALIGN
        for _ in range(4):
            records, off = [], header
            for name, dtype, shape in tensors:
                shape = tuple(int(s) for s in shape)
                n = DTYPES[DTYPE_NAMES[dtype]].itemsize
                for s in shape:
                    n *= s
                records.append(TensorRecord(name, DTYPE_NAMES[dtype], shape, off, n))
                off = _align(off + n, TENSOR_ALIGN)
            layout = cls(tuple(records), off, kind, bits, group_size, extra)
            needed = _align(len(layout._json()) + _PREFIX.size, HEADER_ALIGN)
            if needed == header:
                return layout
            header = needed
        raise AssertionError("blob header size did not settle")

    @classmethod
    def dense(cls, hidden: int, ffn: int, dtype: torch.dtype) -> "BlobLayout":
        """The layout of an unquantized Mixtral expert: w1, w3 [F, D] and w2 [D, F]."""
        return cls.build([("w1", dtype, (ffn, hidden)), ("w2", dtype, (hidden, ffn)), ("w3", dtype, (ffn, hidden))],
                         kind="dense", bits=torch.finfo(dtype).bits)

    @property
    def header_nbytes(self) -> int:
        return self.records[0].offset if self.records else HEADER_ALIGN

    def record(self, name: str) -> TensorRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)

    def _json(self) -> bytes:
        body = {
            "version": VERSION, "kind": self.kind, "bits": self.bits, "group_size": self.group_size,
            "nbytes": self.nbytes, "extra": self.extra,
            "tensors": [[r.name, r.dtype, list(r.shape), r.offset, r.nbytes] for r in self.records],
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    def header(self) -> bytes:
        """The header bytes, zero-padded to the first tensor's offset."""
        body = self._json()
        raw = _PREFIX.pack(MAGIC, VERSION, len(body)) + body
        return raw + b"\x00" * (self.header_nbytes - len(raw))

    @classmethod
    def parse(cls, data: bytes | memoryview, source: str = "blob") -> "BlobLayout":
        """Read and check a blob header: magic, version, alignment and that the sizes add up."""
        data = bytes(data[: max(_PREFIX.size, 0) + 65536])
        if len(data) < _PREFIX.size:
            raise UserError(f"{source}: truncated blob header ({len(data)} bytes)")
        magic, version, n = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise UserError(f"{source}: not an expert blob (bad magic {magic!r})")
        if version != VERSION:
            raise UserError(f"{source}: blob format version {version} is not supported (this build reads {VERSION})")
        try:
            body = json.loads(data[_PREFIX.size:_PREFIX.size + n])
            records = []
            for name, dt, shape, off, nb in body["tensors"]:
                if not (isinstance(name, str) and isinstance(dt, str) and isinstance(shape, list)
                        and all(map(is_count, shape)) and is_count(off) and is_count(nb)):
                    raise ValueError(f"tensor record {[name, dt, shape, off, nb]!r} has fields of the wrong type")
                records.append(TensorRecord(name, dt, tuple(shape), off, nb))
            nbytes, kind, bits, group_size = body["nbytes"], body["kind"], body["bits"], body["group_size"]
            extra = body.get("extra", {})
            if not (is_count(nbytes) and isinstance(kind, str) and is_count(bits) and is_count(group_size)
                    and isinstance(extra, dict)):
                raise ValueError("nbytes, bits and group_size must be non-negative integers, kind a string, "
                                 "extra an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{source}: corrupt blob header ({exc})") from None
        layout = cls(tuple(records), nbytes, kind, bits, group_size, extra)
        layout.check(source)
        return layout

    def check(self, source: str = "blob") -> None:
        """Refuse a layout whose records overlap, are misaligned, or do not fit in nbytes."""
        end = _PREFIX.size
        for r in sorted(self.records, key=lambda r: r.offset):
            if r.dtype not in DTYPES:
                raise UserError(f"{source}: tensor {r.name} has unknown dtype {r.dtype!r}")
            expect = DTYPES[r.dtype].itemsize
            for s in r.shape:
                expect *= s
            if r.nbytes != expect:
                raise UserError(f"{source}: tensor {r.name} is {r.nbytes} bytes but its shape {r.shape} needs {expect}")
            if r.offset % TENSOR_ALIGN or r.offset < end:
                raise UserError(f"{source}: tensor {r.name} at offset {r.offset} is misaligned or overlaps")
            end = r.offset + r.nbytes
        if end > self.nbytes or self.nbytes % TENSOR_ALIGN:
            raise UserError(f"{source}: blob sizes are inconsistent (tensors end at {end}, blob is {self.nbytes})")

    def views(self, blob: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into a uint8 blob buffer (any device); no copy, no allocation of storage."""
        out = {}
        for r in self.records:
            out[r.name] = blob[r.offset:r.offset + r.nbytes].view(DTYPES[r.dtype]).view(r.shape)
        return out

    def write(self, blob: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fill a uint8 buffer of `nbytes` with the header and the given tensors (same names, shapes)."""
        blob[: self.header_nbytes].copy_(torch.frombuffer(bytearray(self.header()), dtype=torch.uint8))
        views = self.views(blob)
        for name, view in views.items():
            t = tensors[name]
            if tuple(t.shape) != view.shape:
                raise UserError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(view.shape)}")
            view.copy_(t)
        return blob

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A new CPU uint8 blob holding these tensors."""
        return self.write(torch.zeros(self.nbytes, dtype=torch.uint8), tensors)
