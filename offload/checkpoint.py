"""A Hugging Face Mixtral model folder, read lazily: config, safetensors shards, tokenizer files.

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
from dataclasses import dataclass
from pathlib import Path

import torch

from quant.blob import is_count
from quant.files import pread_exactly

from .config import MIXTRAL_MODEL_TYPES, ModelConfig, shown
from .errors import UserError

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


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """Hub names of one expert's w1 (gate), w2 (down) and w3 (up) projections."""
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return f"{p}.w1.weight", f"{p}.w2.weight", f"{p}.w3.weight"


def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors every model of this layout holds outside its feed-forward layers, with their shapes."""
    D, V = cfg.hidden_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.self_attn.q_proj.weight": (q, D), f"{p}.self_attn.k_proj.weight": (kv, D),
            f"{p}.self_attn.v_proj.weight": (kv, D), f"{p}.self_attn.o_proj.weight": (D, q),
        })
    return shapes


def attention_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The attention projections (q, k, v, o of every layer): the dense weights `convert --dense-bits` quantizes."""
    return {name: shape for name, shape in dense_shapes(cfg).items() if ".self_attn." in name}


def moe_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Mixtral's sparse blocks: one router and E experts per layer."""
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    shapes = {}
    for i in range(cfg.num_hidden_layers):
        shapes[f"model.layers.{i}.block_sparse_moe.gate.weight"] = (E, D)
        for e in range(E):
            w1, w2, w3 = expert_names(i, e)
            shapes.update({w1: (F, D), w2: (D, F), w3: (F, D)})
    return shapes


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Mixtral checkpoint must hold, with its shape."""
    return {**dense_shapes(cfg), **moe_shapes(cfg)}


class Checkpoint:
    """A model folder opened for lazy reading. `read(name)` loads one tensor; nothing is read up front."""

    def __init__(self, path: str | os.PathLike, model_types: tuple[str, ...] = MIXTRAL_MODEL_TYPES):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: no such model folder")
        if not self.path.is_dir():
            raise UserError(f"{self.path}: not a folder (expected a Hugging Face model folder)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise UserError(f"{config_path}: missing (is this a Hugging Face model folder?)")
        try:
            self.raw_config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{config_path}: not valid JSON ({exc})") from None
        if not isinstance(self.raw_config, dict):
            raise UserError(f"{config_path}: expected a JSON object")
        self.config = ModelConfig.from_dict(self.raw_config, source=str(config_path), model_types=model_types)
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

    def validate(self, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        """Check every tensor the model needs is present with the right shape (headers only)."""
        shapes = expected_shapes(self.config) if shapes is None else shapes
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
