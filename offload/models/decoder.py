"""The decoder most families share, under the Hub's Llama-style names: embeddings, per layer two RMSNorms
and q/k/v/o projections, the final norm and lm_head. A family adds its feed-forward part per layer.

    model.embed_tokens.weight                           [V, D]
    model.layers.N.input_layernorm.weight               [D]
    model.layers.N.self_attn.{q,k,v,o}_proj.weight      [H*Hd, D], [K*Hd, D], [K*Hd, D], [D, H*Hd]
    model.layers.N.post_attention_layernorm.weight      [D]
    model.norm.weight                                   [D]
    lm_head.weight                                      [V, D]   (absent when tie_word_embeddings)
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from .attention import Attention
from .config import ModelConfig
from .transformer import Block, FeedForward, Transformer


class Weights(Protocol):
    """How a family reads its dense weights: at the compute dtype, on the compute device."""

    def __call__(self, name: str) -> torch.Tensor:
        """Tensor `name` (reading a name twice gives the same tensor)."""

    def proj(self, name: str):
        """A projection weight: a tensor, or a weight kept quantized on the device (`convert --dense-bits`)."""


def decoder_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every decoder tensor outside the feed-forward parts, with its shape."""
    D, V = cfg.hidden_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                       **attention_shapes(cfg, i)})
    return shapes


def attention_shapes(cfg: ModelConfig, layer: int | None = None) -> dict[str, tuple[int, ...]]:
    """The attention projections (q, k, v, o) of one layer, or of every layer: the dense weights
    `convert --dense-bits` quantizes."""
    if layer is None:
        return {k: v for i in range(cfg.num_hidden_layers) for k, v in attention_shapes(cfg, i).items()}
    D, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    p = f"model.layers.{layer}.self_attn"
    return {f"{p}.q_proj.weight": (q, D), f"{p}.k_proj.weight": (kv, D), f"{p}.v_proj.weight": (kv, D),
            f"{p}.o_proj.weight": (D, q)}


def build_decoder(cfg: ModelConfig, w: Weights, ffn: Callable[[int], FeedForward], context: int) -> Transformer:
    """The Transformer, with layer i's feed-forward part `ffn(i)`; attention keeps a KV cache of `context`."""
    blocks = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        q, k, v, o = (w.proj(name) for name in attention_shapes(cfg, i))
        attn = Attention(i, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window,
                         q, k, v, o)
        blocks.append(Block(attn, ffn(i), w(f"{p}.input_layernorm.weight"), w(f"{p}.post_attention_layernorm.weight"),
                            cfg.rms_norm_eps))
    embed = w("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else w("lm_head.weight")
    return Transformer(cfg, embed, blocks, w("model.norm.weight"), lm_head, context)
