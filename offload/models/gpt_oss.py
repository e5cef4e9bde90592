"""gpt-oss ("gpt_oss", GptOssForCausalLM: gpt-oss-20b, gpt-oss-120b): the shared decoder's grouped-query
attention with biases on q, k, v and o, a learned sink per head (one more logit in each head's softmax, whose
share of the attention goes nowhere), layers alternating a sliding window and the full context (`layer_types`),
YaRN rotary scaling; a router with a bias that takes the top k logits and softmaxes over those k; experts
with biases and a clamped SwiGLU, stored fused per layer:

    model.layers.N.self_attn.sinks                          [H]
    model.layers.N.mlp.router.{weight,bias}                 [E, D], [E]
    model.layers.N.mlp.experts.gate_up_proj                 [E, D, 2F]   gate and up columns interleaved
    model.layers.N.mlp.experts.gate_up_proj_bias            [E, 2F]
    model.layers.N.mlp.experts.down_proj                    [E, F, D]
    model.layers.N.mlp.experts.down_proj_bias               [E, D]

or, as the Hub ships them (quantization_config {"quant_method": "mxfp4"}), the weights in MXFP4 (quant/mxfp4.py),
rows being output features:

    model.layers.N.mlp.experts.gate_up_proj_{blocks,scales} [E, 2F, D/32, 16], [E, 2F, D/32]
    model.layers.N.mlp.experts.down_proj_{blocks,scales}    [E, D, F/32, 16], [E, D, F/32]

Expert e's blob is its slice of each of a layer's fused tensors, read as stored: a float checkpoint's as a
"dense" blob (gate_up [D, 2F], down [F, D] and the biases), an MXFP4 one's as an "mxfp4" blob, never widened.

Dimension legend: T tokens, D hidden, H query heads, K key/value heads, Hd head dim, E experts, F expert ffn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import quant
from quant import mxfp4
from quant.blob import BlobLayout, is_positive_number
from quant.errors import UserError, shown

from .attention import Attention
from .config import Fields, ModelConfig, decoder_fields
from .decoder import (
    Weights,
    attention_shapes,
    build_decoder,
    decoder_shapes,
    qkv_projections,
)
from .deepseek import count, read_rope
from .moe import ExpertProvider, MoE
from .rotary import Yarn, rotary_tables
from .transformer import Transformer

MODEL_TYPES = ("gpt_oss",)
__all__ = ["MODEL_TYPES", "attention_shapes", "build", "config", "dense_shapes", "expert_forward", "expert_layout",
           "expert_shapes", "expert_tensors"]
# transformers' GptOssConfig when config.json names no rope scaling (the published configs all name it).
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


@dataclass(frozen=True)
class GptOssConfig(ModelConfig):
    swiglu_limit: float = 7.0
    swiglu_alpha: float = mxfp4.GPT_OSS_ALPHA
    yarn: Yarn | None = None
    mxfp4: bool = False  # the experts are stored in MXFP4 (quantization_config)

    @property
    def expert_params(self) -> int:
        """Parameters of one expert: gate_up [D, 2F], down [F, D] and their biases."""
        D, F_ = self.hidden_size, self.intermediate_size
        return 3 * D * F_ + 2 * F_ + D


# ---- config.json ------------------------------------------------------------------------------------------

def config(raw: dict, source: str) -> GptOssConfig:
    f = Fields(raw, source)
    quantization = f.mapping("quantization_config")
    if quantization and quantization.get("quant_method") != "mxfp4":
        raise UserError(f"{source}: field 'quantization_config.quant_method' is "
                        f"{shown(quantization.get('quant_method'))}; this runtime reads gpt-oss experts in \"mxfp4\" "
                        f"or unquantized")
    if not any(raw.get(k) for k in ("rope_scaling", "rope_parameters")):
        raw = {**raw, "rope_scaling": DEFAULT_ROPE}
    plain, yarn = read_rope(Fields(raw, source), "gpt_oss")
    plain.pop("quantization_config", None)  # read above; decoder_fields refuses any it meets
    fields = decoder_fields(Fields(plain, source), default_rope_theta=150000.0)
    layers = fields["num_hidden_layers"]
    types = raw.get("layer_types")
    if types is None and isinstance(layers, int):  # transformers' default: sliding first, then alternating
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if not isinstance(types, list):
        raise UserError(f"{source}: field 'layer_types' must be a list, got {shown(types)}")
    fields["sliding_window"] = count(f, "sliding_window", 128) if "sliding_attention" in types else None
    limit, alpha = f.get("swiglu_limit", 7.0), f.get("swiglu_alpha", mxfp4.GPT_OSS_ALPHA)
    for name, value in (("swiglu_limit", limit), ("swiglu_alpha", alpha)):
        if not is_positive_number(value):
            raise UserError(f"{source}: field '{name}' must be a positive number, got {shown(value)}")
    bias = f.flag("attention_bias", True)
    return GptOssConfig(
        **fields, intermediate_size=f.get("intermediate_size"), num_local_experts=f.get("num_local_experts"),
        num_experts_per_tok=f.get("num_experts_per_tok", raw.get("experts_per_token")),
        norm_topk_prob=True, attention_bias=("q", "k", "v", "o") if bias else (), layer_types=tuple(types),
        swiglu_limit=float(limit), swiglu_alpha=float(alpha), yarn=yarn, mxfp4=bool(quantization))


# ---- tensors ----------------------------------------------------------------------------------------------

def dense_shapes(cfg: GptOssConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor that lives on the compute device: the decoder's, each layer's sinks and router."""
    D, E, H, shapes = cfg.hidden_size, cfg.num_local_experts, cfg.num_attention_heads, decoder_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.sinks": (H,), f"{p}.mlp.router.weight": (E, D), f"{p}.mlp.router.bias": (E,)})
    return shapes


