"""What a model folder is: shape, parameter counts dense vs experts, bytes per expert, dense bytes on the GPU."""

from __future__ import annotations

import os

import torch

from lut.config import is_table_folder
from lut.serve import describe_tables
from quant.blob import BlobLayout
from quant.errors import UserError
from quant.units import parse_bytes

from .formats.checkpoint import holds_weights, read_config_json
from .formats.converted import dense_format
from .models import EXPERT_MODEL_TYPES, family, open_checkpoint, read_config
from .runtime import (DTYPES, check_context, check_device_name, check_dtype_name, open_checked, resolve_device,
                      resolve_dtype, resolve_model_path)
from .store.memory import dense_bytes, device_bytes_free, device_capability, expected_traffic, kv_bytes, plan_memory
from .store.partial import staging_nbytes


def open_folder(path: str | os.PathLike | None):
    """(config, checkpoint, expert source, conversion record) of a model folder, opened and checked
    (runtime.open_checked); a folder holding config.json and no weights is read from its config alone
    (checkpoint, source and record None), so a model can be planned before it is fetched."""
    folder = resolve_model_path(path)
    if holds_weights(folder) or not (folder / "config.json").is_file():
        ckpt, source, info = open_checked(path)
        return ckpt.config, ckpt, source, info
    return read_config(read_config_json(folder), str(folder / "config.json"), EXPERT_MODEL_TYPES), None, None, None


def expert_blob_bytes(cfg, source, info, dtype: torch.dtype) -> int:
    """One expert's blob: a converted folder's, or one shipped in MXFP4 (as stored, whatever the compute dtype),
    or float experts' at `dtype` (a family with fused experts says its own layout: gpt-oss's carries biases)."""
    if info or (source is not None and source.layout.kind == "mxfp4"):
        return source.layout.nbytes
    fam = family(cfg)
    if hasattr(fam, "expert_layout"):  # from config.json alone: the Hub's MXFP4 biases are bfloat16
        return fam.expert_layout(cfg, dtype, torch.bfloat16).nbytes
    return BlobLayout.dense(cfg.hidden_size, cfg.intermediate_size, dtype).nbytes


def describe(path: str | os.PathLike | None) -> dict:
    """A dict describing the model folder; unquantized byte figures use the checkpoint's dtype."""
    if is_table_folder(resolve_model_path(path)):
        return describe_tables(open_checkpoint(resolve_model_path(path)))
    cfg, ckpt, source, info = open_folder(path)
    if ckpt is not None:
        file_dtype = ckpt.locations["model.embed_tokens.weight"].dtype
        ckpt.close()  # headers were all it needed
    else:
        file_dtype = DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    fmt = dense_format(info)
    width = file_dtype.itemsize
    n_experts = cfg.experts_total
    dense_params, expert_params = dense_bytes(cfg, 1), n_experts * cfg.expert_params
    # Float experts at the checkpoint's width, without the blob header (a parameter count x bytes); a converted or
    # MXFP4 folder's as their blobs are.
    mxfp4 = getattr(cfg, "mxfp4", False)
    blob = expert_blob_bytes(cfg, source, info, file_dtype) if info or mxfp4 else cfg.expert_params * width
    active = dense_params + len(cfg.moe_layers) * cfg.num_experts_per_tok * cfg.expert_params
    out = {
        "path": str(resolve_model_path(path)),
        "model_type": cfg.model_type,  # the family that runs it (offload/models)
        "weights": "safetensors" if ckpt else "none: config.json alone (every figure from the config)",
        "layers": cfg.num_hidden_layers,
        "experts_per_layer": cfg.num_local_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "checkpoint_dtype": str(file_dtype).removeprefix("torch."),
        "params_total": dense_params + expert_params,
        "params_dense": dense_params,  # shared experts and dense MLP layers included
        "params_experts": expert_params,
        "params_shared_experts": len(cfg.moe_layers) * 3 * cfg.hidden_size * cfg.shared_intermediate_size,
        # What one token multiplies by: every dense weight (the embedding row included) and k experts per layer.
        "params_active_per_token": active,
        "expert_fraction": round(expert_params / max(1, dense_params + expert_params), 4),
        "experts_total": n_experts,
        # A converted folder's experts are quantized blobs: their size is the blob's, header included.
        "bytes_per_expert": blob,
        "bytes_dense_gpu": dense_bytes(cfg, width, fmt),
        "bytes_all_experts": n_experts * blob,
        "expert_uses_per_token": len(cfg.moe_layers) * cfg.num_experts_per_tok,
        # What one more position of --context adds on the device: its KV cache row in every layer (DeepSeek's: the
        # compressed latent) and its rotary tables' row.
        "bytes_kv_per_token": kv_bytes(cfg, 2, width) - kv_bytes(cfg, 1, width),
    }
    if mxfp4:
        out["quantized"] = "experts MXFP4 as shipped (4.25 bits a weight), attention as stored"
    if info:
        experts = "MXFP4" if info["bits"] == "mxfp4" else f"{info['bits']}-bit (group {info['group_size']})"
        sp = info.get("sparse")
        if sp:  # convert --sparse: --bits is the up projection's; each neuron's chunk has its own width
            chunks = "float16" if sp["chunk_bits"] == 16 else f"{sp['chunk_bits']}-bit"
            rank = (info.get("predictor") or {}).get("rank")
            predictors = f"neuron predictors of rank {rank}" if rank else "no neuron predictors"
            experts = (f"sparse (up projection {experts}, neuron chunks {chunks}, {sp['target']:g} of the neurons "
                       f"dropped on {sp.get('calibration', 'its calibration text')}, {predictors})")
        out["quantized"] = f"experts {experts}, attention " + (
            f"{fmt[0]}-bit (group {fmt[1]})" if fmt else "fp16")
    return out


