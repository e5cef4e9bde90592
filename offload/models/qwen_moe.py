"""Qwen-MoE: Qwen1.5-MoE / Qwen2-MoE ("qwen2_moe", Qwen2MoeForCausalLM) and Qwen3-MoE ("qwen3_moe",
Qwen3MoeForCausalLM). The shared decoder, and per layer either a sparse block of fine-grained SwiGLU experts
(softmax over E, top k, renormalized only when `norm_topk_prob`) or a dense MLP (`mlp_only_layers`, and
the layers `decoder_sparse_step` skips).

    qwen2_moe   biases on q, k, v (`qkv_bias`); a shared expert of `shared_expert_intermediate_size` beside the
                routed ones, scaled by sigmoid(shared_expert_gate . h); a sliding window on the layers
                `layer_types` marks (when `use_sliding_window`)
    qwen3_moe   RMSNorm of each head of q and k before rotary (`q_norm`, `k_norm` [Hd]); biases on q, k, v, o
                when `attention_bias`; an explicit `head_dim`; a sliding window on every layer when
                `use_sliding_window`

    model.layers.N.mlp.gate.weight                              [E, D]   (decoder.py: the shared names)
    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight     [F, D], [F, D], [D, F]
    model.layers.N.mlp.shared_expert.{gate,up,down}_proj.weight [Fs, D], [Fs, D], [D, Fs]   (qwen2_moe)
    model.layers.N.mlp.shared_expert_gate.weight                [1, D]                       (qwen2_moe)
    model.layers.N.mlp.{gate,up,down}_proj.weight               dense layers, ffn `intermediate_size`
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quant.blob import is_count
from quant.errors import UserError, shown

from .config import Fields, ModelConfig, decoder_fields
from .decoder import (Weights, attention_shapes, build_decoder, decoder_shapes, expert_names, mlp, mlp_shapes,
                      router_name)
from .moe import ExpertProvider, MoE, SoftmaxRouter, SwiGLU
from .transformer import Transformer

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
__all__ = ["MODEL_TYPES", "config", "dense_shapes", "attention_shapes", "expert_names", "build"]


def config(raw: dict, source: str) -> ModelConfig:
    f = Fields(raw, source)
    qwen2 = raw.get("model_type") == "qwen2_moe"
    fields = decoder_fields(f, default_rope_theta=10000.0)
    layers = fields["num_hidden_layers"]
    experts = f.get("num_experts", f.get("num_local_experts", required=False))  # transformers 5 writes the latter
    step, only = f.get("decoder_sparse_step", 1), f.get("mlp_only_layers", [])
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise UserError(f"{source}: field 'decoder_sparse_step' must be a positive integer, got {shown(step)}")
    if not isinstance(only, list) or not all(is_count(i) for i in only):
        raise UserError(f"{source}: field 'mlp_only_layers' must be a list of layer indices, got {shown(only)}")
    layers = layers if is_count(layers) else 0  # a bad value is refused by name when ModelConfig is made
    # The reference's rule: layer i has experts unless it is listed, or (i + 1) is not a multiple of the step.
    dense = tuple(sorted(set(only) | {i for i in range(layers) if (i + 1) % step}))
    fields["sliding_window"], fields["layer_types"] = None, ()
    if f.flag("use_sliding_window", False):
        fields["sliding_window"] = f.get("sliding_window")
        if qwen2:  # Qwen2's window applies to the layers layer_types marks (transformers derives them the same way)
            fields["layer_types"] = tuple(f.get("layer_types", [
                "sliding_attention" if (i + 1) % 2 and i < f.get("max_window_layers", 28) else "full_attention"
                for i in range(layers)]))
    if qwen2:
        bias = ("q", "k", "v") if f.flag("qkv_bias", True) else ()
    else:
        bias = ("q", "k", "v", "o") if f.flag("attention_bias", False) else ()
    return ModelConfig(
        **fields, intermediate_size=f.get("moe_intermediate_size"), num_local_experts=experts,
        num_experts_per_tok=f.get("num_experts_per_tok"), norm_topk_prob=f.flag("norm_topk_prob", False),
        attention_bias=bias, qk_norm=None if qwen2 else "head", dense_layers=dense,
        dense_intermediate_size=f.get("intermediate_size") if dense else 0,
        shared_intermediate_size=f.get("shared_expert_intermediate_size", 0) if qwen2 else 0)


def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor that lives on the compute device: the decoder's, each sparse layer's router and shared
    expert (with its gate), each dense layer's MLP."""
    D, shapes = cfg.hidden_size, decoder_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp"
        if i in cfg.dense_layers:
            shapes.update(mlp_shapes(p, D, cfg.dense_intermediate_size))
            continue
        shapes[router_name(i)] = (cfg.num_local_experts, D)
        if cfg.shared_intermediate_size:
            shapes.update(mlp_shapes(f"{p}.shared_expert", D, cfg.shared_intermediate_size))
            shapes[f"{p}.shared_expert_gate.weight"] = (1, D)
    return shapes


class GatedSharedExpert:
    """Qwen2-MoE's shared expert: a dense SwiGLU on every token, scaled by sigmoid(gate . h) per token."""

    def __init__(self, ffn: SwiGLU, gate: torch.Tensor):
        self.ffn, self.gate = ffn, gate  # gate [1, D]

    def dense_tensors(self) -> list[torch.Tensor]:
        return [*self.ffn.dense_tensors(), self.gate]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(h, self.gate)) * self.ffn(h)  # [T, 1] * [T, D]


def build(cfg: ModelConfig, w: Weights, experts: ExpertProvider, context: int) -> Transformer:
    def ffn(i: int):
        p = f"model.layers.{i}.mlp"
        if i in cfg.dense_layers:
            return mlp(w, p)
        shared = None
        if cfg.shared_intermediate_size:
            shared = GatedSharedExpert(mlp(w, f"{p}.shared_expert"), w(f"{p}.shared_expert_gate.weight"))
        router = SoftmaxRouter(w(router_name(i)), cfg.num_experts_per_tok, cfg.norm_topk_prob)
        return MoE(i, router, experts, shared=shared)

    return build_decoder(cfg, w, ffn, context)
