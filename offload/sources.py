"""Where experts come from on disk, and how an expert blob is computed once it is in a tier.

A source reads expert (layer, e) into a blob buffer (a host slot) and knows the blob's layout and how to
run it. `CheckpointExperts` reads a Hugging Face checkpoint's separate w1/w2/w3 tensors.
"""

from __future__ import annotations

import torch

from quant.blob import BlobLayout

from .checkpoint import Checkpoint, expert_names
from .model import expert_ffn

Key = tuple[int, int]  # (layer, expert)


class CheckpointExperts:
    """Reads unquantized experts from the Hugging Face shards into blob buffers (3 preads per expert)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype):
        cfg = ckpt.config
        self.ckpt, self.dtype = ckpt, dtype
        self.layout = BlobLayout.dense(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.file_dtype = ckpt.locations[expert_names(0, 0)[0]].dtype
        # Same dtype on disk as in compute: read straight into the blob. Otherwise stage and convert.
        self.direct = self.file_dtype == dtype

    def read_into(self, key: Key, blob: torch.Tensor) -> int:
        """Fill `blob` (a host slot, header already written) with expert `key`; returns bytes read from disk."""
        views = self.layout.views(blob)
        total = 0
        for part, name in zip(("w1", "w2", "w3"), expert_names(*key)):
            rec = self.layout.record(part)
            if self.direct:
                self.ckpt.read_into(name, blob[rec.offset:rec.offset + rec.nbytes])
            else:
                views[part].copy_(self.ckpt.read(name))
            total += self.ckpt.locations[name].nbytes
        return total

    def compute(self, views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, views["w1"].to(x.dtype), views["w2"].to(x.dtype), views["w3"].to(x.dtype))
