"""GLM-4.5 / GLM-4.6 / GLM-4.5-Air ("glm4_moe", Glm4MoeForCausalLM): the shared decoder's grouped-query
attention with biases on q, k and v (`attention_bias`), an RMSNorm of each head of q and k before rotary
(`use_qk_norm`), rotary positions on the first `partial_rotary_factor` of each head only; per layer a dense
MLP (the first `first_k_dense_replace` layers) or DeepSeek-V3's routing (sigmoid scores, a correction bias
for the choice, groups ranked by their two best) over routed SwiGLU experts beside `n_shared_experts` shared
ones. Tensor names: decoder.py's, and DeepSeek's sparse block (offload/models/deepseek.py):

    model.layers.N.mlp.gate.e_score_correction_bias                 [E]
    model.layers.N.mlp.shared_experts.{gate,up,down}_proj.weight    ffn n_shared_experts x moe_intermediate_size
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quant.blob import is_positive_number
from quant.errors import UserError, shown

from .config import Fields, ModelConfig, decoder_fields
from .decoder import (
    Weights,
    attention_shapes,
    build_decoder,
    decoder_shapes,
    expert_names,
    mlp_shapes,
    router_name,
)
from .deepseek import Routing, count, dense_layer_indices, feed_forward, grouping
from .moe import ExpertProvider
from .rotary import rotary_tables
from .transformer import Transformer

MODEL_TYPES = ("glm4_moe",)
__all__ = ["MODEL_TYPES", "attention_shapes", "build", "config", "dense_shapes", "expert_names"]


@dataclass(frozen=True)
class Glm4MoeConfig(ModelConfig):
    routing: Routing = field(default_factory=lambda: Routing("sigmoid"))
    rotary_dim: int = 0  # the rotating dims of each head (the rest pass through)


def config(raw: dict, source: str) -> Glm4MoeConfig:
    f = Fields(raw, source)
    fields = decoder_fields(f, default_rope_theta=10000.0)
    # transformers 5 writes partial_rotary_factor into rope_parameters; the Hub's configs keep it at the top.
    factor = raw.get("partial_rotary_factor", f.mapping("rope_parameters").get("partial_rotary_factor", 0.5))
    if not (is_positive_number(factor) and factor <= 1):
        raise UserError(f"{source}: field 'partial_rotary_factor' must be a number in (0, 1], got {shown(factor)}")
    head_dim = fields["head_dim"]
    rotary = int(head_dim * factor) if isinstance(head_dim, int) else 0
    if rotary % 2 or rotary == 0:
        raise UserError(f"{source}: field 'partial_rotary_factor' ({factor}) leaves {rotary} rotary dims of "
                        f"head_dim {head_dim}; rotary embeddings need a positive even number")
    experts, k = f.get("n_routed_experts"), f.get("num_experts_per_tok")
    scaling = f.get("routed_scaling_factor", 1.0)
    if not is_positive_number(scaling):
        raise UserError(f"{source}: field 'routed_scaling_factor' must be a positive number, got {shown(scaling)}")
    groups, kept = grouping(f, experts, k, "top2", 1, 1)
    ffn, shared = f.get("moe_intermediate_size"), count(f, "n_shared_experts", 1, positive=False)
    dense = dense_layer_indices(f, fields["num_hidden_layers"], 1)
    fields["sliding_window"] = None
    return Glm4MoeConfig(
        **fields, intermediate_size=ffn, num_local_experts=experts, num_experts_per_tok=k,
        norm_topk_prob=f.flag("norm_topk_prob", True),
        attention_bias=("q", "k", "v") if f.flag("attention_bias", False) else (),
        qk_norm="head" if f.flag("use_qk_norm", False) else None, dense_layers=dense,
        dense_intermediate_size=f.get("intermediate_size") if dense else 0,
        shared_intermediate_size=shared * ffn if isinstance(ffn, int) else 0,
        routing=Routing("sigmoid", groups, kept, "top2", True, float(scaling)), rotary_dim=rotary)


def dense_shapes(cfg: Glm4MoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor that lives on the compute device: the decoder's, each MoE layer's router, correction bias
    and shared experts, each dense layer's MLP."""
    D, E, shapes = cfg.hidden_size, cfg.num_local_experts, decoder_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp"
        if i in cfg.dense_layers:
            shapes.update(mlp_shapes(p, D, cfg.dense_intermediate_size))
            continue
        shapes.update({router_name(i): (E, D), f"{p}.gate.e_score_correction_bias": (E,)})
        if cfg.shared_intermediate_size:
            shapes.update(mlp_shapes(f"{p}.shared_experts", D, cfg.shared_intermediate_size))
    return shapes


def build(cfg: Glm4MoeConfig, w: Weights, experts: ExpertProvider, context: int) -> Transformer:
    embed = w("model.embed_tokens.weight")
    # Tables as wide as the rotating dims: apply_rope turns those and passes the rest of each head through.
    tables = rotary_tables(cfg.rope_theta, cfg.rotary_dim, context, embed.device, embed.dtype)
    return build_decoder(cfg, w, lambda i: feed_forward(cfg, w, experts, cfg.routing, i), context, rope=tables)
