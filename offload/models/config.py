"""The model's shape as the forward sees it: one frozen dataclass, built by a family module from its
`config.json` and validated once, with errors naming the field.

Families read their own field names (`Fields`) and map them onto `ModelConfig`'s; the fields every
decoder shares (sizes, heads, rotary, norms, special tokens) are read once, by `decoder_fields`. A
family with fields of its own subclasses `ModelConfig` in its module.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.blob import is_count, is_positive_number
from quant.errors import UserError, shown


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int        # ffn width of one routed expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int        # routed experts per layer
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    # What families vary in the shared parts (offload/models/decoder.py and moe.py):
    norm_topk_prob: bool = True              # renormalize the top-k router weights over the k
    attention_bias: tuple[str, ...] = ()     # projections among q, k, v, o that carry a bias
    qk_norm: str | None = None               # RMSNorm on q and k before rotary: "head" (per head) or "whole"
    layer_types: tuple[str, ...] = ()        # per layer "full_attention" | "sliding_attention"; () all alike
    dense_layers: tuple[int, ...] = ()       # layers with a dense MLP instead of routed experts
    dense_intermediate_size: int = 0         # that MLP's ffn width
    shared_intermediate_size: int = 0        # a dense shared expert beside the routed ones (0: none)
    source: str = "config.json"

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise UserError(f"{self.source}: field '{field}' {why}")

        # Types first, so the arithmetic checks below never meet a string; a JSON `true` is a Python int,
        # which is_count refuses, or it would reach torch as a size of 1.
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                     "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            need(is_count(value) and value > 0, name, f"must be a positive integer, got {shown(value)}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            need(is_positive_number(value), name, f"must be a positive number, got {shown(value)}")
            object.__setattr__(self, name, float(value))  # an integer rope_theta (1000000) reads as a float
        need(self.sliding_window is None or is_count(self.sliding_window), "sliding_window",
             f"must be a non-negative integer or null, got {shown(self.sliding_window)}")
        need(self.torch_dtype is None or isinstance(self.torch_dtype, str), "torch_dtype",
             f"must be a dtype name such as \"bfloat16\", got {shown(self.torch_dtype)}")
        need(self.bos_token_id is None or is_count(self.bos_token_id), "bos_token_id",
             f"must be a token id (a non-negative integer) or null, got {shown(self.bos_token_id)}")
        need(all(map(is_count, self.eos_token_id)), "eos_token_id",
             f"must be a token id, a list of token ids or null, got {shown(list(self.eos_token_id))}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})")
        need(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
             f"({self.num_experts_per_tok}) must not exceed num_local_experts ({self.num_local_experts})")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        need(isinstance(self.norm_topk_prob, bool), "norm_topk_prob",
             f"must be true or false, got {shown(self.norm_topk_prob)}")
        need(not self.layer_types or (len(self.layer_types) == self.num_hidden_layers and set(self.layer_types)
                                      <= {"full_attention", "sliding_attention"}), "layer_types",
             f"must list \"full_attention\" or \"sliding_attention\" for each of the {self.num_hidden_layers} layers, "
             f"got {shown(list(self.layer_types))}")
        need(all(is_count(i) and i < self.num_hidden_layers for i in self.dense_layers), "mlp_only_layers",
             f"must list layer indices below num_hidden_layers ({self.num_hidden_layers}), "
             f"got {shown(list(self.dense_layers))}")
        for name in ("dense_intermediate_size", "shared_intermediate_size"):
            need(is_count(getattr(self, name)), name, f"must be a non-negative integer, got {shown(getattr(self, name))}")
        need(not self.dense_layers or self.dense_intermediate_size > 0, "intermediate_size",
             "must be a positive integer: it is the ffn width of the dense layers")
        need(len(self.moe_layers) > 0, "mlp_only_layers", "leaves no layer with experts: this is a dense model")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The layers whose feed-forward part is routed experts (the expert store serves these)."""
        return tuple(i for i in range(self.num_hidden_layers) if i not in self.dense_layers)

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window, or None when it attends to the whole context."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window or None

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up: [F, D]; down: [D, F])."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def experts_total(self) -> int:
        return len(self.moe_layers) * self.num_local_experts


