"""A Hugging Face model folder, read lazily: config.json and the safetensors shards.

Only the safetensors headers are read when a checkpoint is opened. Every tensor's name, dtype, shape and
byte range are known from them, so the folder is validated up front (missing shard, wrong shape, truncated
file) and any tensor can later be read on its own, straight into a caller's buffer (pinned memory for the
expert store), without ever loading the whole model.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.blob import is_count
from quant.errors import UserError, shown
from quant.files import pread_exactly

SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64,
}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: the shard file and the absolute byte range inside it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """Parse one .safetensors file's header; check every byte range lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise UserError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size, 100 << 20):
                raise UserError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise UserError(f"{path}: missing shard file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _location(path, name, info, base, size)
    return out


def _location(path: Path, name: str, info, base: int, size: int) -> TensorLocation:
    """One header entry, checked: a known dtype, a shape, and a byte range inside the file that holds
    exactly that many elements."""
    if not isinstance(info, dict):
        raise UserError(f"{path}: corrupt safetensors header (entry {name!r} is not an object)")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(map(is_count, shape))
            and isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
        raise UserError(f"{path}: corrupt safetensors header (tensor {name}: shape {shape!r}, data_offsets {offsets!r})")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise UserError(f"{path}: corrupt safetensors header (tensor {name}: bytes {begin}..{end} do not hold "
                        f"{shape} {info['dtype']} values)")
    if base + end > size:
        raise UserError(f"{path}: truncated (tensor {name} ends at byte {base + end}, file has {size})")
    return TensorLocation(path, dtype, tuple(shape), base + begin, end - begin)


def read_config_json(folder: Path) -> dict:
    """A model folder's config.json as a dict, or a one-line error saying why there is none."""
    if not folder.exists():
        raise UserError(f"{folder}: no such model folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: missing (is this a Hugging Face model folder?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw


def holds_weights(folder: Path) -> bool:
    """Whether the folder has safetensors weights to index (a folder of config.json alone can be planned)."""
    return (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()


class Checkpoint:
    """A model folder opened for lazy reading. `read(name)` loads one tensor; nothing is read up front.

    `read_config(raw, source)` turns config.json into the caller's config object (`self.config`); it runs
    before the shards are indexed, so a folder of the wrong kind is refused by its config first. This layer
    knows no model family: offload.models.open_checkpoint passes the family's reader."""

    def __init__(self, path: str | os.PathLike, read_config: Callable[[dict, str], object] | None = None):
        self.path = Path(path)
        self.raw_config = read_config_json(self.path)
        self.config = read_config(self.raw_config, str(self.path / "config.json")) if read_config else None
        self.locations = self._index()
        self._files: dict[Path, object] = {}
        self._lock = threading.Lock()
        self.closed = False

    def _index(self) -> dict[str, TensorLocation]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                raw = json.loads(index.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UserError(f"{index}: unreadable shard index ({exc})") from None
            weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: field 'weight_map' must be an object mapping tensor names to shard files, "
                                f"got {shown(weight_map)}")
            for name, shard in weight_map.items():
                # A file name in this folder, as the Hub writes them: an index must not send reads elsewhere.
                if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
                    raise UserError(f"{index}: field 'weight_map' maps {name!r} to {shown(shard)}, "
                                    f"not the name of a .safetensors file in the folder")
            shards = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").is_file():
            weight_map, shards = None, ["model.safetensors"]
        else:
            raise UserError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        locations: dict[str, TensorLocation] = {}
        for shard in shards:
            for name, loc in read_safetensors_header(self.path / shard).items():
                if weight_map is None or weight_map.get(name) == shard:
                    locations[name] = loc
        if weight_map is not None:
            missing = [n for n in weight_map if n not in locations]
            if missing:
                raise UserError(f"{self.path / weight_map[missing[0]]}: does not hold tensor {missing[0]} named by the index")
        return locations

    def validate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Check every tensor in `shapes` is present with that shape (headers only)."""
        for name, shape in shapes.items():
            loc = self.locations.get(name)
            if loc is None:
                raise UserError(f"{self.path}: checkpoint has no tensor {name}")
            if loc.shape != shape:
                raise UserError(f"{loc.file}: tensor {name} has shape {list(loc.shape)}, config.json implies {list(shape)}")

    def fileno(self, path: Path) -> int:
        """A descriptor of one of the folder's files for `os.preadv`, opened once and closed by `close()`."""
        with self._lock:
            if self.closed:  # reopening would leak the file; a caller still reading after close is a bug
                raise UserError(f"{self.path}: read after the model was closed")
            f = self._files.get(path)
            if f is None:
                try:
                    f = self._files[path] = open(path, "rb")
                except OSError as exc:
                    raise UserError(f"{path}: cannot open ({exc.strerror})") from None
            return f.fileno()

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor `name`'s raw bytes into the CPU uint8 buffer `out` (e.g. a slice of a pinned blob)."""
        loc = self.locations[name]
        assert out.dtype == torch.uint8 and out.numel() == loc.nbytes and out.device.type == "cpu"
        pread_exactly(self.fileno(loc.file), memoryview(out.numpy()), loc.start, loc.file, f"tensor {name}")
        return out

    def read_slice_into(self, name: str, index: int, out: torch.Tensor) -> torch.Tensor:
        """Read slice `index` along the first dimension of tensor `name` (one expert of a tensor that fuses a
        layer's experts, [E, ...]) as raw bytes into the CPU uint8 buffer `out`: one pread."""
        loc = self.locations[name]
        step = loc.nbytes // loc.shape[0]
        assert out.dtype == torch.uint8 and out.numel() == step and out.device.type == "cpu" and index < loc.shape[0]
        pread_exactly(self.fileno(loc.file), memoryview(out.numpy()), loc.start + index * step, loc.file,
                      f"tensor {name}[{index}]")
        return out

    def read(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Load one tensor, optionally cast and moved."""
        loc = self.locations[name]
        if dtype is not None and dtype.is_floating_point and not loc.dtype.is_floating_point:
            raise UserError(f"{loc.file}: tensor {name} holds {loc.dtype} values where a float weight belongs "
                            f"(an integer-quantized checkpoint?); start from the float model")
        buf = torch.empty(loc.nbytes, dtype=torch.uint8)
        t = self.read_into(name, buf).view(loc.dtype).view(loc.shape)
        return t.to(device=device, dtype=dtype or loc.dtype)

    def close(self) -> None:
        """Close the folder's files; reading afterwards is an error. Callers stop their readers first."""
        with self._lock:
            self.closed = True
            for f in self._files.values():
                f.close()
            self._files.clear()

    def file_bytes(self) -> int:
        return sum(loc.nbytes for loc in self.locations.values())
