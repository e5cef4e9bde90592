"""Neuron predictors for sparse experts (FloE's second half): from the input of one MoE layer, guess which
neurons of the next MoE layer's experts will be active, so that a router-ahead guess copy brings their chunks
with the expert's base (offload/store/store.py `_prefetch`).

# D hidden, F ffn (neurons), E experts per layer, r predictor rank
For each expert e of MoE layer L (every MoE layer but the first), reading the input h [D] of the MoE layer
before it (`source` of L):

    v_hat = out[e] (proj[e] h + bias[e])          # [F], a rank-r linear estimate of v = w3 x at layer L
    guessed neurons = { i : |v_hat[i]| > thr[e] }

trained by `convert --sparse` on the calibration text (offload/calibrate.py `train_predictor`: ridge regression
of v on h, reduced to rank r; thr[e] guesses the surest half as many (token, neuron) pairs as are active there). The
guesses only choose which chunks move early: what an expert computes depends on its own up projection and
threshold alone (quant/sparse.py), so a wrong guess costs bytes, never a different result.

File `predictor.safetensors` in the converted folder (safetensors; its metadata describes it and is checked
on load, like the blobs' headers):

    metadata   format "moe-offload-neuron-predictor", version "1", hidden, ffn, rank, experts,
               layers: JSON {"L": source layer, ...}
    layers.L.proj  float16 [E, r, D]    layers.L.bias  float16 [E, r]
    layers.L.out   float16 [E, F, r]    layers.L.thr   float32 [E]

Predictions run on the CPU from the host copy of h (one [1, D] transfer per decode layer that prefetches):
a rank-r estimate reads (D + F) r values per guessed expert, far less than the up projection itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quant.errors import UserError
from quant.files import save_tensors

FILE = "predictor.safetensors"
FORMAT = "moe-offload-neuron-predictor"
VERSION = "1"
DEFAULT_RANK = 32


def tensor_shapes(E: int, D: int, Fn: int, r: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors of one layer's predictors, by suffix: shape and dtype."""
    return {"proj": ((E, r, D), torch.float16), "bias": ((E, r), torch.float16),
            "out": ((E, Fn, r), torch.float16), "thr": ((E,), torch.float32)}


def save(path: Path, layers: dict[int, dict[str, torch.Tensor]], sources: dict[int, int], hidden: int, ffn: int,
         rank: int, experts: int) -> None:
    """Write the predictors of `layers` (layer -> its tensors by suffix) reading the inputs of `sources`."""
    tensors = {f"layers.{layer}.{name}": t.contiguous() for layer, ts in layers.items() for name, t in ts.items()}
    meta = {"moe_offload": FORMAT, "version": VERSION, "hidden": str(hidden), "ffn": str(ffn), "rank": str(rank),
            "experts": str(experts), "layers": json.dumps({str(k): v for k, v in sources.items()})}
    save_tensors(tensors, path, metadata=meta)


class NeuronPredictor:
    """The predictors of a converted folder, in host memory: `predict(layer, e, h)` guesses expert (layer, e)'s
    active neurons from the hidden state of layer `source[layer]`."""

    def __init__(self, source: dict[int, int], tensors: dict[int, dict[str, torch.Tensor]], rank: int):
        self.source, self.tensors, self.rank = source, tensors, rank

    @classmethod
    def load(cls, folder: Path, cfg) -> NeuronPredictor:
        """Read and check `folder`/predictor.safetensors against config.json; a UserError naming the file and what
        is wrong otherwise (convert again to rebuild it)."""
        from safetensors import SafetensorError, safe_open

        path = Path(folder) / FILE
        fix = "convert the folder again"
        if not path.is_file():
            raise UserError(f"{path}: missing (moe_offload.json says the sparse experts have neuron predictors); {fix}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("moe_offload") != FORMAT or meta.get("version") != VERSION:
                    said = json.dumps({k: meta.get(k) for k in ("moe_offload", "version")})
                    raise UserError(f"{path}: not a moe-offload neuron predictor file of version {VERSION} "
                                    f"(metadata {said}); {fix}")
                try:
                    D, Fn, r, E = (int(meta[k]) for k in ("hidden", "ffn", "rank", "experts"))
                    source = {int(k): int(v) for k, v in json.loads(meta["layers"]).items()}
                except (KeyError, ValueError, TypeError, AttributeError):
                    raise UserError(f"{path}: its metadata does not say hidden, ffn, rank, experts and layers; "
                                    f"{fix}") from None
                if (D, Fn, E) != (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts):
                    raise UserError(f"{path}: made for hidden {D}, ffn {Fn}, {E} experts; config.json says "
                                    f"{cfg.hidden_size}, {cfg.intermediate_size}, {cfg.num_local_experts}; {fix}")
                moe = set(cfg.moe_layers)
                if any(layer not in moe or src not in moe or src >= layer for layer, src in source.items()):
                    raise UserError(f"{path}: its layers {meta['layers']} are not pairs of MoE layers "
                                    f"(layer: an earlier one); {fix}")
                tensors = {}
                for layer in source:
                    tensors[layer] = {}
                    for name, (shape, dtype) in tensor_shapes(E, D, Fn, r).items():
                        key = f"layers.{layer}.{name}"
                        if key not in f.keys():
                            raise UserError(f"{path}: tensor {key} is missing; {fix}")
                        t = f.get_tensor(key)
                        if tuple(t.shape) != shape or t.dtype != dtype:
                            raise UserError(f"{path}: tensor {key} is {t.dtype} {list(t.shape)}, expected {dtype} "
                                            f"{list(shape)}; {fix}")
                        tensors[layer][name] = t
        except SafetensorError as exc:
            raise UserError(f"{path}: unreadable as safetensors ({exc}); {fix}") from None
        return cls(source, tensors, r)

    def predicts(self, layer: int, source: int) -> bool:
        """Whether layer `layer`'s experts have predictors reading layer `source`'s input."""
        return self.source.get(layer) == source

    def predict(self, layer: int, e: int, h: torch.Tensor) -> torch.Tensor:
        """The neurons [n] (int64, ascending) of expert (layer, e) guessed active for h [1, D] (float32, CPU),
        the input of layer `source[layer]`."""
        t = self.tensors[layer]
        z = torch.addmv(t["bias"][e].float(), t["proj"][e].float(), h[0])    # [r]
        v = torch.mv(t["out"][e].float(), z)                                 # [F]
        return (v.abs() > t["thr"][e]).nonzero().flatten()
