"""HQQ (half-quadratic quantization, the `hqq` package) as a reference for quant.quantize: test-only.

What is called, with hqq 0.2.8 on the CPU:
    hqq.core.quantize.Quantizer.quantize(W, nbits=B, group_size=G, optimize=True, round_zero=False,
                                         axis=1, bitpack=False, device="cpu")
That is HQQ's own quantizer with its optimizer on (the default `optimize_weights_proximal`: proximal
l_0.7 updates of the zero point, scale from min/max), grouped along rows (axis=1: G consecutive input
columns, the same groups as ours). Its scale and zero are rounded to float16, as HQQLinear stores them,
and the weight is rebuilt as (W_q - zero) * scale in float32, so the only loss counted is HQQ's own.
round_zero=False is the stronger setting: HQQLinear's BaseQuantizeConfig rounds the zero at 4 bits,
which `hqq_linear_dequantize` reproduces for comparison.

Storage: B bits per code plus an fp16 scale and an fp16 zero per group = B + 32 / G bits per weight
(counted that way, though hqq's own 3-bit packing spends 32 bits on 10 codes, 3.2 bits per code).

Importable from benchmarks too (`sys.path` gets tests/ or `from tests.hqq_ref import ...`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def hqq_dequantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """HQQ's reconstruction of weight [out, in] (float32), with fp16 scale and zero per group."""
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(weight.float(), nbits=bits, group_size=group_size, optimize=True,
                                   round_zero=False, axis=1, bitpack=False, device="cpu")
    scale = meta["scale"].to(torch.float16).float()   # [out * in / G, 1]
    zero = meta["zero"].to(torch.float16).float()
    return ((w_q.float().reshape(-1, group_size) - zero) * scale).reshape(weight.shape)


def hqq_linear_dequantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The same through HQQLinear with BaseQuantizeConfig (hqq's layer path, fp16 compute), as a cross-check."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.float().clone()
    hqq_layer = HQQLinear(layer, BaseQuantizeConfig(nbits=bits, group_size=group_size),
                          compute_dtype=torch.float16, device="cpu")
    return hqq_layer.dequantize().float().reshape(weight.shape)


def hqq_bits_per_param(bits: int, group_size: int) -> float:
    """HQQ's storage per weight counted as codes plus fp16 scale and fp16 zero per group."""
    return bits + 32 / group_size


def hqq_folder(src: Path, dst: Path, bits: int, group_size: int, errors: list | None = None) -> Path:
    """A model folder like src (a Mixtral checkpoint) with every expert weight replaced by HQQ's reconstruction,
    all weights float32; each expert matrix's relative error is appended to `errors` when given."""
    from safetensors.torch import save_file

    from offload.formats.converted import COPIED
    from offload.models import open_checkpoint
    from offload.models.mixtral import expert_names

    ckpt = open_checkpoint(src)
    dst.mkdir(parents=True)
    for name in COPIED:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    tensors = {name: ckpt.read(name, dtype=torch.float32) for name in ckpt.locations}
    cfg = ckpt.config
    for layer in range(cfg.num_hidden_layers):
        for e in range(cfg.num_local_experts):
            for name in expert_names(layer, e):
                w = tensors[name]
                tensors[name] = hqq_dequantize(w, bits, group_size).contiguous()
                if errors is not None:
                    errors.append(relative_error(w, tensors[name]))
    ckpt.close()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - approx||_F / ||W||_F."""
    weight = weight.float()
    return float((weight - approx.float()).norm() / weight.norm())
