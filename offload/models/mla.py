"""Multi-head latent attention (DeepSeek-V2/V3) over a cache of compressed latents.

Per token a layer caches only the normalized latent c [R] (kv_lora_rank) and one rotated key part shared by
all heads, k_pe [Dr] (qk_rope_head_dim): R + Dr values instead of 2 x H x Hd. The heads' keys and values
are kv_b_proj's expansion of the latent, k_nope | v = W_b c, so

  prefill (T > 1)  expands the cached latents of every position it reads into per-head keys and values and
                   runs ordinary attention (few queries per key: expanding is the cheap side)
  decode (T = 1)   never expands: q_nope . (W_uk c) = (W_uk^T q_nope) . c, so the query is absorbed into the
                   latent space and attends over the cache as it is (one shared key "head" of R + Dr values),
                   and the output W_uv (sum_s p_s c_s) is expanded once, after the weighted sum.

Dimension legend: T tokens in this step, D hidden, H heads, R kv_lora_rank, Dn qk_nope_head_dim,
Dr qk_rope_head_dim, Dv v_head_dim, L layers, S cache length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .linear import linear, parts
from .norms import rms_norm


class LatentKVCache:
    """Every layer's latents and rotated shared keys, one row of R + Dr values per position: [L, S, R + Dr]
    (the latent first). Preallocated once for `length` positions."""

    def __init__(self, layers: int, rank: int, rope_dim: int, length: int, device, dtype):
        self.kv = torch.zeros((layers, length, rank + rope_dim), device=device, dtype=dtype)
        self.rank, self.length = rank, length

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv]


class LatentProjections:
    """A layer's query and latent projections. The query: one projection q_proj [H*(Dn+Dr), D] (`wq`), or
    a low-rank pair q_a_proj [Rq, D] (`wq`), RMSNorm [Rq], q_b_proj [H*(Dn+Dr), Rq] (`wq_b`). The latent:
    kv_a_proj_with_mqa [R + Dr, D] (`wkv_a`), then an RMSNorm [R] of its first R values."""

    def __init__(self, wq, wkv_a, kv_norm: torch.Tensor, eps: float, wq_b=None, q_norm: torch.Tensor | None = None,
                 bq: torch.Tensor | None = None, bkv_a: torch.Tensor | None = None):
        self.wq, self.wq_b, self.q_norm, self.bq = wq, wq_b, q_norm, bq
        self.wkv_a, self.bkv_a, self.kv_norm, self.eps = wkv_a, bkv_a, kv_norm, eps

    def dense_tensors(self) -> list[torch.Tensor]:
        weights = [t for w in (self.wq, self.wq_b, self.wkv_a) if w is not None for t in parts(w)]
        return weights + [t for t in (self.q_norm, self.bq, self.kv_norm, self.bkv_a) if t is not None]

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, H*(Dn+Dr)]."""
        q = linear(x, self.wq, self.bq)
        if self.wq_b is None:
            return q
        return linear(rms_norm(q, self.q_norm, self.eps), self.wq_b)

    def latent(self, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> the normalized latent [T, R] and the not yet rotated shared key part [T, Dr]."""
        c, k_pe = linear(x, self.wkv_a, self.bkv_a).split([rank, self.wkv_a.shape[0] - rank], dim=-1)
        return rms_norm(c, self.kv_norm, self.eps), k_pe


class LatentAttention:
    """Multi-head latent attention for one layer; writes this step's latents into the LatentKVCache.

    `wkv_b`: kv_b_proj [H*(Dn+Dv), R], a plain tensor (decode splits it into the key and value sides it
    absorbs); `rope`: how the rotary part turns (apply_rope_interleaved for DeepSeek's layout); `scale`:
    the softmax scale (1/sqrt(Dn+Dr), YaRN-corrected)."""

    def __init__(self, layer: int, heads: int, rank: int, nope_dim: int, rope_dim: int, v_dim: int,
                 qkv: LatentProjections, wkv_b: torch.Tensor, wo, bo: torch.Tensor | None, scale: float,
                 rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        self.layer, self.heads, self.rank = layer, heads, rank
        self.nope_dim, self.rope_dim, self.v_dim = nope_dim, rope_dim, v_dim
        self.qkv, self.wkv_b, self.wo, self.bo, self.scale, self.rope = qkv, wkv_b, wo, bo, scale, rope
        per_head = wkv_b.view(heads, nope_dim + v_dim, rank)
        self.w_uk = per_head[:, :nope_dim]  # [H, Dn, R]  views of kv_b_proj: absorbing copies no weights
        self.w_uv = per_head[:, nope_dim:]  # [H, Dv, R]

    def dense_tensors(self) -> list[torch.Tensor]:
        return [*self.qkv.dense_tensors(), self.wkv_b, *parts(self.wo)] + ([self.bo] if self.bo is not None else [])

    def __call__(self, x: torch.Tensor, pos: int, cache: LatentKVCache, cos, sin) -> torch.Tensor:
        T = x.shape[0]
        H, R, Dn, Dr, Dv = self.heads, self.rank, self.nope_dim, self.rope_dim, self.v_dim
        q = self.qkv.query(x).view(T, H, Dn + Dr).transpose(0, 1)       # [H, T, Dn+Dr]
        q_nope, q_pe = q.split([Dn, Dr], dim=-1)
        c, k_pe = self.qkv.latent(x, R)                                   # [T, R], [T, Dr]
        q_pe, k_pe = self.rope(q_pe, cos, sin), self.rope(k_pe[None], cos, sin)[0]
        end = pos + T
        rows = cache.kv[self.layer]                                       # [S, R+Dr]
        rows[pos:end, :R] = c
        rows[pos:end, R:] = k_pe
        if T == 1:
            # Absorbed: the query moves into latent space, attends over the cached rows as they are (one
            # key/value head shared by all H query heads), and the per-head values come out after the sum.
            q_lat = torch.matmul(q_nope, self.w_uk)                      # [H, 1, R]
            query = torch.cat([q_lat, q_pe], dim=-1)[None]                # [1, H, 1, R+Dr]
            keys = rows[None, None, :end]                                 # [1, 1, S, R+Dr]
            out = F.scaled_dot_product_attention(query, keys, keys[..., :R], scale=self.scale,
                                                 enable_gqa=True)[0]      # [H, 1, R]
            out = torch.matmul(out, self.w_uv.transpose(1, 2))            # [H, 1, Dv]
        else:
            # Expanded: per-head keys and values of every position read, from the cached latents.
            kv = F.linear(rows[:end, :R], self.wkv_b).view(end, H, Dn + Dv).transpose(0, 1)  # [H, S, Dn+Dv]
            k_nope, values = kv.split([Dn, Dv], dim=-1)
            keys = torch.cat([k_nope, rows[None, :end, R:].expand(H, end, Dr)], dim=-1)     # [H, S, Dn+Dr]
            mask, causal = None, pos == 0
            if not causal:
                mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(pos, end, device=x.device)[:, None]
            query = torch.cat([q_nope, q_pe], dim=-1)
            out = F.scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=mask,
                                                 is_causal=causal, scale=self.scale)[0]  # [H, T, Dv]
        return linear(out.transpose(0, 1).reshape(T, H * Dv), self.wo, self.bo)
