"""The table file: every routed expert's output for every token id, one token's rows in one contiguous record.

    offset 0             header: magic, version, JSON layout (below), zero-padded to HEADER_ALIGN
    data_offset          record of token 0, record of token 1, ... record of token V-1
    record of a token    chunk of layer 0, chunk of layer 1, ... chunk of layer L-1   (= [L, N, D] rows)
    chunk of a layer     its parts, each at a fixed offset inside the chunk:
        bits 32 | 16:    values  float32 | float16  [N, D]
        bits 8|4|3|2:    codes   uint8 [N, P]   scales float16 [N, D/G]   zeros float16 [N, D/G]
                         quant.quantize's group-wise format (G values per scale and zero point), each
                         row's codes packed by quant.pack into P = packed_length(D, bits) bytes

So the rows one token needs for every layer are ONE read of `record_nbytes` bytes at
data_offset + id * record_nbytes, and one layer's rows are one read of `chunk_nbytes` inside it. The JSON
names vocab, layers, experts, hidden, bits, group size, chunk and record sizes and every part's dtype,
shape, offset and size; `TableLayout.open` checks magic, version, alignment and that the file is exactly
data_offset + vocab x record_nbytes bytes, and the table store checks the dimensions against config.json.

Dimension legend: U token ids (rows gathered), L layers (or a run of them), N experts, D hidden, G group.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.errors import UserError
from quant.pack import packed_length
from quant.quantize import check_format, dequantize_parts, quantize

MAGIC = b"MOLETAB\x00"
VERSION = 1
HEADER_ALIGN = 4096  # records start on a page boundary
CHUNK_ALIGN = 16     # every part and chunk starts at a multiple of 16 bytes, so typed views need no copy
TABLE_BITS = (32, 16, 8, 4, 3, 2)
_PREFIX = struct.Struct("<8sII")  # magic, version, JSON length
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "uint8": torch.uint8}


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Part:
    name: str
    dtype: str
    shape: tuple[int, ...]   # per layer chunk
    offset: int              # inside the chunk
    nbytes: int


@dataclass(frozen=True)
class TableLayout:
    vocab: int
    layers: int
    experts: int
    hidden: int
    bits: int
    group_size: int
    parts: tuple[Part, ...]
    chunk_nbytes: int
    data_offset: int

    @property
    def record_nbytes(self) -> int:
        """Bytes of one token's rows for every layer (one contiguous read)."""
        return self.layers * self.chunk_nbytes

    @property
    def data_nbytes(self) -> int:
        """Bytes of every token's record: the tables themselves, without the header."""
        return self.vocab * self.record_nbytes

    @property
    def file_nbytes(self) -> int:
        return self.data_offset + self.data_nbytes

    @classmethod
    def make(cls, vocab: int, layers: int, experts: int, hidden: int, bits: int = 16,
             group_size: int | None = None) -> "TableLayout":
        """The layout of a table with these dimensions; `group_size` matters for 8 and 4 bits only."""
        if bits not in TABLE_BITS:
            raise UserError(f"--bits must be one of {', '.join(map(str, TABLE_BITS))}, got {bits}")
        N, D = experts, hidden
        if bits in (32, 16):
            group_size = 0
            tensors = [("values", "float32" if bits == 32 else "float16", (N, D))]
        else:
            group_size = group_size or default_group_size(hidden)
            check_format((N, D), bits, group_size)
            tensors = [("codes", "uint8", (N, packed_length(D, bits))),
                       ("scales", "float16", (N, D // group_size)), ("zeros", "float16", (N, D // group_size))]
        parts, off = [], 0
        for name, dtype, shape in tensors:
            nbytes = _DTYPES[dtype].itemsize * shape[0] * shape[1]
            parts.append(Part(name, dtype, shape, off, nbytes))
            off = _align(off + nbytes, CHUNK_ALIGN)
        layout = cls(vocab, layers, experts, hidden, bits, group_size, tuple(parts), off, 0)
        data_offset = _align(_PREFIX.size + len(layout._json()), HEADER_ALIGN)
        return cls(vocab, layers, experts, hidden, bits, group_size, tuple(parts), off, data_offset)

    # ---- the header ----------------------------------------------------------------------------

    def _json(self) -> bytes:
        body = {
            "version": VERSION, "layout": "[vocab][layer] chunks of [experts, hidden] rows",
            "vocab": self.vocab, "layers": self.layers, "experts": self.experts, "hidden": self.hidden,
            "bits": self.bits, "group_size": self.group_size, "chunk_nbytes": self.chunk_nbytes,
            "record_nbytes": self.record_nbytes, "data_offset": self.data_offset,
            "parts": [[p.name, p.dtype, list(p.shape), p.offset, p.nbytes] for p in self.parts],
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    def header(self) -> bytes:
        body = self._json()
        raw = _PREFIX.pack(MAGIC, VERSION, len(body)) + body
        return raw + b"\x00" * (self.data_offset - len(raw))

    @classmethod
    def open(cls, path: Path) -> "TableLayout":
        """Read and check a table file's header, and that the file holds exactly the records it declares."""
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                prefix = f.read(_PREFIX.size)
                if len(prefix) < _PREFIX.size:
                    raise UserError(f"{path}: truncated table file ({size} bytes, no header)")
                magic, version, n = _PREFIX.unpack(prefix)
                if magic != MAGIC:
                    raise UserError(f"{path}: not a MoLE table file (bad magic {magic!r})")
                if version != VERSION:
                    raise UserError(f"{path}: table format version {version} is not supported (this build reads {VERSION})")
                if n > min(size, 1 << 20):
                    raise UserError(f"{path}: corrupt table header (JSON length {n})")
                body = json.loads(f.read(n))
        except FileNotFoundError:
            raise UserError(f"{path}: missing table file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: unreadable table header ({exc})") from None
        try:
            layout = cls.make(int(body["vocab"]), int(body["layers"]), int(body["experts"]), int(body["hidden"]),
                              int(body["bits"]), int(body["group_size"]) or None)
            declared = [[p[0], p[1], list(p[2]), int(p[3]), int(p[4])] for p in body["parts"]]
            same = (declared == [[p.name, p.dtype, list(p.shape), p.offset, p.nbytes] for p in layout.parts]
                    and int(body["chunk_nbytes"]) == layout.chunk_nbytes
                    and int(body["record_nbytes"]) == layout.record_nbytes)
            data_offset = int(body["data_offset"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UserError(f"{path}: corrupt table header ({exc!r})") from None
        if not same:
            raise UserError(f"{path}: table header's part layout does not match its dimensions and bits")
        if data_offset % HEADER_ALIGN or data_offset < _PREFIX.size + n:
            raise UserError(f"{path}: table data offset {data_offset} is misaligned or overlaps the header")
        layout = cls(layout.vocab, layout.layers, layout.experts, layout.hidden, layout.bits, layout.group_size,
                     layout.parts, layout.chunk_nbytes, data_offset)
        if size != layout.file_nbytes:
            raise UserError(f"{path}: table file is {size:,} bytes but vocab {layout.vocab} x layers {layout.layers} "
                            f"x experts {layout.experts} x d {layout.hidden} at {layout.bits} bits needs "
                            f"{layout.file_nbytes:,} (truncated or not built for this model)")
        return layout

    def check_dims(self, vocab: int, layers: int, experts: int, hidden: int, source: str) -> None:
        """The table must be vocab x layers x experts x d of the model it serves."""
        want, got = (vocab, layers, experts, hidden), (self.vocab, self.layers, self.experts, self.hidden)
        if want != got:
            raise UserError(f"{source}: table is vocab {got[0]} x layers {got[1]} x experts {got[2]} x d {got[3]}, "
                            f"config.json implies {want[0]} x {want[1]} x {want[2]} x {want[3]}")

    # ---- encode / decode -----------------------------------------------------------------------

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [U, L, N, D] float -> records uint8 [U, record_nbytes] (quantized through quant.quantize)."""
        U = rows.shape[0]
        out = torch.zeros(U, self.layers, self.chunk_nbytes, dtype=torch.uint8)
        views = self.views(out)
        if self.bits in (32, 16):
            views["values"].copy_(rows)
            if self.bits == 16 and not torch.isfinite(views["values"]).all():  # the cast makes |x| > 65504 inf
                raise UserError("table rows hold values beyond float16's range (±65504); build with --bits 32"
                                if torch.isfinite(rows).all() else "table rows hold NaN or infinite values")
        else:
            q = quantize(rows.reshape(-1, self.hidden), self.bits, self.group_size)  # every row on its own
            for name, t in (("codes", q.q), ("scales", q.scale), ("zeros", q.zero)):
                views[name].copy_(t.view(views[name].shape))
        return out.view(U, self.record_nbytes)

    def views(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of each part of chunks uint8 [U, L, chunk_nbytes] -> {name: [U, L, *shape]}; no copy."""
        out = {}
        for p in self.parts:
            flat = chunks[..., p.offset:p.offset + p.nbytes].view(_DTYPES[p.dtype])
            out[p.name] = flat.unflatten(-1, p.shape)
        return out

    def decode(self, chunks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """chunks uint8 [U, L, chunk_nbytes] (any device) -> rows [U, L, N, D] in `dtype`, on that device."""
        views = self.views(chunks)
        if self.bits in (32, 16):
            return views["values"].to(dtype)
        return dequantize_parts(views["codes"], views["scales"], views["zeros"], self.hidden, self.bits,
                                self.group_size, dtype)


def default_group_size(hidden: int) -> int:
    """64 values per scale and zero when the row divides into 64s (as Mixtral's 4096 does), else the whole row."""
    return 64 if hidden % 64 == 0 else hidden

