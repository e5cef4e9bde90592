"""Rotary position embeddings: the tables for every position and their application to queries and keys.

Variants: plain (HF Llama's 'rotate half' layout), partial (only the first dims of a head rotate: the
tables are narrower than the head, GLM-4.5), interleaved pairs (DeepSeek's (x0, x1), (x2, x3), ...
layout), and YaRN frequencies with their attention factor folded into the tables (DeepSeek).

Dimension legend: S positions, Hd head dim, Dr rotary dims (Hd, or fewer for partial rotary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def inv_frequencies(theta: float, dim: int) -> torch.Tensor:
    """The plain rotary inverse frequencies [dim / 2] of `dim` rotary dims."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def tables(inv_freq: torch.Tensor, length: int, device, dtype, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Dr] for positions 0..length-1 from inverse frequencies [Dr / 2], each half repeating the
    angles (the layout apply_rope and apply_rope_interleaved both read), times `scale` (YaRN's factor)."""
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # [S, Dr/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).to(device=device, dtype=dtype), (emb.sin() * scale).to(device=device, dtype=dtype)


def rope_tables(theta: float, head_dim: int, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Hd] for positions 0..length-1 (the 'rotate half' convention of HF Llama and Mixtral)."""
    return tables(inv_frequencies(theta, head_dim), length, device, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, T, Hd]; cos, sin [T, Dr]. With Dr < Hd (partial rotary) the first Dr dims rotate and the
    rest pass through."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    half = rotary // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's layout: x [heads, T, Dr] holds interleaved pairs (x0, x1), (x2, x3), ..., each rotated by one
    angle. The result lists the pairs' first members, then their second ones (as transformers' DeepSeek-V3
    does): a permutation of the dims that queries and keys share, so q . k is the interleaved rotation's."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass(frozen=True)
class Yarn:
    """YaRN rotary scaling, as config.json's rope_scaling (or rope_parameters) describes it."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def frequencies(self, theta: float, dim: int) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [dim / 2] and the factor the tables are scaled by (transformers' YaRN): the
        low frequencies interpolated by `factor`, the high ones kept, a linear ramp between."""
        factor, attention = self.factor, self.attention_factor
        if attention is None:
            if self.mscale and self.mscale_all_dim:
                attention = yarn_mscale(factor, self.mscale) / yarn_mscale(factor, self.mscale_all_dim)
            else:
                attention = yarn_mscale(factor)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no singularity
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation = 1 - ramp  # 1: keep the plain frequency, 0: interpolate it
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, float(attention)

    def softmax_scale(self, scale: float) -> float:
        """The attention softmax scale corrected by mscale_all_dim squared (multi-head latent attention's)."""
        if self.mscale_all_dim:
            m = yarn_mscale(self.factor, self.mscale_all_dim)
            return scale * m * m
        return scale


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 * mscale * ln(scale) + 1 (1 for no scaling)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rotary_tables(theta: float, dim: int, length: int, device, dtype,
                  yarn: Yarn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, dim]: plain, or YaRN's frequencies scaled by its attention factor."""
    if yarn is None:
        return tables(inv_frequencies(theta, dim), length, device, dtype)
    inv_freq, scale = yarn.frequencies(theta, dim)
    return tables(inv_freq, length, device, dtype, scale)
