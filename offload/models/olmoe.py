"""OLMoE ("olmoe", OlmoeForCausalLM): the shared decoder with an RMSNorm over the whole q and k projections
(weights [H*Hd] and [K*Hd], before the heads are split), q, k and v clamped to +-`clip_qkv` when set, and
per layer a sparse block of fine-grained SwiGLU experts of `intermediate_size` (softmax over E, top k,
renormalized only when `norm_topk_prob`). Tensor names: decoder.py's, sparse block included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.blob import is_positive_number
from quant.errors import UserError, shown

from .attention import QKV
from .config import Fields, ModelConfig, decoder_fields
from .decoder import (Weights, attention_shapes, build_decoder, decoder_shapes, expert_names, qkv_projections,
                      router_name)
from .moe import ExpertProvider, MoE, SoftmaxRouter
from .transformer import Transformer

MODEL_TYPES = ("olmoe",)
__all__ = ["MODEL_TYPES", "config", "dense_shapes", "attention_shapes", "expert_names", "build"]


@dataclass(frozen=True)
class OlmoeConfig(ModelConfig):
    clip_qkv: float | None = None


def config(raw: dict, source: str) -> OlmoeConfig:
    f = Fields(raw, source)
    clip = raw.get("clip_qkv")
    if clip is not None and not is_positive_number(clip):
        raise UserError(f"{source}: field 'clip_qkv' must be a positive number or null, got {shown(clip)}")
    return OlmoeConfig(**decoder_fields(f, default_rope_theta=10000.0), intermediate_size=f.get("intermediate_size"),
                       num_local_experts=f.get("num_experts", f.get("num_local_experts", required=False)),
                       num_experts_per_tok=f.get("num_experts_per_tok"), norm_topk_prob=f.flag("norm_topk_prob", False),
                       attention_bias=("q", "k", "v", "o") if f.flag("attention_bias", False) else (),
                       qk_norm="whole", clip_qkv=None if clip is None else float(clip))


def dense_shapes(cfg: OlmoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor that lives on the compute device: the decoder's (q/k norms included) and the routers."""
    routers = {router_name(i): (cfg.num_local_experts, cfg.hidden_size) for i in range(cfg.num_hidden_layers)}
    return {**decoder_shapes(cfg), **routers}


class ClippedQKV(QKV):
    """OLMoE's projections: q and k normed over the whole projection, then q, k and v clamped to +-clip."""

    def __init__(self, *args, clip: float | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip = clip

    def project(self, x: torch.Tensor):
        q, k, v = super().project(x)
        if self.clip is None:
            return q, k, v
        return tuple(t.clamp(-self.clip, self.clip) for t in (q, k, v))


def build(cfg: OlmoeConfig, w: Weights, experts: ExpertProvider, context: int) -> Transformer:
    def ffn(i: int) -> MoE:
        return MoE(i, SoftmaxRouter(w(router_name(i)), cfg.num_experts_per_tok, cfg.norm_topk_prob), experts)

    return build_decoder(cfg, w, ffn, context,
                         qkv=lambda i: qkv_projections(cfg, w, i, ClippedQKV, clip=cfg.clip_qkv))
