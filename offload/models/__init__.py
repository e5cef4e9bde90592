"""The models layer: the forward as parts, and one module per model family that maps the family's
config.json and tensor names onto them. Imports quant, lut and offload.formats only; never the store,
the runtime or the tools above it.

    parts     config.py (ModelConfig), norms.py, rotary.py, linear.py, attention.py (KV cache, GQA),
              moe.py (routers, expert FFN, the MoE block and its ExpertProvider seam), transformer.py
              (block, model), decoder.py (the Hub's Llama-style names most families share), mla.py (multi-head
              latent attention and its latent KV cache)
    families  mixtral.py, mole.py, qwen_moe.py (Qwen2-MoE, Qwen3-MoE), olmoe.py, deepseek.py (DeepSeek-V2, V3),
              glm4_moe.py (GLM-4.5), gpt_oss.py (gpt-oss: experts fused per layer, float or MXFP4)

A family module provides:
    MODEL_TYPES                      the config.json model_type values it reads
    config(raw, source)              config.json -> ModelConfig (or a subclass); refuses what it cannot run
    dense_shapes(cfg)                every tensor kept on the compute device, with its shape
    attention_shapes(cfg)            the projections `convert --dense-bits` may quantize (a subset of those)
    expert_names(layer, e)           names of a routed expert's gate (w1), down (w2) and up (w3) weights
or, for a family whose experts are stored fused per layer (gpt-oss), instead of expert_names:
    expert_shapes(cfg)               every fused expert tensor [E, ...] with its shape
    expert_tensors(cfg, layer)       blob record -> (fused tensor, the shape of one expert's slice)
    expert_layout(cfg, dtype, bias_dtype), expert_forward(layout, views, x)   the blob and its compute
    build(cfg, weights, experts, context) -> Transformer
Adding a family is one such module, listed in FAMILIES below, plus its tests against transformers.
"""

from __future__ import annotations

import os
from types import ModuleType

from lut import TABLE_MODEL_TYPES
from quant.errors import UserError

from ..formats.checkpoint import Checkpoint
from . import deepseek, glm4_moe, gpt_oss, mixtral, mole, olmoe, qwen_moe
from .config import ModelConfig

FAMILIES: dict[str, ModuleType] = {t: m for m in (mixtral, qwen_moe, olmoe, deepseek, glm4_moe, gpt_oss, mole) for t in m.MODEL_TYPES}
# Families whose experts the expert store serves (and `convert` quantizes); table folders have none.
EXPERT_MODEL_TYPES = tuple(t for t in FAMILIES if t not in TABLE_MODEL_TYPES)


def family(cfg: ModelConfig) -> ModuleType:
    """The family module that reads and builds `cfg`."""
    return FAMILIES[cfg.model_type]


def read_config(raw: dict, source: str, model_types: tuple[str, ...] = tuple(FAMILIES)) -> ModelConfig:
    """config.json -> ModelConfig, by its model_type's family; `model_types`: the families the caller runs."""
    model_type = raw.get("model_type")
    if model_type not in model_types:
        hint = ""
        if model_type in TABLE_MODEL_TYPES:
            hint = " (a table folder holds no routed experts; use the MoLE checkpoint it came from)"
        raise UserError(f"{source}: model_type is {model_type!r}, which this command does not run "
                        f"(supported: {', '.join(model_types)}){hint}")
    return FAMILIES[model_type].config(raw, source)


def open_checkpoint(path: str | os.PathLike, model_types: tuple[str, ...] = tuple(FAMILIES)) -> Checkpoint:
    """A model folder opened for lazy reading, its config.json read by its family (`ckpt.config`)."""
    return Checkpoint(path, lambda raw, source: read_config(raw, source, model_types))


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every routed expert tensor of an unconverted checkpoint, with its shape (none in a table folder)."""
    if cfg.model_type in TABLE_MODEL_TYPES:
        return {}
    if hasattr(family(cfg), "expert_shapes"):  # experts stored fused per layer
        return family(cfg).expert_shapes(cfg)
    D, F, names = cfg.hidden_size, cfg.intermediate_size, family(cfg).expert_names
    shapes = {}
    for i in cfg.moe_layers:
        for e in range(cfg.num_local_experts):
            w1, w2, w3 = names(i, e)
            shapes.update({w1: (F, D), w2: (D, F), w3: (F, D)})
    return shapes


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an unconverted checkpoint of this config must hold, with its shape."""
    return {**family(cfg).dense_shapes(cfg), **expert_shapes(cfg)}
