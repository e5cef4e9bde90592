"""MoLE, Mixture of Lookup Experts (lut/): the shared decoder, and per layer a shared SwiGLU FFN on the
hidden state plus N routed experts weighted by a softmax over ALL N (no top-k), each expert reading the
token's own embedding row (normalized by expert_norm) instead of the hidden state.

    model_type "mole"          the trained checkpoint (scripts/train_mole.py), run as it was trained: its
                               routed experts are SwiGLU experts like Mixtral's, served by the expert store
                               (tiers, caches and prefetch apply) and fed the normalized embedding.
    model_type "mole_tables"   the same model after `moe-offload lut build`: every expert's output on every
                               token id is a table row, served by lut.serve.TableStore; per step only the
                               rows of the step's tokens reach the device.

    model.layers.N.mole.shared.{w1,w3}.weight        [Fs, D]  (w2: [D, Fs])
    model.layers.N.mole.router.weight                [N, D]
    model.layers.N.mole.expert_norm.weight           [D]      ("mole" only: folded into the tables)
    model.layers.N.mole.experts.E.{w1,w3}.weight     [F, D]   (w2: [D, F]; "mole" only)

Dimension legend: T tokens, D hidden, N experts, F expert ffn, Fs shared ffn.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from lut import TABLE_MODEL_TYPES
from lut.config import MOLE_MODEL_TYPE, MoLEConfig
from lut.model import mix, router_weights

from .config import Fields, ModelConfig, decoder_fields
from .decoder import Weights, attention_shapes, build_decoder, decoder_shapes
from .moe import ExpertProvider, MoE, SoftmaxRouter, SwiGLU
from .norms import rms_norm
from .transformer import Transformer

MODEL_TYPES = (MOLE_MODEL_TYPE, *TABLE_MODEL_TYPES)
__all__ = ["MODEL_TYPES", "config", "dense_shapes", "attention_shapes", "expert_names", "build"]


def config(raw: dict, source: str) -> ModelConfig:
    m = MoLEConfig.from_dict(raw, source=source, model_types=MODEL_TYPES)  # MoLE's own checks, by field
    fields = decoder_fields(Fields(raw, source))  # refuses what no family implements (rope scaling, ...)
    fields.update(hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
                  num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
                  head_dim=m.head_dim, rms_norm_eps=m.rms_norm_eps, rope_theta=m.rope_theta,
                  vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings,
                  tie_word_embeddings=m.tie_word_embeddings, bos_token_id=m.bos_token_id)
    return ModelConfig(**fields, intermediate_size=m.intermediate_size, num_local_experts=m.num_local_experts,
                       num_experts_per_tok=m.num_local_experts, norm_topk_prob=False,
                       shared_intermediate_size=m.shared_intermediate_size)


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """Names of one routed expert's w1 (gate), w2 (down) and w3 (up) in a "mole" checkpoint."""
    p = f"model.layers.{layer}.mole.experts.{expert}"
    return f"{p}.w1.weight", f"{p}.w2.weight", f"{p}.w3.weight"


def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor that lives on the compute device: the decoder's, each layer's shared FFN and router, and
    (before the experts became tables) the experts' input norm."""
    D, Fs, N = cfg.hidden_size, cfg.shared_intermediate_size, cfg.num_local_experts
    shapes = decoder_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mole"
        shapes.update({f"{p}.shared.w1.weight": (Fs, D), f"{p}.shared.w2.weight": (D, Fs),
                       f"{p}.shared.w3.weight": (Fs, D), f"{p}.router.weight": (N, D)})
        if cfg.model_type == MOLE_MODEL_TYPE:
            shapes[f"{p}.expert_norm.weight"] = (D,)
    return shapes


class EmbeddingInput:
    """What MoLE's routed experts read: the token's embedding row, RMS-normed by expert_norm [T, D]."""

    def __init__(self, embed: torch.Tensor, norm: torch.Tensor, eps: float):
        self.embed, self.norm, self.eps = embed, norm, eps

    def dense_tensors(self) -> list[torch.Tensor]:
        return [self.norm]  # the embedding is the model's own

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        return rms_norm(F.embedding(token_ids, self.embed), self.norm, self.eps)


class TableRows(Protocol):
    """Whoever serves a table model's rows (lut.serve.TableStore)."""

    def begin(self, layer: int, token_ids: torch.Tensor) -> None:
        """Start fetching the step's rows (layer 0 begins a step)."""

    def rows(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s rows for the step's tokens: [T, N, D] on the device, in the compute dtype."""


class TableMoLE:
    """MoLE's block over tables: shared(h) + softmax(router(h)) . rows of the step's tokens."""

    def __init__(self, layer: int, shared: SwiGLU, router: torch.Tensor, tables: TableRows):
        self.layer, self.shared, self.router, self.tables = layer, shared, router, tables

    def dense_tensors(self) -> list[torch.Tensor]:
        return [*self.shared.dense_tensors(), self.router]

    def __call__(self, h: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        # Start the rows' fetch first (layer 0 begins the step), so the copy overlaps the shared FFN.
        self.tables.begin(self.layer, token_ids)
        shared = self.shared(h)                                  # [T, D]
        gates = router_weights(h, self.router)                   # [T, N]
        return mix(shared, gates, self.tables.rows(self.layer))  # rows [T, N, D]


def build(cfg: ModelConfig, w: Weights, experts: ExpertProvider | TableRows, context: int) -> Transformer:
    """`experts`: the expert store ("mole") or the table store ("mole_tables")."""
    def ffn(i: int):
        p = f"model.layers.{i}.mole"
        shared = SwiGLU(w(f"{p}.shared.w1.weight"), w(f"{p}.shared.w2.weight"), w(f"{p}.shared.w3.weight"))
        if cfg.model_type != MOLE_MODEL_TYPE:
            return TableMoLE(i, shared, w(f"{p}.router.weight"), experts)
        router = SoftmaxRouter(w(f"{p}.router.weight"), cfg.num_local_experts, renormalize=cfg.norm_topk_prob)
        source = EmbeddingInput(w("model.embed_tokens.weight"), w(f"{p}.expert_norm.weight"), cfg.rms_norm_eps)
        return MoE(i, router, experts, shared=shared, expert_input=source)

    return build_decoder(cfg, w, ffn, context)
