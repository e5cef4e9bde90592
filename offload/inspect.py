"""What a model folder is: shape, parameter counts dense vs experts, bytes per expert, dense bytes on the GPU."""

from __future__ import annotations

import os

from .checkpoint import Checkpoint, expert_names
from .runtime import resolve_model_path


def describe(path: str | os.PathLike | None, dtype_bytes: int | None = None) -> dict:
    """A dict describing the checkpoint; byte figures use the checkpoint's dtype unless `dtype_bytes` is given."""
    ckpt = Checkpoint(resolve_model_path(path))
    ckpt.validate()
    cfg = ckpt.config
    expert_tensors = {n for i in range(cfg.num_hidden_layers) for e in range(cfg.num_local_experts) for n in expert_names(i, e)}
    expert_params = dense_params = 0
    for name, loc in ckpt.locations.items():
        count = 1
        for s in loc.shape:
            count *= s
        if name in expert_tensors:
            expert_params += count
        elif not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            dense_params += count
    file_dtype = ckpt.locations["model.embed_tokens.weight"].dtype
    width = dtype_bytes or file_dtype.itemsize
    n_experts = cfg.num_hidden_layers * cfg.num_local_experts
    return {
        "path": str(ckpt.path),
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
        "params_dense": dense_params,
        "params_experts": expert_params,
        "expert_fraction": round(expert_params / max(1, dense_params + expert_params), 4),
        "experts_total": n_experts,
        "bytes_per_expert": cfg.expert_params * width,
        "bytes_dense_gpu": dense_params * width,
        "bytes_all_experts": expert_params * width,
        "expert_uses_per_token": cfg.num_hidden_layers * cfg.num_experts_per_tok,
    }
