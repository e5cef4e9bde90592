"""Mixtral (MixtralForCausalLM): the shared decoder, and per layer a sparse block whose router takes a
softmax over the E experts, keeps the top k and renormalizes their weights; each expert a SwiGLU FFN.

    model.layers.N.block_sparse_moe.gate.weight                  [E, D]   the router
    model.layers.N.block_sparse_moe.experts.E.{w1,w3}.weight     [F, D]   gate, up
    model.layers.N.block_sparse_moe.experts.E.w2.weight          [D, F]   down
"""

from __future__ import annotations

from .config import Fields, ModelConfig, decoder_fields
from .decoder import Weights, attention_shapes, build_decoder, decoder_shapes
from .moe import ExpertProvider, MoE, SoftmaxRouter
from .transformer import Transformer

MODEL_TYPES = ("mixtral",)
__all__ = ["MODEL_TYPES", "config", "dense_shapes", "attention_shapes", "expert_names", "build"]


def config(raw: dict, source: str) -> ModelConfig:
    f = Fields(raw, source)
    return ModelConfig(**decoder_fields(f), intermediate_size=f.get("intermediate_size"),
                       num_local_experts=f.get("num_local_experts"),
                       num_experts_per_tok=f.get("num_experts_per_tok", 2))


def router_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """Hub names of one expert's w1 (gate), w2 (down) and w3 (up) projections."""
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return f"{p}.w1.weight", f"{p}.w2.weight", f"{p}.w3.weight"


def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor that lives on the compute device: the decoder's and each layer's router."""
    routers = {router_name(i): (cfg.num_local_experts, cfg.hidden_size) for i in range(cfg.num_hidden_layers)}
    return {**decoder_shapes(cfg), **routers}


def build(cfg: ModelConfig, w: Weights, experts: ExpertProvider, context: int) -> Transformer:
    def ffn(i: int) -> MoE:
        return MoE(i, SoftmaxRouter(w(router_name(i)), cfg.num_experts_per_tok, cfg.norm_topk_prob), experts)

    return build_decoder(cfg, w, ffn, context)
