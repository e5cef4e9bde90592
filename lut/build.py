"""Re-parameterization: a MoLE checkpoint -> a table model folder the runtime serves (`moe-offload lut build`).

Every routed expert of a MoLE layer sees only expert_norm(embed[id]), so its output for token `id` is a
fixed row: the builder runs every expert on every vocabulary entry once and writes the rows to the table
file (lut/tables.py), token by token in batches, so memory stays bounded whatever the vocabulary:

    for each batch of token ids (tokens_per_batch, from `batch_bytes`):
        for each layer l:  rows[:, l] = expert_outputs(embed[ids], expert_norm_l, experts_l)   # [U, N, D]
        append layout.encode(rows) to the table file                                             # U records

The folder it writes (atomically: built in a hidden temp folder next to DST, then renamed):
    config.json        the MoLE config with model_type "mole_tables" and "tables": {file, bits, group_size}
    model.safetensors  every tensor of SRC except the routed experts and their expert_norm (now in the table)
    tables.bin         the table file
    tokenizer files    copied from SRC

Rows are computed in float32 from the checkpoint's weights, then stored at --bits: 32 or 16 as floats, 8, 4, 3
or 2 quantized group-wise by quant.quantize (lut/tables.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from quant.errors import UserError, writing
from quant.files import copy_input, fsync_dir, save_tensors, swap_in, work_folder

from .config import MOLE_MODEL_TYPE, TABLE_MODEL_TYPE, MoLEConfig, is_table_folder
from .model import checkpoint_shapes, expert_outputs, is_table_expert
from .tables import TableLayout

TABLE_FILE = "tables.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


class _Source:
    """SRC's model.safetensors, read lazily; a layer's experts are stacked once and kept if they fit."""

    def __init__(self, folder: Path, cfg: MoLEConfig, weights_budget: int):
        from safetensors import SafetensorError, safe_open

        self.path, self.cfg = folder / "model.safetensors", cfg
        if not self.path.is_file():
            raise UserError(f"{self.path}: missing (a MoLE checkpoint is config.json + model.safetensors)")
        try:
            self.f = safe_open(str(self.path), "pt")
            shapes = {n: tuple(self.f.get_slice(n).get_shape()) for n in self.f.keys()}
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{self.path}: unreadable safetensors file ({exc})") from None
        for name, shape in checkpoint_shapes(cfg).items():
            if name not in shapes:
                raise UserError(f"{self.path}: checkpoint has no tensor {name}")
            if shapes[name] != shape:
                raise UserError(f"{self.path}: tensor {name} has shape {list(shapes[name])}, config.json implies {list(shape)}")
        self.names = list(shapes)
        L, N, F, D = cfg.num_hidden_layers, cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
        self.keep = L * N * 3 * F * D * 4 <= weights_budget   # all experts as float32 fit: read them once
        self.cache: dict[int, tuple[torch.Tensor, ...]] = {}

    def get(self, name: str) -> torch.Tensor:
        return self.f.get_tensor(name).float()

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        """expert_norm [D], w1 [N, F, D], w2 [N, D, F], w3 [N, F, D] of layer i, float32."""
        if i in self.cache:
            return self.cache[i]
        p = f"model.layers.{i}.mole"
        stack = [torch.stack([self.get(f"{p}.experts.{j}.{w}.weight") for j in range(self.cfg.num_local_experts)])
                 for w in ("w1", "w2", "w3")]
        out = (self.get(f"{p}.expert_norm.weight"), *stack)
        if self.keep:
            self.cache[i] = out
        return out


MAX_BATCH_TOKENS = 512  # beyond this a batch is no faster, and the progress bar would jump
# The experts run on CHUNK_TOKENS ids at a time, at fixed offsets, whatever the batch: a matmul's rounding
# can depend on how many rows it is given (one row takes another kernel), and the tables must not depend
# on --batch-mem. Batches are whole chunks.
CHUNK_TOKENS = 32


def tokens_per_batch(cfg: MoLEConfig, layout: TableLayout, batch_bytes: int) -> int:
    """How many token ids one batch computes within `batch_bytes` of working memory: a whole number of
    chunks, at least one (a smaller budget is raised to what one chunk needs)."""
    if batch_bytes <= 0:
        raise UserError(f"--batch-mem must be positive, got {batch_bytes}")
    per_token = (cfg.table_row_values * 4 + layout.record_nbytes
                 + 3 * cfg.num_local_experts * cfg.intermediate_size * 4)  # rows, records, one layer's [N, U, F]s
    tokens = min(MAX_BATCH_TOKENS, batch_bytes // per_token)
    return max(CHUNK_TOKENS, tokens // CHUNK_TOKENS * CHUNK_TOKENS)


def build_tables(src: str | os.PathLike, dst: str | os.PathLike, bits: int = 16, group_size: int | None = None,
                 batch_bytes: int = 256 << 20, weights_budget: int = 2 << 30, force: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the table model folder DST for the MoLE checkpoint SRC; returns a summary (sizes, seconds)."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    cfg = MoLEConfig.from_folder(src, (MOLE_MODEL_TYPE,))
    layout = TableLayout.make(cfg.vocab_size, cfg.num_hidden_layers, cfg.num_local_experts, cfg.hidden_size,
                              bits, group_size)
    if src.resolve().is_relative_to(dst.resolve()):
        raise UserError(f"{dst}: DST must not be SRC or a folder holding it (replacing it would delete {src})")
    if (dst.exists() or dst.is_symlink()) and (not dst.is_dir() or any(dst.iterdir())):
        if not force:
            raise UserError(f"{dst}: already exists (choose another DST, or pass --force to replace it)")
        # --force replaces an earlier build, or a link (removed, its target left alone); never a user's file or
        # folder.
        if not (dst.is_symlink() or _is_earlier_build(dst)):
            raise UserError(f"{dst}: exists and is not a table folder that lut build wrote; --force replaces only "
                            f"those (or a symlink), so choose another DST")
    source = _Source(src, cfg, weights_budget)
    t0 = time.perf_counter()
    with writing(dst):
        tmp = work_folder(dst)
        try:
            _write_tables(tmp / TABLE_FILE, cfg, layout, source, batch_bytes, progress)
            _write_dense(tmp, source)
            _write_config(tmp, src, cfg, layout)
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    copy_input(src / name, tmp / name)
            fsync_dir(tmp)
            swap_in(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written folder a later run could trust
            raise
    return {"dst": str(dst), "bits": bits, "group_size": layout.group_size, "vocab": cfg.vocab_size,
            "layers": cfg.num_hidden_layers, "experts": cfg.num_local_experts, "hidden": cfg.hidden_size,
            "record_nbytes": layout.record_nbytes, "table_nbytes": layout.file_nbytes,
            "dense_nbytes": (dst / "model.safetensors").stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3)}


def _is_earlier_build(folder: Path) -> bool:
    """Whether `folder` (a real folder, not a link) holds what `build_tables` writes: a table folder's config
    and its table file."""
    return not folder.is_symlink() and is_table_folder(folder) and (folder / TABLE_FILE).is_file()


@torch.no_grad()
def _write_tables(path: Path, cfg: MoLEConfig, layout: TableLayout, source: _Source, batch_bytes: int,
                  progress) -> None:
    V, L = cfg.vocab_size, cfg.num_hidden_layers
    embed = source.f.get_slice("model.embed_tokens.weight")
    step = tokens_per_batch(cfg, layout, batch_bytes)
    with open(path, "wb") as f:
        f.write(layout.header())
        for start in range(0, V, step):
            end = min(V, start + step)
            emb = embed[start:end].float()                                   # [U, D]
            rows = torch.empty(end - start, L, cfg.num_local_experts, cfg.hidden_size)  # [U, L, N, D]
            for i in range(L):
                norm, w1, w2, w3 = source.layer(i)
                for c in range(0, end - start, CHUNK_TOKENS):  # step is whole chunks: offsets are fixed
                    chunk = slice(c, c + CHUNK_TOKENS)
                    rows[chunk, i] = expert_outputs(emb[chunk], norm, w1, w2, w3, cfg.rms_norm_eps)
            f.write(layout.encode(rows).numpy().tobytes())
            if progress:
                progress(end, V)
        f.flush()
        os.fsync(f.fileno())
    if path.stat().st_size != layout.file_nbytes:
        raise AssertionError(f"{path}: wrote {path.stat().st_size} bytes, layout says {layout.file_nbytes}")


def _write_dense(folder: Path, source: _Source) -> None:
    """Everything but the table experts, in SRC's dtype (attention, norms, embeddings, shared FFN, router)."""
    tensors = {n: source.f.get_tensor(n) for n in source.names if not is_table_expert(n)}
    save_tensors(tensors, folder / "model.safetensors")


def _write_config(folder: Path, src: Path, cfg: MoLEConfig, layout: TableLayout) -> None:
    raw = json.loads((src / "config.json").read_text())
    out = cfg.to_dict(TABLE_MODEL_TYPE) | {"tables": {"file": TABLE_FILE, "bits": layout.bits,
                                                      "group_size": layout.group_size, "format_version": 1}}
    out["torch_dtype"] = raw.get("torch_dtype", out["torch_dtype"])
    out["source_model_type"] = MOLE_MODEL_TYPE
    (folder / "config.json").write_text(json.dumps(out, indent=2) + "\n")

