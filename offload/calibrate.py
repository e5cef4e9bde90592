"""Calibration for sparse experts (`convert --sparse`): what the routed experts see on real text.

# N calibration tokens, D hidden, F ffn, k experts per token, L layers with experts
The source model runs on the calibration text (windows of WINDOW tokens, teacher-forced) with a recorder in
front of its expert store: for each MoE layer it keeps the experts' input h [N, D] of every token and the
router's choice [N, k]. From these, `threshold` calibrates one expert: the quantile TARGET of |v| = |w3 x|
over the tokens routed to it, so on the calibration text that fraction of its (token, neuron) pairs is
dropped. An expert that fewer than MIN_ROUTED tokens reach is calibrated on every calibration token of its
layer instead, as if they were all routed to it (its |v| scale is then measured on this layer's inputs
rather than guessed); `convert` lists such experts in its record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import quant
from quant.errors import UserError

WINDOW = 256          # tokens per calibration forward (bos prepended)
MAX_TOKENS = 4096     # calibration tokens used at most: bounds the recorded inputs (N x L x D float32)
MIN_ROUTED = 8        # fewer routed tokens than this: calibrate on the whole layer's tokens
DEFAULT_CORPUS = "pydoc_data.topics"  # the demo model's training text (offload/demo.py, split "train")


@dataclass
class Calibration:
    """The experts' inputs on the calibration text, by layer."""

    hidden: dict[int, torch.Tensor]   # layer -> h [N, D] float32, the MoE block's expert input per token
    routed: dict[int, torch.Tensor]   # layer -> expert ids [N, k]
    tokens: int
    windows: int                      # forwards the text took (`progress` counts them)
    source: str                       # the file, or DEFAULT_CORPUS

    def inputs(self, layer: int, e: int) -> tuple[torch.Tensor, bool]:
        """The calibration inputs of expert (layer, e) [n, D], and whether they are the layer-wide fallback."""
        routed = (self.routed[layer] == e).any(1)
        if int(routed.sum()) < MIN_ROUTED:
            return self.hidden[layer], True
        return self.hidden[layer][routed], False


def calibration_text(path: str | None) -> tuple[str, str]:
    """(text, name): the file's UTF-8 text, or the demo model's training corpus when `path` is None."""
    if path is None:
        from .demo import corpus

        return corpus("train"), DEFAULT_CORPUS
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--calibration {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--calibration {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"--calibration {path}: cannot read ({exc.strerror})") from None
    if not text.strip():
        raise UserError(f"--calibration {path}: the file is empty; give a text file to calibrate the thresholds on")
    return text, str(p)


class _Recorder:
    """Stands in front of the expert store in each MoE block while the calibration text runs: keeps the
    block's expert input, then lets the store do its work."""

    def __init__(self, store, sink: dict[int, list[torch.Tensor]]):
        self.store, self.sink = store, sink

    def prepare(self, layer: int, h: torch.Tensor, experts: list[int], guesses=None) -> None:
        self.sink.setdefault(layer, []).append(h.detach().float().cpu())
        self.store.prepare(layer, h, experts)

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.store.run(layer, expert, x)


def record(src: Path, text: str, name: str, max_tokens: int = MAX_TOKENS, progress=None) -> Calibration:
    """Run the float model in `src` over `text` (at most `max_tokens` tokens) and record every MoE layer's
    expert inputs and routing. `progress(done, total)` counts windows."""
    from .models.moe import MoE
    from .runtime import load

    rt = load(src, device="cpu", dtype="float32", context=WINDOW + 1)  # capped at the model's positions
    try:
        ids = rt.tokenizer.encode(text)
        bos = rt.tokenizer.bos_id
        ids = [t for t in ids if t != bos][:max_tokens]
        if len(ids) < 2:
            raise UserError(f"--calibration {name}: the text is {len(ids)} token(s) long; give more text")
        blocks = [b.ffn for b in rt.model.blocks if isinstance(b.ffn, MoE)]
        sink: dict[int, list[torch.Tensor]] = {}
        routed: dict[int, list[torch.Tensor]] = {}
        stores = [b.experts for b in blocks]
        window = min(WINDOW, rt.model.max_seq - 1)  # a model with fewer positions: shorter windows
        windows = list(range(0, len(ids), window))
        try:
            for b in blocks:
                b.experts = _Recorder(b.experts, sink)
            for done, i in enumerate(windows, 1):
                chunk = ids[i:i + window]
                with torch.no_grad():
                    rt.model.forward(torch.tensor([bos] + chunk), 0)
                for b in blocks:  # drop bos: its input is the same in every window
                    routed.setdefault(b.layer, []).append(b.last_routing[1:].cpu())
                    sink[b.layer][-1] = sink[b.layer][-1][1:]
                if progress:
                    progress(done, len(windows))
        finally:
            for b, store in zip(blocks, stores):
                b.experts = store
    finally:
        rt.close()
    return Calibration({layer: torch.cat(hs) for layer, hs in sink.items()},
                       {layer: torch.cat(r) for layer, r in routed.items()}, len(ids), len(windows), name)


def threshold(x: torch.Tensor, up: quant.QuantizedTensor, target: float) -> float:
    """The |v| below which a fraction `target` of the (token, neuron) pairs of v = up(x) falls, for x [n, D]
    and the quantized up projection the sparse blob stores (0.0 for target 0: every nonzero neuron kept)."""
    if target == 0:
        return 0.0
    v = F.linear(x, quant.dequantize(up)).abs().flatten()  # [n * F]
    k = max(1, min(v.numel(), round(target * v.numel())))
    return float(torch.kthvalue(v, k).values)