def check_plan_options(device: str, dtype: str, context: int) -> None:
    """The plan's --device, --dtype and --context, checked without needing the device itself."""
    check_device_name(device)
    check_dtype_name(dtype)
    check_context(context)


def memory_plan(path: str | os.PathLike | None, vram=None, ram=None, device: str = "auto", dtype: str = "auto",
                context: int = 2048, hit_rate: float = 0.5, bandwidth: float = 25e9) -> dict:
    """What lives where under --vram/--ram (the expert store's own MemoryPlan, built without reading any
    weights), and the bytes an average decode step moves when a fraction `hit_rate` of expert uses hit.

    `device` may be "cuda" on a machine without a GPU, to plan for one (then --vram is needed)."""
    if is_table_folder(resolve_model_path(path)):
        raise UserError(f"{path}: a table folder has no expert slots to plan: its dense part lives on the device and "
                        f"its tables in RAM (when --ram holds them) or on disk; `moe-offload inspect {path}` shows both")
    if not 0 <= hit_rate <= 1:
        raise UserError(f"--hit-rate must be between 0 and 1, got {hit_rate}")
    if bandwidth <= 0:
        raise UserError(f"--bandwidth must be positive, got {bandwidth}")
    check_plan_options(device, dtype, context)
    vram, ram = parse_bytes(vram, "--vram"), parse_bytes(ram, "--ram")
    cfg, ckpt, source, info = open_folder(path)
    if ckpt is not None:
        ckpt.close()  # headers were all the plan needed
    planning_only = device.startswith("cuda") and not torch.cuda.is_available()
    if planning_only and vram is None:
        raise UserError("planning for a GPU on a machine without one needs --vram (the GPU's budget)")
    dev = torch.device(device) if planning_only else resolve_device(device)
    dt = resolve_dtype(dtype, dev, cfg.torch_dtype)
    context = min(context, cfg.max_position_embeddings)
    # A converted folder's blobs are what they are; float experts are planned at the compute dtype.
    blob = expert_blob_bytes(cfg, source, info, dt)
    free = device_bytes_free(dev) if dev.type == "cuda" and not planning_only else None
    capability = device_capability(dev) if dev.type == "cuda" and not planning_only else None
    plan = plan_memory(cfg, dt.itemsize, str(dev), vram, ram, context, blob, free_device_bytes=free,
                       dense_format=dense_format(info), capability=capability,
                       quantized_experts=info is not None or getattr(cfg, "mxfp4", False),
                       # sparse experts stage their partial copies on the device (offload/store/partial.py)
                       staging_bytes=staging_nbytes(source.layout, dev.type == "cuda") if source is not None else 0)
    resident = plan.device_slots == plan.experts_total
    used = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + plan.staging_bytes + plan.expert_pool_bytes
    return {
        "device": str(dev), "dtype": str(dt).removeprefix("torch."), "context": context,
        "blob_bytes": plan.blob_bytes, "experts_total": plan.experts_total,
        "device_tier": {"budget": plan.vram_budget, "dense_bytes": plan.dense_bytes, "kv_bytes": plan.kv_bytes,
                        "workspace_bytes": plan.margin_bytes, "staging_bytes": plan.staging_bytes,
                        "expert_slots": plan.device_slots,
                        # the attention kernel the workspace was planned for (sm_80+ assumed without the GPU)
                        "workspace": plan.workspace.as_dict() | {"assumed_sm80": dev.type == "cuda" and capability is None},
                        "expert_pool_bytes": plan.expert_pool_bytes, "used_bytes": used,
                        "unused_bytes": plan.vram_budget - used},
        "host_tier": {"budget": plan.ram_budget, "expert_slots": plan.host_slots,
                      "bytes": plan.host_slots * plan.blob_bytes, "pinned": dev.type == "cuda"},
        "disk": {"experts_streamed": plan.experts_total - plan.host_slots,
                 "bytes": (plan.experts_total - plan.host_slots) * plan.blob_bytes},
        "all_experts_on_device": resident,
        # Every expert resident: after its first use nothing moves, whatever hit rate was asked for.
        "per_token": expected_traffic(plan, len(cfg.moe_layers), 1.0 if resident else hit_rate, bandwidth),
        "plan": plan.as_dict(),
    }
