"""The model's shape, read once from a Hugging Face `config.json` and validated with errors naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# Families whose checkpoints use Mixtral's layout and names (Mixtral itself, and the same
# architecture under other names). Anything else is refused rather than misread.
MIXTRAL_MODEL_TYPES = ("mixtral",)


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

        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                     "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})")
        need(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
             f"({self.num_experts_per_tok}) must not exceed num_local_experts ({self.num_local_experts})")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        need(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")

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

        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        # Older configs keep rope_theta at the top level; newer transformers nest it in rope_parameters.
        rope = raw.get("rope_parameters") or {}
        rope_theta = raw.get("rope_theta") or rope.get("rope_theta") or 1e6
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise UserError(f"{source}: rope scaling is not supported (field 'rope_scaling'/'rope_parameters')")
        if raw.get("quantization_config"):
            method = raw["quantization_config"].get("quant_method", "?") if isinstance(raw["quantization_config"], dict) else "?"
            raise UserError(f"{source}: a pre-quantized checkpoint (quantization_config: {method}) is not supported; "
                            f"start from the float model (moe-offload convert quantizes its experts)")
        tie = raw.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise UserError(f"{source}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        try:
            return cls(
                hidden_size=hidden,
                intermediate_size=get("intermediate_size"),
                num_hidden_layers=get("num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=get("num_key_value_heads", heads),
                head_dim=get("head_dim", hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None),
                num_local_experts=get("num_local_experts"),
                num_experts_per_tok=get("num_experts_per_tok", 2),
                rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                vocab_size=get("vocab_size"),
                max_position_embeddings=get("max_position_embeddings", 4096 * 32),
                sliding_window=raw.get("sliding_window"),
                tie_word_embeddings=tie,
                torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=eos_ids,
                source=source,
            )
        except (TypeError, ValueError) as exc:
            raise UserError(f"{source}: {exc}") from None

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
