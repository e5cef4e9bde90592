"""The decoder most families share, under the Hub's Llama-style names: embeddings, per layer two RMSNorms
and q/k/v/o projections, the final norm and lm_head. A family adds its feed-forward part per layer.

    model.embed_tokens.weight                           [V, D]
    model.layers.N.input_layernorm.weight               [D]
    model.layers.N.self_attn.{q,k,v,o}_proj.weight      [H*Hd, D], [K*Hd, D], [K*Hd, D], [D, H*Hd]
    model.layers.N.self_attn.{q,k,v,o}_proj.bias        (cfg.attention_bias)
    model.layers.N.self_attn.{q,k}_norm.weight          [Hd] (qk_norm "head") or [H*Hd], [K*Hd] ("whole")
    model.layers.N.post_attention_layernorm.weight      [D]
    model.norm.weight                                   [D]
    lm_head.weight                                      [V, D]   (absent when tie_word_embeddings)

and the Hub's names of a sparse block that most fine-grained families (Qwen-MoE, OLMoE, DeepSeek) share:

    model.layers.N.mlp.gate.weight                      [E, D]   the router
    model.layers.N.mlp.experts.E.{gate,up}_proj.weight  [F, D]
    model.layers.N.mlp.experts.E.down_proj.weight       [D, F]
    model.layers.N.mlp.{gate,up,down}_proj.weight       a dense MLP layer (cfg.dense_layers)
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from .attention import QKV, Attention
from .config import ModelConfig
from .moe import SwiGLU
from .transformer import Block, Cache, FeedForward, RopeTables, Transformer


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
    H, K, Hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                       **attention_shapes(cfg, i)})
        for name in cfg.attention_bias:
            shapes[f"{p}.self_attn.{name}_proj.bias"] = (D if name == "o" else (H if name == "q" else K) * Hd,)
        if cfg.qk_norm:
            whole = cfg.qk_norm == "whole"
            shapes[f"{p}.self_attn.q_norm.weight"] = (H * Hd,) if whole else (Hd,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (K * Hd,) if whole else (Hd,)
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


def qkv_projections(cfg: ModelConfig, w: Weights, layer: int, kind: type[QKV] = QKV, **extra) -> QKV:
    """Layer `layer`'s q, k, v projections with the biases and q/k norms its config names (`kind`: a
    family's variant of QKV, built with `extra`)."""
    p = f"model.layers.{layer}.self_attn"
    q, k, v = (w.proj(f"{p}.{n}_proj.weight") for n in "qkv")
    bias = {f"b{n}": w(f"{p}.{n}_proj.bias") for n in cfg.attention_bias if n != "o"}
    norms = {f"{n}_norm": w(f"{p}.{n}_norm.weight") for n in "qk"} if cfg.qk_norm else {}
    return kind(q, k, v, **bias, **norms, qk_norm=cfg.qk_norm, eps=cfg.rms_norm_eps, **extra)


def build_decoder(cfg: ModelConfig, w: Weights, ffn: Callable[[int], FeedForward], context: int,
                  qkv: Callable[[int], QKV] | None = None, attention: Callable[[int], Attention] | None = None,
                  rope: RopeTables | None = None, cache: Cache | None = None) -> Transformer:
    """The Transformer, with layer i's feed-forward part `ffn(i)`; attention keeps a KV cache of `context`.
    `qkv(i)`: a family's own q/k/v projections (default: `qkv_projections`); `attention(i)`: a family's own
    attention (multi-head latent attention), with the `rope` tables and `cache` it reads (Transformer's)."""
    blocks = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        if attention:
            attn = attention(i)
        else:
            wo = w.proj(f"{p}.self_attn.o_proj.weight")
            bo = w(f"{p}.self_attn.o_proj.bias") if "o" in cfg.attention_bias else None
            projections = qkv(i) if qkv else qkv_projections(cfg, w, i)
            attn = Attention(i, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.window(i),
                             projections, wo, bo)
        blocks.append(Block(attn, ffn(i), w(f"{p}.input_layernorm.weight"), w(f"{p}.post_attention_layernorm.weight"),
                            cfg.rms_norm_eps))
    embed = w("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else w("lm_head.weight")
    return Transformer(cfg, embed, blocks, w("model.norm.weight"), lm_head, context, rope, cache)


# ---- the sparse block's Hub names most fine-grained families share ----------------------------------------

def router_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """Hub names of one expert's gate (w1), down (w2) and up (w3) projections."""
    p = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{p}.gate_proj.weight", f"{p}.down_proj.weight", f"{p}.up_proj.weight"


def mlp_shapes(prefix: str, hidden: int, ffn: int) -> dict[str, tuple[int, ...]]:
    """A dense SwiGLU MLP's gate, up and down projections under `prefix` (a dense layer, a shared expert)."""
    return {f"{prefix}.gate_proj.weight": (ffn, hidden), f"{prefix}.up_proj.weight": (ffn, hidden),
            f"{prefix}.down_proj.weight": (hidden, ffn)}


def mlp(w: Weights, prefix: str) -> SwiGLU:
    """The dense SwiGLU MLP under `prefix`."""
    return SwiGLU(w(f"{prefix}.gate_proj.weight"), w(f"{prefix}.down_proj.weight"), w(f"{prefix}.up_proj.weight"))
