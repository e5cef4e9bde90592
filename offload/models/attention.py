"""Grouped-query attention with rotary positions over a KV cache preallocated once for the whole context.

Dimension legend: T tokens in this step, D hidden, H query heads, K key/value heads, Hd head dim,
L layers, S cache length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import linear, parts
from .norms import rms_norm
from .rotary import apply_rope


class KVCache:
    """Keys and values of every layer, preallocated once for `length` positions: [L, K, S, Hd] each."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, length: int, device, dtype):
        shape = (layers, kv_heads, length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = length

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]


class QKV:
    """The query, key and value projections of one layer, each with an optional bias, and optional RMSNorms
    of q and k before rotary: over each head ("head": weights [Hd], Qwen3) or over the whole projection
    ("whole": weights [H*Hd] and [K*Hd], OLMoE)."""

    def __init__(self, wq, wk, wv, bq=None, bk=None, bv=None, q_norm=None, k_norm=None, qk_norm: str | None = None,
                 eps: float = 1e-6):
        self.wq, self.wk, self.wv, self.bq, self.bk, self.bv = wq, wk, wv, bq, bk, bv
        self.q_norm, self.k_norm, self.qk_norm, self.eps = q_norm, k_norm, qk_norm, eps

    def dense_tensors(self) -> list[torch.Tensor]:
        weights = [t for w in (self.wq, self.wk, self.wv) for t in parts(w)]
        return weights + [t for t in (self.bq, self.bk, self.bv, self.q_norm, self.k_norm) if t is not None]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> q [T, H*Hd], k, v [T, K*Hd], with "whole" norms applied."""
        q, k, v = linear(x, self.wq, self.bq), linear(x, self.wk, self.bk), linear(x, self.wv, self.bv)
        if self.qk_norm == "whole":
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        return q, k, v

    def __call__(self, x: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
        """x [T, D] -> q [T, H, Hd], k, v [T, K, Hd]."""
        T = x.shape[0]
        q, k, v = self.project(x)
        q, k, v = q.view(T, heads, head_dim), k.view(T, kv_heads, head_dim), v.view(T, kv_heads, head_dim)
        if self.qk_norm == "head":
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        return q, k, v


class Attention:
    """Grouped-query attention for one layer; writes this step's keys/values into the shared KV cache.

    `window`: a sliding window (no query sees a key `window` or more positions back), or None."""

    def __init__(self, layer: int, heads: int, kv_heads: int, head_dim: int, window: int | None, qkv: QKV, wo,
                 bo: torch.Tensor | None = None):
        self.layer, self.heads, self.kv_heads, self.head_dim, self.window = layer, heads, kv_heads, head_dim, window
        self.qkv, self.wo, self.bo = qkv, wo, bo

    def dense_tensors(self) -> list[torch.Tensor]:
        return self.qkv.dense_tensors() + list(parts(self.wo)) + ([self.bo] if self.bo is not None else [])

    def __call__(self, x: torch.Tensor, pos: int, cache: KVCache, cos, sin) -> torch.Tensor:
        T = x.shape[0]
        H, K, Hd = self.heads, self.kv_heads, self.head_dim
        q, k, v = (t.transpose(0, 1) for t in self.qkv(x, H, K, Hd))  # [H, T, Hd], [K, T, Hd], [K, T, Hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = pos + T
        cache.k[self.layer, :, pos:end] = k
        cache.v[self.layer, :, pos:end] = v
        # The sliding window: no query sees a key more than `window - 1` positions back, so the keys before
        # the window of the step's first query are never read.
        window = self.window
        first = max(0, pos - window + 1) if window else 0
        keys = cache.k[self.layer, :, first:end][None]    # [1, K, S, Hd]; SDPA groups the H // K queries
        values = cache.v[self.layer, :, first:end][None]  # per key head itself (enable_gqa), no copies
        mask, causal = None, False
        if T > 1:
            if pos == 0 and not (window and T > window):
                causal = True  # the plain lower-triangular mask: SDPA builds it inside its fused kernels
            else:
                qpos = torch.arange(pos, end, device=x.device)[:, None]
                kpos = torch.arange(first, end, device=x.device)[None, :]
                mask = kpos <= qpos
                if window:
                    mask &= qpos - kpos < window
        # One token attends to every key it is given (the window was cut above), so decode needs no mask.
        out = self.attend(q[None], keys, values, mask, causal)[0]  # [H, T, Hd]
        return linear(out.transpose(0, 1).reshape(T, H * Hd), self.wo, self.bo)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
        """softmax(q k^T / sqrt(Hd)) v: q [1, H, T, Hd], keys and values [1, K, S, Hd], mask [T, S] (True: may
        attend) or None -> [1, H, T, Hd]. A family with another softmax (gpt-oss's sinks) overrides this.
        A batch dimension of 1: SDPA's fused CUDA kernels take 4-D inputs only."""
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.heads != self.kv_heads)
