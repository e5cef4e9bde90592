"""The model's shape, read once from a Hugging Face `config.json` and validated with errors naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quant.blob import is_count, is_positive_number

from .errors import UserError

# Families whose checkpoints use Mixtral's layout and names (Mixtral itself, and the same
# architecture under other names). Anything else is refused rather than misread.
MIXTRAL_MODEL_TYPES = ("mixtral",)


def shown(value, limit: int = 60) -> str:
    """A value as config.json spells it (`true`, not `True`), cut short: a bad field may hold a long list."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # not JSON (a dataclass built in Python): its repr
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
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

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (w1, w3: [F, D]; w2: [D, F])."""
        return 3 * self.hidden_size * self.intermediate_size

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json",
                  model_types: tuple[str, ...] = MIXTRAL_MODEL_TYPES) -> "ModelConfig":
        """Read the shape fields; `model_types` lists the families the caller can run."""
        model_type = raw.get("model_type")
        if model_type not in model_types:
            hint = "; `moe-offload lut build` turns a MoLE checkpoint into tables that generate runs" \
                if model_type == "mole" else ""
            raise UserError(f"{source}: model_type is {model_type!r}, not a Mixtral-family config "
                            f"(expected one of {', '.join(model_types)}){hint}")

        def get(name: str, default=None, required: bool = True):
            if name in raw and raw[name] is not None:
                return raw[name]
            if required and default is None:
                raise UserError(f"{source}: missing field '{name}'")
            return default

        def mapping(name: str) -> dict:
            """A field that holds a JSON object (absent or null: empty), so `.get` on it cannot fail."""
            value = raw.get(name)
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{source}: field '{name}' must be an object or null, got {shown(value)}")
            return value or {}

        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        # Older configs keep rope_theta at the top level; newer transformers nest it in rope_parameters. Only a
        # missing value takes the default: a present one, even 0, is the config's and is validated as such.
        rope = mapping("rope_parameters")
        if raw.get("rope_theta") is not None:
            rope_theta = raw["rope_theta"]
        elif rope.get("rope_theta") is not None:
            rope_theta = rope["rope_theta"]
            if not is_positive_number(rope_theta):
                raise UserError(f"{source}: field 'rope_parameters.rope_theta' must be a positive number, "
                                f"got {shown(rope_theta)}")
        else:
            rope_theta = 1e6
        if rope.get("rope_type", "default") != "default" or mapping("rope_scaling"):
            raise UserError(f"{source}: rope scaling is not supported (field 'rope_scaling'/'rope_parameters')")
        quantization = mapping("quantization_config")
        if quantization:
            raise UserError(f"{source}: a pre-quantized checkpoint (quantization_config: "
                            f"{quantization.get('quant_method', '?')}) is not supported; "
                            f"start from the float model (moe-offload convert quantizes its experts)")
        tie = raw.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise UserError(f"{source}: field 'tie_word_embeddings' must be true or false, got {shown(tie)}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", heads),
            # Without valid hidden_size and heads there is no default; __post_init__ then names the bad field.
            head_dim=get("head_dim", hidden // heads if is_count(hidden) and is_count(heads) and heads else None,
                         required=False),
            num_local_experts=get("num_local_experts"),
            num_experts_per_tok=get("num_experts_per_tok", 2),
            rms_norm_eps=get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            vocab_size=get("vocab_size"),
            max_position_embeddings=get("max_position_embeddings", 4096 * 32),
            sliding_window=raw.get("sliding_window"),
            tie_word_embeddings=tie,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos_ids,
            source=source,
        )

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no config.json (is this a Hugging Face model folder?)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))
