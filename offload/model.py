"""The Mixtral forward: embeddings, RMSNorm, rotary attention with a preallocated KV cache, the MoE block.

Batch 1. Prefill runs the whole prompt in one pass; decode runs one token. Every weight that is not an
expert lives here, on the compute device. Experts do not: the MoE block asks an `ExpertProvider` for the
output of expert (layer, e) on the tokens routed to it, so tiers, caches, prefetch and CPU fallback all live
behind that one seam (offload/store.py) and this file never mentions them.

Dimension legend: T tokens in this step, D hidden, H query heads, K key/value heads, Hd head dim,
E experts, k experts per token, F expert ffn, V vocab, S cache length.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

import quant

from .config import ModelConfig


class ExpertProvider(Protocol):
    """Whoever owns the experts. The MoE block calls `prepare` once per layer, then `run` per expert."""

    def prepare(self, layer: int, h: torch.Tensor, experts: list[int]) -> None:
        """Layer `layer` is about to run `experts` (sorted) on router input h [T, D]; start what can start."""

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert (layer, expert) applied to x [t, D] -> [t, D], in x's dtype and on x's device."""


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One Mixtral expert: w2(silu(w1 x) * w3 x). x [t, D]; w1, w3 [F, D]; w2 [D, F]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T for a weight tensor, or for a weight kept quantized on the device (`convert --dense-bits`)."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else quant.linear(x, w)


def parts(w) -> tuple[torch.Tensor, ...]:
    """The tensors that hold a weight: itself, or a quantized weight's codes, scales and zeros."""
    return (w,) if isinstance(w, torch.Tensor) else tuple(w.parts.values())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in float32 whatever the compute dtype, as the reference does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(cfg: ModelConfig, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Hd] for positions 0..length-1 (the 'rotate half' convention of HF Mixtral)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # [S, Hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, T, Hd]; cos, sin [T, Hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer, preallocated once for `length` positions: [L, K, S, Hd] each."""

    def __init__(self, cfg: ModelConfig, length: int, device, dtype):
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, length, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = length

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Attention:
    """Grouped-query attention for one layer; writes this step's keys/values into the shared KV cache."""

    def __init__(self, cfg: ModelConfig, layer: int, wq, wk, wv, wo):
        self.cfg, self.layer = cfg, layer
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo

    def __call__(self, x: torch.Tensor, pos: int, cache: KVCache, cos, sin) -> torch.Tensor:
        cfg, T = self.cfg, x.shape[0]
        H, K, Hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = linear(x, self.wq).view(T, H, Hd).transpose(0, 1)  # [H, T, Hd]
        k = linear(x, self.wk).view(T, K, Hd).transpose(0, 1)  # [K, T, Hd]
        v = linear(x, self.wv).view(T, K, Hd).transpose(0, 1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        end = pos + T
        cache.k[self.layer, :, pos:end] = k
        cache.v[self.layer, :, pos:end] = v
        # Mixtral's sliding window: no query sees a key more than `window - 1` positions back, so the keys
        # before the window of the step's first query are never read.
        window = cfg.sliding_window
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
        # A batch dimension of 1: SDPA's fused CUDA kernels take 4-D inputs only.
        out = F.scaled_dot_product_attention(q[None], keys, values, attn_mask=mask, is_causal=causal,
                                             enable_gqa=H != K)[0]  # [H, T, Hd]
        return linear(out.transpose(0, 1).reshape(T, H * Hd), self.wo)


class MoE:
    """Mixtral's sparse block: softmax over router logits, top-k, renormalize, weighted sum of experts."""

    def __init__(self, cfg: ModelConfig, layer: int, gate: torch.Tensor, experts: ExpertProvider):
        self.cfg, self.layer, self.gate, self.experts = cfg, layer, gate, experts
        self.last_routing: torch.Tensor | None = None  # [T, k] expert ids of the latest call, for stats/profiling

    def dense_tensors(self) -> list[torch.Tensor]:
        return [self.gate]

    def __call__(self, h: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(F.linear(h, self.gate), dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, self.cfg.num_experts_per_tok, dim=-1)     # [T, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype)
        self.last_routing = ids
        # Group the tokens by expert, so each needed expert is fetched and run once for the whole step.
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        used, counts = torch.unique_consecutive(flat[order], return_counts=True)
        used, counts = used.tolist(), counts.tolist()
        self.experts.prepare(self.layer, h, used)
        out = torch.zeros_like(h)
        start = 0
        for e, n in zip(used, counts):
            slots = order[start:start + n]          # positions in the flattened [T*k] routing
            start += n
            tokens = slots // self.cfg.num_experts_per_tok
            y = self.experts.run(self.layer, e, h[tokens])                # [n, D]
            out.index_add_(0, tokens, y * weights.flatten()[slots, None])
        return out


class Block:
    """One decoder layer: x + attn(norm(x)), then + ffn(norm(x)); `ffn` is the MoE (or a table layer)."""

    def __init__(self, cfg: ModelConfig, attn: Attention, ffn, norm1: torch.Tensor, norm2: torch.Tensor):
        self.cfg, self.attn, self.ffn, self.norm1, self.norm2 = cfg, attn, ffn, norm1, norm2

    def __call__(self, x, token_ids, pos, cache, cos, sin):
        x = x + self.attn(rms_norm(x, self.norm1, self.cfg.rms_norm_eps), pos, cache, cos, sin)
        return x + self.ffn(rms_norm(x, self.norm2, self.cfg.rms_norm_eps), token_ids)


class Transformer:
    """The whole model. `forward(token_ids, pos)` returns logits [T, V] and advances the KV cache."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, blocks: list[Block], norm: torch.Tensor,
                 lm_head: torch.Tensor, max_seq: int):
        self.cfg, self.embed, self.blocks, self.norm, self.lm_head = cfg, embed, blocks, norm, lm_head
        self.device, self.dtype = embed.device, embed.dtype
        self.max_seq = max_seq
        self.cos, self.sin = rope_tables(cfg, max_seq, self.device, self.dtype)
        self.cache = KVCache(cfg, max_seq, self.device, self.dtype)

    def dense_tensors(self) -> list[torch.Tensor]:
        """Every non-expert weight on the compute device (for memory accounting)."""
        out = {id(t): t for t in (self.embed, self.norm, self.lm_head)}
        for b in self.blocks:
            attn = (t for w in (b.attn.wq, b.attn.wk, b.attn.wv, b.attn.wo) for t in parts(w))
            for t in (b.norm1, b.norm2, *attn, *getattr(b.ffn, "dense_tensors", lambda: [])()):
                out[id(t)] = t
        return list(out.values())

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
