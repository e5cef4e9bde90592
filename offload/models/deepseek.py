"""DeepSeek-V2/V2-Lite ("deepseek_v2", DeepseekV2ForCausalLM) and DeepSeek-V3 ("deepseek_v3",
DeepseekV3ForCausalLM; Kimi-K2 and Moonlight use it too): multi-head latent attention over a latent KV cache
(offload/models/mla.py), YaRN rotary scaling, and per layer either a dense MLP (the first
`first_k_dense_replace` layers, and those `moe_layer_freq` skips) or routed SwiGLU experts beside
`n_shared_experts` always-on ones, chosen by a GroupedRouter:

    deepseek_v2   softmax scores; `topk_method` "greedy" (the top k) or "group_limited_greedy" (the top k within
                  the `topk_group` of `n_group` groups with the best single scores); weights x routed_scaling_factor
    deepseek_v3   sigmoid scores plus e_score_correction_bias for the choice, groups ranked by their two best
                  scores; the chosen (unbiased) scores renormalized (`norm_topk_prob`) x routed_scaling_factor

    model.layers.N.self_attn.q_proj.weight                  [H*(Dn+Dr), D]        (q_lora_rank null)
    model.layers.N.self_attn.q_a_proj.weight                [Rq, D]               (q_lora_rank Rq)
    model.layers.N.self_attn.q_a_layernorm.weight           [Rq]
    model.layers.N.self_attn.q_b_proj.weight                [H*(Dn+Dr), Rq]
    model.layers.N.self_attn.kv_a_proj_with_mqa.weight      [R+Dr, D]
    model.layers.N.self_attn.kv_a_layernorm.weight          [R]
    model.layers.N.self_attn.kv_b_proj.weight               [H*(Dn+Dv), R]
    model.layers.N.self_attn.o_proj.weight                  [D, H*Dv]
    model.layers.N.self_attn.{q_a,kv_a_proj_with_mqa,o}_proj.bias   (attention_bias)
    model.layers.N.mlp.gate.weight                          [E, D]   the router
    model.layers.N.mlp.gate.e_score_correction_bias         [E]      (deepseek_v3)
    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight [F, D], [F, D], [D, F]
    model.layers.N.mlp.shared_experts.{gate,up,down}_proj.weight    ffn n_shared_experts x F
    model.layers.N.mlp.{gate,up,down}_proj.weight           dense layers, ffn `intermediate_size`

Dimension legend: D hidden, H heads, Rq q_lora_rank, R kv_lora_rank, Dn qk_nope_head_dim, Dr qk_rope_head_dim,
Dv v_head_dim, E routed experts, F moe_intermediate_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quant.blob import is_count, is_positive_number
from quant.errors import UserError, shown

from .config import Fields, ModelConfig, decoder_fields
from .decoder import Weights, build_decoder, expert_names, mlp, mlp_shapes, router_name
from .mla import LatentAttention, LatentKVCache, LatentProjections
from .moe import ExpertProvider, GroupedRouter, MoE
from .rotary import Yarn, apply_rope, apply_rope_interleaved, rotary_tables
from .transformer import Transformer

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
__all__ = ["MODEL_TYPES", "attention_shapes", "build", "config", "dense_shapes", "expert_names", "kv_bytes"]


@dataclass(frozen=True)
class Routing:
    """How a DeepSeek-style router scores and picks (GroupedRouter's parameters, as config.json sets them)."""

    scoring: str           # "softmax" | "sigmoid"
    groups: int = 1        # n_group
    topk_group: int = 1    # groups kept
    group_score: str = "max"   # a group's rank: its best score ("max") or its two best's sum ("top2")
    bias: bool = False     # e_score_correction_bias steers the choice
    scaling: float = 1.0   # routed_scaling_factor

    def router(self, w: Weights, cfg: ModelConfig, layer: int) -> GroupedRouter:
        bias = w(f"model.layers.{layer}.mlp.gate.e_score_correction_bias") if self.bias else None
        return GroupedRouter(w(router_name(layer)), cfg.num_experts_per_tok, self.scoring, self.groups,
                             self.topk_group, self.group_score, bias, cfg.norm_topk_prob, self.scaling)


@dataclass(frozen=True)
class DeepseekConfig(ModelConfig):
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    routing: Routing = field(default_factory=lambda: Routing("softmax"))
    yarn: Yarn | None = None
    rope_interleave: bool = True


# ---- config.json ------------------------------------------------------------------------------------------

def read_rope(f: Fields, model_type: str) -> tuple[dict, Yarn | None]:
    """config.json with its rope scaling taken out (what decoder_fields reads: the plain fields and
    rope_theta), and the YaRN scaling it described, if any. Any other kind of scaling is refused by name."""
    raw, source = f.raw, f.source
    params = f.mapping("rope_parameters")  # transformers 5 writes rope_theta and the scaling here
    scaling = f.mapping("rope_scaling") or params  # the Hub's configs: rope_scaling {"type": "yarn", ...}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    plain = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_parameters")}
    if raw.get("rope_theta") is None and params.get("rope_theta") is not None:
        plain["rope_parameters"] = {"rope_theta": params["rope_theta"]}
    if kind in ("default", None):
        return plain, None
    if kind != "yarn":
        raise UserError(f"{source}: rope scaling {shown(kind)} is not supported (field 'rope_scaling'); "
                        f"this runtime implements \"yarn\" for {model_type}")

    def number(name: str, default=None, positive: bool = True):
        value = scaling.get(name)
        if value is None:
            return default
        if not (is_positive_number(value) if positive else is_positive_number(value) or value == 0):
            raise UserError(f"{source}: field 'rope_scaling.{name}' must be a positive number, got {shown(value)}")
        return float(value)

    original = scaling.get("original_max_position_embeddings", raw.get("original_max_position_embeddings",
                                                                        raw.get("max_position_embeddings")))
    if not (is_count(original) and original > 0):
        raise UserError(f"{source}: field 'rope_scaling.original_max_position_embeddings' must be a positive "
                        f"integer, got {shown(original)}")
    factor = number("factor")
    if factor is None and is_count(raw.get("max_position_embeddings")):
        factor = raw["max_position_embeddings"] / original  # transformers' rule for a factor left out
    if factor is None:
        raise UserError(f"{source}: missing field 'rope_scaling.factor'")
    truncate = scaling.get("truncate", True)
    if not isinstance(truncate, bool):
        raise UserError(f"{source}: field 'rope_scaling.truncate' must be true or false, got {shown(truncate)}")
    # beta_fast and beta_slow of 0 (or null) take the defaults, as transformers reads them.
    return plain, Yarn(factor, original, number("beta_fast", positive=False) or 32.0,
                       number("beta_slow", positive=False) or 1.0, number("mscale", positive=False),
                       number("mscale_all_dim", positive=False), number("attention_factor"), truncate)


def count(f: Fields, name: str, default=None, positive: bool = True) -> int:
    """An integer field: positive (or non-negative), refused by name otherwise."""
    value = f.get(name, default)
    if not is_count(value) or (positive and value == 0):
        raise UserError(f"{f.source}: field '{name}' must be a {'positive' if positive else 'non-negative'} "
                        f"integer, got {shown(value)}")
    return value


def grouping(f: Fields, experts: int, k: int, group_score: str, default_groups: int, default_topk_group: int):
    """n_group and topk_group, checked: equal groups, enough experts in the kept groups for k choices, two
    per group where groups are ranked by their two best."""
    groups, kept = count(f, "n_group", default_groups), count(f, "topk_group", default_topk_group)
    if not is_count(experts) or not is_count(k):
        return groups, kept  # ModelConfig names the bad field
    if experts % groups:
        raise UserError(f"{f.source}: field 'n_group' ({groups}) must divide the {experts} routed experts")
    if kept > groups:
        raise UserError(f"{f.source}: field 'topk_group' ({kept}) must not exceed n_group ({groups})")
    if kept < groups and kept * (experts // groups) < k:
        raise UserError(f"{f.source}: field 'topk_group' ({kept}) keeps {kept * (experts // groups)} experts, "
                        f"fewer than num_experts_per_tok ({k})")
    if group_score == "top2" and kept < groups and experts // groups < 2:
        raise UserError(f"{f.source}: field 'n_group' ({groups}) leaves groups of one expert; a group is ranked "
                        f"by its two best")
    return groups, kept


def routing_fields(f: Fields, v3: bool) -> tuple[dict, Routing]:
    """The routed experts' ModelConfig fields and the Routing of a DeepSeek config."""
    experts, k = f.get("n_routed_experts"), f.get("num_experts_per_tok")
    scaling = f.get("routed_scaling_factor", 2.5 if v3 else 1.0)
    if not is_positive_number(scaling):
        raise UserError(f"{f.source}: field 'routed_scaling_factor' must be a positive number, got {shown(scaling)}")
    if v3:
        f.expect("scoring_func", ("sigmoid",), default="sigmoid")
        f.expect("topk_method", ("noaux_tc",), default="noaux_tc")
        groups, kept = grouping(f, experts, k, "top2", 8, 4)  # transformers' defaults
        routing = Routing("sigmoid", groups, kept, "top2", True, float(scaling))
        renormalize = f.flag("norm_topk_prob", True)
    else:
        f.expect("scoring_func", ("softmax",), default="softmax")
        f.expect("topk_method", ("greedy", "group_limited_greedy"), default="greedy")
        # transformers' DeepseekV2 never renormalizes (DeepSeek's own code did, without the scaling factor):
        # a config that asks for it is refused rather than run one way or the other.
        f.expect("norm_topk_prob", (False,), default=False)
        groups, kept = 1, 1
        if f.raw.get("topk_method") == "group_limited_greedy":
            groups, kept = grouping(f, experts, k, "max", None, None)
        routing = Routing("softmax", groups, kept, "max", False, float(scaling))
        renormalize = False
    shared = count(f, "n_shared_experts", 1 if v3 else 2, positive=False)
    ffn = f.get("moe_intermediate_size")
    return dict(intermediate_size=ffn, num_local_experts=experts, num_experts_per_tok=k, norm_topk_prob=renormalize,
                shared_intermediate_size=shared * ffn if is_count(ffn) else 0), routing


def dense_layer_indices(f: Fields, layers, first_default: int) -> tuple[int, ...]:
    """Layers with a dense MLP: the first `first_k_dense_replace`, and those `moe_layer_freq` skips (DeepSeek's
    rule: layer i has experts when i >= first_k_dense_replace and i % moe_layer_freq == 0)."""
    first, freq = count(f, "first_k_dense_replace", first_default, positive=False), count(f, "moe_layer_freq", 1)
    layers = layers if is_count(layers) else 0  # a bad value is refused by name when ModelConfig is made
    return tuple(i for i in range(layers) if i < first or i % freq)


def config(raw: dict, source: str) -> DeepseekConfig:
    f = Fields(raw, source)
    v3 = raw.get("model_type") == "deepseek_v3"
    plain, yarn = read_rope(f, raw.get("model_type"))
    fields = decoder_fields(Fields(plain, source), default_rope_theta=10000.0)
    f.expect("mlp_bias", (False,), default=False)
    q_rank = raw.get("q_lora_rank")
    if q_rank is not None and not (is_count(q_rank) and q_rank > 0):
        raise UserError(f"{source}: field 'q_lora_rank' must be a positive integer or null, got {shown(q_rank)}")
    rank, nope, rope_dim, v_dim = (count(f, n) for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                          "v_head_dim"))
    if rope_dim % 2:
        raise UserError(f"{source}: field 'qk_rope_head_dim' must be even for rotary embeddings, got {rope_dim}")
    moe, routing = routing_fields(f, v3)
    dense = dense_layer_indices(f, fields["num_hidden_layers"], 3 if v3 else 0)
    # The attention fields the shared parts read (the memory plan's prefill workspace): every head has its own
    # expanded keys, of the query's width Dn + Dr. transformers writes head_dim = Dr; it is not that.
    fields.update(num_key_value_heads=fields["num_attention_heads"], head_dim=nope + rope_dim, sliding_window=None)
    bias = f.flag("attention_bias", False)
    return DeepseekConfig(
        **fields, **moe, attention_bias=("q_a", "kv_a", "o") if bias else (), dense_layers=dense,
        dense_intermediate_size=f.get("intermediate_size") if dense else 0,
        q_lora_rank=q_rank, kv_lora_rank=rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim, v_head_dim=v_dim,
        routing=routing, yarn=yarn, rope_interleave=f.flag("rope_interleave", True) if v3 else True)


# ---- tensors ----------------------------------------------------------------------------------------------

def attention_shapes(cfg: DeepseekConfig, layer: int | None = None) -> dict[str, tuple[int, ...]]:
    """The projections `convert --dense-bits` may quantize: the query's, the latent's and the output's.
    kv_b_proj is not among them: decode absorbs it into the query and output sides as a plain matrix."""
    if layer is None:
        return {k: v for i in range(cfg.num_hidden_layers) for k, v in attention_shapes(cfg, i).items()}
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    p = f"model.layers.{layer}.self_attn"
    if cfg.q_lora_rank is None:
        shapes = {f"{p}.q_proj.weight": (H * qk, D)}
    else:
        shapes = {f"{p}.q_a_proj.weight": (cfg.q_lora_rank, D), f"{p}.q_b_proj.weight": (H * qk, cfg.q_lora_rank)}
    return {**shapes, f"{p}.kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D),
            f"{p}.o_proj.weight": (D, H * cfg.v_head_dim)}


def dense_shapes(cfg: DeepseekConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor that lives on the compute device: embeddings, norms, attention (kv_b_proj included),
    each MoE layer's router (and its correction bias) and shared experts, each dense layer's MLP."""
    D, V, H, E = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.num_local_experts
    R, Dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                       **attention_shapes(cfg, i), f"{p}.self_attn.kv_a_layernorm.weight": (R,),
                       f"{p}.self_attn.kv_b_proj.weight": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), R)})
        if cfg.q_lora_rank is not None:
            shapes[f"{p}.self_attn.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        if cfg.attention_bias:
            shapes[f"{p}.self_attn.kv_a_proj_with_mqa.bias"] = (R + Dr,)
            shapes[f"{p}.self_attn.o_proj.bias"] = (D,)
            if cfg.q_lora_rank is not None:
                shapes[f"{p}.self_attn.q_a_proj.bias"] = (cfg.q_lora_rank,)
        if i in cfg.dense_layers:
            shapes.update(mlp_shapes(f"{p}.mlp", D, cfg.dense_intermediate_size))
            continue
        shapes[router_name(i)] = (E, D)
        if cfg.routing.bias:
            shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (E,)
        if cfg.shared_intermediate_size:
            shapes.update(mlp_shapes(f"{p}.mlp.shared_experts", D, cfg.shared_intermediate_size))
    return shapes


def kv_bytes(cfg: DeepseekConfig, context: int, itemsize: int) -> int:
    """What the context sizes on the device: the latent cache [L, S, R + Dr] and the rotary tables cos, sin
    [S, Dr]."""
    S = min(context, cfg.max_position_embeddings)
    return (cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * cfg.qk_rope_head_dim) * S * itemsize


# ---- the forward ------------------------------------------------------------------------------------------

def feed_forward(cfg: ModelConfig, w: Weights, experts: ExpertProvider, routing: Routing, layer: int):
    """Layer `layer`'s dense MLP, or its routed experts with the shared ones (also GLM-4.5's)."""
    p = f"model.layers.{layer}.mlp"
    if layer in cfg.dense_layers:
        return mlp(w, p)
    shared = mlp(w, f"{p}.shared_experts") if cfg.shared_intermediate_size else None
    return MoE(layer, routing.router(w, cfg, layer), experts, shared=shared)


def build(cfg: DeepseekConfig, w: Weights, experts: ExpertProvider, context: int) -> Transformer:
    H, R, Dn, Dr, Dv = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                        cfg.v_head_dim)
    scale = (Dn + Dr) ** -0.5
    if cfg.yarn is not None:
        scale = cfg.yarn.softmax_scale(scale)
    rope = apply_rope_interleaved if cfg.rope_interleave else apply_rope
    bias = bool(cfg.attention_bias)

    def attention(i: int) -> LatentAttention:
        p = f"model.layers.{i}.self_attn"
        if cfg.q_lora_rank is None:
            q = dict(wq=w.proj(f"{p}.q_proj.weight"))
        else:
            q = dict(wq=w.proj(f"{p}.q_a_proj.weight"), wq_b=w.proj(f"{p}.q_b_proj.weight"),
                     q_norm=w(f"{p}.q_a_layernorm.weight"), bq=w(f"{p}.q_a_proj.bias") if bias else None)
        qkv = LatentProjections(wkv_a=w.proj(f"{p}.kv_a_proj_with_mqa.weight"), kv_norm=w(f"{p}.kv_a_layernorm.weight"),
                                eps=cfg.rms_norm_eps, bkv_a=w(f"{p}.kv_a_proj_with_mqa.bias") if bias else None, **q)
        return LatentAttention(i, H, R, Dn, Dr, Dv, qkv, w(f"{p}.kv_b_proj.weight"), w.proj(f"{p}.o_proj.weight"),
                               w(f"{p}.o_proj.bias") if bias else None, scale, rope)

    embed = w("model.embed_tokens.weight")
    tables = rotary_tables(cfg.rope_theta, Dr, context, embed.device, embed.dtype, cfg.yarn)
    cache = LatentKVCache(cfg.num_hidden_layers, R, Dr, context, embed.device, embed.dtype)
    return build_decoder(cfg, w, lambda i: feed_forward(cfg, w, experts, cfg.routing, i), context,
                          attention=attention, rope=tables, cache=cache)