class Fields:
    """config.json's fields, read with errors naming the file and the field."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def get(self, name: str, default=None, required: bool = True):
        """The field's value; a missing (or null) one is `default`, or an error when there is none."""
        if name in self.raw and self.raw[name] is not None:
            return self.raw[name]
        if required and default is None:
            raise UserError(f"{self.source}: missing field '{name}'")
        return default

    def flag(self, name: str, default: bool) -> bool:
        """A true/false field; anything else is refused by name (a string "false" would read as true)."""
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise UserError(f"{self.source}: field '{name}' must be true or false, got {shown(value)}")
        return value

    def expect(self, name: str, allowed: tuple, default=None) -> None:
        """A field this runtime implements only for some values: any other is refused by name."""
        value = self.raw.get(name, default)
        if value not in allowed:
            raise UserError(f"{self.source}: field '{name}' is {shown(value)}; this runtime implements "
                            f"{' or '.join(shown(a) for a in allowed)}")

    def mapping(self, name: str) -> dict:
        """A field that holds a JSON object (absent or null: empty), so `.get` on it cannot fail."""
        value = self.raw.get(name)
        if value is not None and not isinstance(value, dict):
            raise UserError(f"{self.source}: field '{name}' must be an object or null, got {shown(value)}")
        return value or {}


def decoder_fields(f: Fields, default_rope_theta: float = 1e6) -> dict:
    """The ModelConfig fields every decoder family spells alike, read from config.json. Fields that would
    change the math and that no family implements yet (rope scaling, a pre-quantized checkpoint) are
    refused by name, never ignored."""
    raw, source = f.raw, f.source
    heads = f.get("num_attention_heads")
    hidden = f.get("hidden_size")
    # Older configs keep rope_theta at the top level; newer transformers nest it in rope_parameters. Only a
    # missing value takes the default: a present one, even 0, is the config's and is validated as such.
    rope = f.mapping("rope_parameters")
    if raw.get("rope_theta") is not None:
        rope_theta = raw["rope_theta"]
    elif rope.get("rope_theta") is not None:
        rope_theta = rope["rope_theta"]
        if not is_positive_number(rope_theta):
            raise UserError(f"{source}: field 'rope_parameters.rope_theta' must be a positive number, "
                            f"got {shown(rope_theta)}")
    else:
        rope_theta = default_rope_theta
    if rope.get("rope_type", "default") != "default" or f.mapping("rope_scaling"):
        raise UserError(f"{source}: rope scaling is not supported (field 'rope_scaling'/'rope_parameters')")
    quantization = f.mapping("quantization_config")
    if quantization:
        raise UserError(f"{source}: a pre-quantized checkpoint (quantization_config: "
                        f"{quantization.get('quant_method', '?')}) is not supported; "
                        f"start from the float model (moe-offload convert quantizes its experts)")
    f.expect("hidden_act", ("silu",), default="silu")  # every family's experts here are SiLU-gated (SwiGLU)
    tie = raw.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise UserError(f"{source}: field 'tie_word_embeddings' must be true or false, got {shown(tie)}")
    eos = raw.get("eos_token_id")
    return dict(
        model_type=raw.get("model_type"),
        hidden_size=hidden,
        num_hidden_layers=f.get("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=f.get("num_key_value_heads", heads),
        # Without valid hidden_size and heads there is no default; __post_init__ then names the bad field.
        head_dim=f.get("head_dim", hidden // heads if is_count(hidden) and is_count(heads) and heads else None,
                       required=False),
        rms_norm_eps=f.get("rms_norm_eps", 1e-5),
        rope_theta=rope_theta,
        vocab_size=f.get("vocab_size"),
        max_position_embeddings=f.get("max_position_embeddings", 4096 * 32),
        sliding_window=raw.get("sliding_window"),
        tie_word_embeddings=tie,
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        source=source,
    )
