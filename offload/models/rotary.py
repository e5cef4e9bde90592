"""Rotary position embeddings: the tables for every position and their application to queries and keys.

Dimension legend: S positions, Hd head dim.
"""

from __future__ import annotations

import torch


def rope_tables(theta: float, head_dim: int, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Hd] for positions 0..length-1 (the 'rotate half' convention of HF Llama and Mixtral)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # [S, Hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, T, Hd]; cos, sin [T, Hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