def expert_tensors(cfg: GptOssConfig, layer: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each blob record of layer `layer`'s experts -> (the fused Hub tensor [E, ...] whose slice e it is, that
    slice's shape)."""
    D, F_, p = cfg.hidden_size, cfg.intermediate_size, f"model.layers.{layer}.mlp.experts"
    bias = {"gate_up.bias": (f"{p}.gate_up_proj_bias", (2 * F_,)), "down.bias": (f"{p}.down_proj_bias", (D,))}
    if not cfg.mxfp4:
        return {"gate_up": (f"{p}.gate_up_proj", (D, 2 * F_)), "down": (f"{p}.down_proj", (F_, D)), **bias}
    out = {}
    for name, rows, cols in (("gate_up", 2 * F_, D), ("down", D, F_)):
        if cols % mxfp4.BLOCK:
            raise UserError(f"{cfg.source}: MXFP4 experts need {'hidden_size' if name == 'gate_up' else 'intermediate_size'}"
                            f" ({cols}) to be a multiple of {mxfp4.BLOCK}")
        out[f"{name}.blocks"] = (f"{p}.{name}_proj_blocks", (rows, cols // mxfp4.BLOCK, mxfp4.BLOCK // 2))
        out[f"{name}.scales"] = (f"{p}.{name}_proj_scales", (rows, cols // mxfp4.BLOCK))
    return {**out, **bias}


def expert_shapes(cfg: GptOssConfig) -> dict[str, tuple[int, ...]]:
    """Every fused expert tensor of the checkpoint, with its shape [E, ...]."""
    E = cfg.num_local_experts
    return {name: (E, *shape) for i in cfg.moe_layers for name, shape in expert_tensors(cfg, i).values()}


def expert_layout(cfg: GptOssConfig, dtype: torch.dtype, bias_dtype: torch.dtype) -> BlobLayout:
    """One expert's blob: MXFP4 weights as stored with their biases as stored (`bias_dtype`), or float weights
    and biases at the compute dtype."""
    act = {"swiglu_limit": cfg.swiglu_limit, "swiglu_alpha": cfg.swiglu_alpha}
    if cfg.mxfp4:
        return mxfp4.expert_layout(cfg.hidden_size, cfg.intermediate_size, act, bias_dtype)
    D, F_ = cfg.hidden_size, cfg.intermediate_size
    return BlobLayout.build([("gate_up", dtype, (D, 2 * F_)), ("gate_up.bias", dtype, (2 * F_,)),
                             ("down", dtype, (F_, D)), ("down.bias", dtype, (D,))],
                            kind="dense", bits=torch.finfo(dtype).bits, extra={"ffn": "gpt_oss", **act})


def expert_forward(layout: BlobLayout, views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The expert in a blob on x [T, D] -> [T, D], in x's dtype: as transformers' GptOssExperts computes it."""
    if layout.kind == "mxfp4":
        return quant.expert_forward(layout, views, x)
    dt, limit, alpha = x.dtype, layout.extra["swiglu_limit"], layout.extra["swiglu_alpha"]
    gate_up = x @ views["gate_up"].to(dt) + views["gate_up.bias"].to(dt)                    # [T, 2F]
    return mxfp4.clamped_swiglu(gate_up, limit, alpha) @ views["down"].to(dt) + views["down.bias"].to(dt)


# ---- the forward ------------------------------------------------------------------------------------------

class TopKSoftmaxRouter:
    """Logits with a bias, their top k, a softmax over those k (in the logits' dtype)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, k: int):
        self.weight, self.bias, self.k = weight, bias, k  # [E, D], [E]

    def dense_tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.bias]

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, D] -> (weights [T, k] in h's dtype, expert ids [T, k])."""
        top, ids = torch.topk(F.linear(h, self.weight, self.bias), self.k, dim=-1)
        return F.softmax(top, dim=1, dtype=top.dtype), ids

    def choose(self, h: torch.Tensor) -> torch.Tensor:
        """The expert ids [T, k] the forward picks for h [T, D] (router-ahead prefetch guesses with them)."""
        return torch.topk(F.linear(h, self.weight, self.bias), self.k, dim=-1).indices


class SinkAttention(Attention):
    """Attention whose softmax in each head has one more logit, the head's sink, whose value is zero: SDPA
    over the keys plus one zero key whose score the mask sets to the sink (q . 0 = 0, plus the mask)."""

    def __init__(self, *args, sinks: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.sinks = sinks  # [H]

    def dense_tensors(self) -> list[torch.Tensor]:
        return super().dense_tensors() + [self.sinks]

    def attend(self, q, keys, values, mask, causal):
        T, S, H = q.shape[2], keys.shape[2], self.heads
        if mask is None:  # decode attends to every key; a causal prefill from position 0 has S == T
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device)
            if causal:
                mask = mask.tril()
        zero = keys.new_zeros(1, keys.shape[1], 1, keys.shape[3])
        keys, values = torch.cat([keys, zero], dim=2), torch.cat([values, zero], dim=2)  # [1, K, S + 1, Hd]
        bias = torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        bias = torch.cat([bias.expand(H, T, S), self.sinks.to(q.dtype)[:, None, None].expand(H, T, 1)], dim=-1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias[None], enable_gqa=H != self.kv_heads)


def build(cfg: GptOssConfig, w: Weights, experts: ExpertProvider, context: int) -> Transformer:
    def attention(i: int) -> SinkAttention:
        p = f"model.layers.{i}.self_attn"
        bo = w(f"{p}.o_proj.bias") if "o" in cfg.attention_bias else None
        return SinkAttention(i, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.window(i),
                             qkv_projections(cfg, w, i), w.proj(f"{p}.o_proj.weight"), bo, sinks=w(f"{p}.sinks"))

    def ffn(i: int) -> MoE:
        p = f"model.layers.{i}.mlp.router"
        return MoE(i, TopKSoftmaxRouter(w(f"{p}.weight"), w(f"{p}.bias"), cfg.num_experts_per_tok), experts)

    embed = w("model.embed_tokens.weight")
    tables = rotary_tables(cfg.rope_theta, cfg.head_dim, context, embed.device, embed.dtype, cfg.yarn)
    return build_decoder(cfg, w, ffn, context, attention=attention, rope=tables)
