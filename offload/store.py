"""The expert store (placeholder tier: every expert read lazily from disk on first use, then kept)."""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint, expert_names, moe_shapes
from .model import MoE, expert_ffn


class ExpertStore:
    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
        self.ckpt, self.device, self.dtype = ckpt, device, dtype
        self.resident: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.uses = 0

    def expected_shapes(self) -> dict:
        return moe_shapes(self.ckpt.config)

    def layer_ffn(self, layer: int, read):
        return MoE(self.ckpt.config, layer, read(f"model.layers.{layer}.block_sparse_moe.gate.weight"), self)

    def prepare(self, layer, h, experts) -> None:
        pass

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        w = self.resident.get((layer, expert))
        if w is None:
            w = self.resident[(layer, expert)] = tuple(self.ckpt.read(n, self.dtype, self.device) for n in expert_names(layer, expert))
        self.uses += 1
        return expert_ffn(x, *w)

    def reset_stats(self) -> None:
        self.uses = 0

    def stats(self) -> dict:
        return {"expert_uses": self.uses, "device": str(self.device)}
