"""The MoLE model's shape: one frozen dataclass read from (and written to) `config.json`, validated once.

A MoLE `config.json` carries the Mixtral shape fields the runtime reads for the dense part (attention,
norms, embeddings), plus the MoLE fields:

    model_type                "mole" (trainable checkpoint) | "mole_tables" (re-parameterized folder)
    intermediate_size         ffn width of each routed expert (the experts that become tables)
    shared_intermediate_size  ffn width of the shared expert, which runs on the hidden state
    num_local_experts         N routed experts per layer
    num_experts_per_tok       = N: the router's softmax spans every expert, none is dropped (no top-k)
    tables                    only in "mole_tables": {"file", "bits", "group_size"} of the table file

The dense and top-2 MoE baselines trained beside MoLE use the same class with `ffn` = "dense" | "moe" and
are written as plain Mixtral folders (model_type "mixtral"), so the expert runtime serves them unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quant.blob import is_count, is_positive_number
from quant.errors import UserError

MOLE_MODEL_TYPE = "mole"
TABLE_MODEL_TYPE = "mole_tables"
FFN_KINDS = ("mole", "dense", "moe")


def is_table_folder(folder) -> bool:
    """Whether `folder`'s config.json says `lut build` made it (model_type "mole_tables"). Anything unreadable
    says no: the caller's own reader then names what is wrong."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == TABLE_MODEL_TYPE


@dataclass(frozen=True)
class MoLEConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int             # routed expert ffn (moe: each expert; dense: the one ffn)
    shared_intermediate_size: int = 0  # mole only: the shared expert's ffn
    num_local_experts: int = 4
    num_experts_per_tok: int = 4       # mole: = num_local_experts (all active); moe: top-k; dense: 1
    ffn: str = "mole"                  # "mole" | "dense" | "moe"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    torch_dtype: str = "float32"
    tables: dict = field(default_factory=dict, compare=False)  # "mole_tables" folders only
    source: str = field(default="config.json", compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise UserError(f"{self.source}: field '{name}' {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "num_local_experts",
                     "num_experts_per_tok", "max_position_embeddings"):
            value = getattr(self, name)
            need(is_count(value) and value > 0, name, f"must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            need(is_positive_number(value), name, f"must be a positive finite number, got {value!r}")
        # A string "false" would be truthy and silently tie lm_head to the embedding.
        need(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings",
             f"must be true or false, got {self.tie_word_embeddings!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            need(value is None or is_count(value), name,
                 f"must be a token id (a non-negative integer) or null, got {value!r}")
        need(self.ffn in FFN_KINDS, "ffn", f"must be one of {FFN_KINDS}, got {self.ffn!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"({self.num_key_value_heads}) must divide num_attention_heads ({self.num_attention_heads})")
        need(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        if self.ffn == "mole":
            need(is_count(self.shared_intermediate_size) and self.shared_intermediate_size > 0,
                 "shared_intermediate_size", f"must be a positive integer, got {self.shared_intermediate_size!r}")
            need(self.num_experts_per_tok == self.num_local_experts, "num_experts_per_tok",
                 f"must equal num_local_experts ({self.num_local_experts}): MoLE's router uses every expert")
        if self.ffn == "dense":
            need(self.num_local_experts == 1 and self.num_experts_per_tok == 1, "num_local_experts",
                 "must be 1 (and num_experts_per_tok 1) for a dense model")
        need(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
             f"({self.num_experts_per_tok}) must not exceed num_local_experts ({self.num_local_experts})")

    # ---- config.json ---------------------------------------------------------------------------

    def to_dict(self, model_type: str | None = None) -> dict:
        """The config.json body: Mixtral's shape fields (which the runtime reads) plus ours."""
        out = asdict(self)
        out.pop("source")
        ffn = out.pop("ffn")
        tables = out.pop("tables")
        if model_type is None:
            model_type = MOLE_MODEL_TYPE if ffn == "mole" else "mixtral"
        out.update({"model_type": model_type, "sliding_window": None})
        if ffn == "mole":
            out["architectures"] = ["MoLEForCausalLM"]
        else:
            out.pop("shared_intermediate_size")
            out["architectures"] = ["MixtralForCausalLM"]
        if model_type == TABLE_MODEL_TYPE:
            out["tables"] = tables
        return out

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json",
                  model_types: tuple[str, ...] = (MOLE_MODEL_TYPE,)) -> "MoLEConfig":
        """Read a MoLE config; `model_types` lists what the caller accepts ("mole", "mole_tables")."""
        model_type = raw.get("model_type")
        if model_type not in model_types:
            raise UserError(f"{source}: model_type is {model_type!r}, not a MoLE checkpoint "
                            f"(expected {' or '.join(repr(t) for t in model_types)})")
        names = [f for f in cls.__dataclass_fields__ if f not in ("ffn", "source", "tables")]
        # Our own Mixtral folders (the dense and MoE baselines) read back with the same class.
        ffn = "mole" if model_type != "mixtral" else ("dense" if raw.get("num_local_experts") == 1 else "moe")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "num_local_experts") + (("shared_intermediate_size",) if ffn == "mole" else ())
        for name in required:
            if raw.get(name) is None:
                raise UserError(f"{source}: missing field '{name}'")
        kwargs = {n: raw[n] for n in names if raw.get(n) is not None}
        kwargs.setdefault("num_key_value_heads", raw["num_attention_heads"])
        # Only counts divide: a JSON `true` is a Python int, and 0 heads would divide by zero (both are then
        # refused by name in __post_init__).
        if "head_dim" not in kwargs and is_count(raw["hidden_size"]) and is_count(raw["num_attention_heads"]) \
                and raw["num_attention_heads"] > 0:
            kwargs["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        kwargs.setdefault("head_dim", None)
        kwargs.setdefault("num_experts_per_tok", raw["num_local_experts"])
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):
            kwargs["eos_token_id"] = eos[0] if eos else None
        if raw.get("sliding_window"):
            raise UserError(f"{source}: field 'sliding_window' is not supported by MoLE models (must be null)")
        if model_type == TABLE_MODEL_TYPE:
            tables = raw.get("tables")
            if not isinstance(tables, dict) or not isinstance(tables.get("file"), str):
                raise UserError(f"{source}: field 'tables' must be an object naming the table file")
            kwargs["tables"] = tables
        try:
            return cls(ffn=ffn, source=source, **kwargs)
        except TypeError as exc:
            raise UserError(f"{source}: {exc}") from None

    @classmethod
    def from_folder(cls, folder: Path, model_types: tuple[str, ...] = (MOLE_MODEL_TYPE,)) -> "MoLEConfig":
        path = Path(folder) / "config.json"
        if not Path(folder).exists():
            raise UserError(f"{folder}: no such model folder")
        if not Path(folder).is_dir():
            raise UserError(f"{folder}: not a folder (a MoLE checkpoint is a folder with config.json)")
        if not path.is_file():
            raise UserError(f"{path}: missing (a MoLE checkpoint folder holds config.json and model.safetensors)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path), model_types=model_types)

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def table_row_values(self) -> int:
        """Values one token needs from the tables: every layer's N expert outputs of width D."""
        return self.num_hidden_layers * self.num_local_experts * self.hidden_size
