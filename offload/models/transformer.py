"""The decoder: embeddings, a stack of blocks (norm, attention, norm, feed-forward, residuals), the head.

Batch 1. Prefill runs the whole prompt in one pass; decode runs one token. Every weight that is not a
routed expert lives here, on the compute device; the feed-forward part of a block is whatever the family
put there (a MoE block over the expert provider, a dense MLP, MoLE's block).

Dimension legend: T tokens in this step, D hidden, V vocab, S cache length.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .attention import Attention, KVCache
from .config import ModelConfig
from .moe import MoE
from .norms import rms_norm
from .rotary import rope_tables

RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, sin [S, rotary dims]


class Cache(Protocol):
    """What a layer's attention keeps per position (KVCache; the latent cache of offload/models/mla.py)."""

    length: int

    @property
    def nbytes(self) -> int: ...

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors that hold it (for memory accounting)."""


class FeedForward(Protocol):
    def __call__(self, h: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """h [T, D] (normed), the step's token ids [T] -> [T, D]."""

    def dense_tensors(self) -> list[torch.Tensor]:
        """The weights it keeps on the device."""


class Block:
    """One decoder layer: x + attn(norm1(x)), then + ffn(norm2(x))."""

    def __init__(self, attn: Attention, ffn: FeedForward, norm1: torch.Tensor, norm2: torch.Tensor, eps: float):
        self.attn, self.ffn, self.norm1, self.norm2, self.eps = attn, ffn, norm1, norm2, eps

    def __call__(self, x, token_ids, pos, cache, cos, sin):
        x = x + self.attn(rms_norm(x, self.norm1, self.eps), pos, cache, cos, sin)
        return x + self.ffn(rms_norm(x, self.norm2, self.eps), token_ids)


class Transformer:
    """The whole model. `forward(token_ids, pos)` returns logits [T, V] and advances the KV cache."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, blocks: list[Block], norm: torch.Tensor,
                 lm_head: torch.Tensor, max_seq: int, rope: RopeTables | None = None, cache: Cache | None = None):
        """`rope`: a family's own cos, sin tables for positions 0..max_seq-1 (default: plain, over the head
        dim); `cache`: a family's own cache (default: keys and values per KV head, KVCache)."""
        self.cfg, self.embed, self.blocks, self.norm, self.lm_head = cfg, embed, blocks, norm, lm_head
        self.device, self.dtype = embed.device, embed.dtype
        self.max_seq = max_seq
        self.cos, self.sin = rope or rope_tables(cfg.rope_theta, cfg.head_dim, max_seq, self.device, self.dtype)
        self.cache = cache or KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_seq,
                                      self.device, self.dtype)

    def dense_tensors(self) -> list[torch.Tensor]:
        """Every non-expert weight on the compute device (for memory accounting)."""
        out = {id(t): t for t in (self.embed, self.norm, self.lm_head)}
        for b in self.blocks:
            for t in (b.norm1, b.norm2, *b.attn.dense_tensors(), *b.ffn.dense_tensors()):
                out[id(t)] = t
        return list(out.values())

    def routers(self) -> dict:
        """Each MoE layer's router, by layer: what router-ahead prefetch applies to an earlier hidden state."""
        return {b.ffn.layer: b.ffn.router for b in self.blocks if isinstance(b.ffn, MoE)}

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, pos: int, all_logits: bool = False) -> torch.Tensor:
        """token_ids [T] at absolute positions pos..pos+T-1 -> logits [T, V] (or [1, V] for the last)."""
        T = token_ids.shape[0]
        if pos + T > self.max_seq:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the KV cache ({self.max_seq})")
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
        x = F.embedding(token_ids, self.embed)  # [T, D]
        for block in self.blocks:
            x = block(x, token_ids, pos, self.cache, cos, sin)
        if not all_logits:
            x = x[-1:]
        return F.linear(rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head).float()
