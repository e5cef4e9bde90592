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
    ids: torch.Tensor | None = None   # the token ids [N]

    def tokens_of(self, layer: int, e: int) -> tuple[torch.Tensor, bool]:
        """Which calibration tokens expert (layer, e) calibrates on (a mask [N]): those routed to it, or every
        token of the layer when fewer than MIN_ROUTED are; and whether it is that layer-wide fallback."""
        routed = (self.routed[layer] == e).any(1)
        if int(routed.sum()) < MIN_ROUTED:
            return torch.ones_like(routed), True
        return routed, False

    def inputs(self, layer: int, e: int) -> tuple[torch.Tensor, bool]:
        """The calibration inputs of expert (layer, e) [n, D], and whether they are the layer-wide fallback."""
        tokens, wide = self.tokens_of(layer, e)
        return (self.hidden[layer] if wide else self.hidden[layer][tokens]), wide


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

    def __init__(self, store, sink: dict[int, list[torch.Tensor]] | None):
        self.store, self.sink = store, sink

    def prepare(self, layer: int, h: torch.Tensor, experts: list[int], guesses=None, tokens=None) -> None:
        if self.sink is not None:
            self.sink.setdefault(layer, []).append(h.detach().float().cpu())
        self.store.prepare(layer, h, experts)

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.store.run(layer, expert, x)


def record(src: Path, text: str, name: str, max_tokens: int = MAX_TOKENS, progress=None,
           hidden: bool = True, device: str = "cpu", dtype: str = "float32") -> Calibration:
    """Run the model in `src` over `text` (at most `max_tokens` tokens; float32 on the CPU unless told) and
    record every MoE layer's routing and, with `hidden`, its expert inputs. `progress(done, total)` counts
    windows."""
    from .models.moe import MoE
    from .runtime import load

    rt = load(src, device=device, dtype=dtype, context=WINDOW + 1,  # capped at the model's positions
              routing_prior="none")
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
                b.experts = _Recorder(b.experts, sink if hidden else None)
            for done, i in enumerate(windows, 1):
                chunk = ids[i:i + window]
                with torch.no_grad():
                    rt.model.forward(torch.tensor([bos] + chunk), 0)
                for b in blocks:  # drop bos: its input is the same in every window
                    routed.setdefault(b.layer, []).append(b.last_routing[1:].cpu())
                    if hidden:
                        sink[b.layer][-1] = sink[b.layer][-1][1:]
                if progress:
                    progress(done, len(windows))
        finally:
            for b, store in zip(blocks, stores):
                b.experts = store
    finally:
        rt.close()
    return Calibration({layer: torch.cat(hs) for layer, hs in sink.items()},
                       {layer: torch.cat(r) for layer, r in routed.items()}, len(ids), len(windows), name,
                       torch.tensor(ids))


PRIOR_TOKENS = 1 << 17  # calibration tokens a routing prior is counted on at most (the demo's corpus: ~104k)


def routing_prior(src: Path, text: str, name: str, max_tokens: int = PRIOR_TOKENS, progress=None,
                  device: str = "cpu"):
    """The routing prior (offload/store/prior.py) of the model in `src` on `text`: its routing of each token,
    teacher-forced, counted per token id and tokens ahead. On a GPU (`device`) the model runs in its half
    precision, streaming its experts like a run."""
    from .models import EXPERT_MODEL_TYPES, open_checkpoint
    from .store.cache import Context
    from .store.prior import RoutingPrior

    # A folder that is not a model with routed experts (a table folder) is refused here, before the text runs.
    ckpt = open_checkpoint(src, EXPERT_MODEL_TYPES)
    cfg = ckpt.config
    ckpt.close()
    calib = record(src, text, name, max_tokens, progress, hidden=False, device=device,
                   dtype="float32" if device == "cpu" else "auto")
    return RoutingPrior.build(calib.ids, calib.routed, layers=cfg.num_hidden_layers, experts=cfg.num_local_experts,
                              vocab=cfg.vocab_size, ahead=Context.AHEAD, source=name)


def threshold(x: torch.Tensor, up: quant.QuantizedTensor, target: float) -> float:
    """The |v| below which a fraction `target` of the (token, neuron) pairs of v = up(x) falls, for x [n, D]
    and the quantized up projection the sparse blob stores (0.0 for target 0: every nonzero neuron kept)."""
    if target == 0:
        return 0.0
    v = F.linear(x, quant.dequantize(up)).abs().flatten()  # [n * F]
    k = max(1, min(v.numel(), round(target * v.numel())))
    return float(torch.kthvalue(v, k).values)


HOLDOUT = 8  # the predictors are fit on the first 7/8 of the calibration tokens and scored on the last 1/8
# A predictor guesses this share of as many (token, neuron) pairs as are active, its surest: a guessed chunk that
# no use needs is bytes moved for nothing, one it misses is only copied later. On the demo (target 0.5, held-out
# text) guessing as many as are active is right 72% of the time and finds 72% of them; half as many, 86% and 43%.
GUESS_SHARE = 0.5


def fit_predictor(calib: Calibration, key: tuple[int, int], source: int, up: quant.QuantizedTensor, thr: float,
                  rank: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Expert `key`'s neuron predictor (offload/store/predictor.py) from the input of MoE layer `source`, and its
    score on the held-out calibration tokens (counts: guessed, active, both).

    Ridge regression of v = up(x) [n, F] on [h_source, 1] [n, D + 1] over the tokens routed to the expert
    (the layer's tokens when fewer than MIN_ROUTED: `tokens_of`), reduced to rank r along the fit's top
    singular directions; its threshold guesses GUESS_SHARE as many (token, neuron) pairs as are active in the fit."""
    layer, e = key
    routed, _ = calib.tokens_of(layer, e)
    n = calib.hidden[layer].shape[0]
    fit = routed & (torch.arange(n) < n - n // HOLDOUT)
    w3 = quant.dequantize(up)                                                           # [F, D]
    h = calib.hidden[source][fit]
    X = torch.cat([h, torch.ones(h.shape[0], 1)], dim=1)                                # [n, D + 1]
    v = F.linear(calib.hidden[layer][fit], w3)                                          # [n, F]
    gram = (X.T @ X).double()
    gram += (1e-3 * gram.diagonal().mean() + 1e-6) * torch.eye(gram.shape[0], dtype=gram.dtype)
    B = torch.linalg.solve(gram, (X.T @ v).double())                                    # [D + 1, F]
    # The fit's top right singular vectors: those of M = L^T B (L L^T = gram), from the small [D+1, D+1]
    # eigenproblem of M M^T (deterministic, and no SVD of an [n, F] or [D+1, F] matrix).
    M = torch.linalg.cholesky(gram).T @ B                                               # [D + 1, F]
    evals, U = torch.linalg.eigh(M @ M.T)                                               # ascending
    top = evals.flip(0)[:rank].clamp_min(1e-30).sqrt()
    Q = (M.T @ U.flip(1)[:, :rank]) / top                                               # [F, r'], r' <= r
    Q = torch.cat([Q, Q.new_zeros(Q.shape[0], rank - Q.shape[1])], 1)                   # [F, r]
    A = B @ Q                                                                           # [D + 1, r]
    tensors = {"proj": A[:-1].T.half(), "bias": A[-1].half(), "out": Q.half()}

    def estimate(h):  # |v_hat| [n, F] as the runtime computes it: float16 weights, float32 arithmetic
        return ((h @ tensors["proj"].float().T + tensors["bias"].float()) @ tensors["out"].float().T).abs()

    est = estimate(h)
    guessed = round(GUESS_SHARE * int((v.abs() > thr).sum()))
    k = est.numel() - guessed  # guess the `guessed` largest |v_hat|
    thr_hat = float(est.max()) if guessed == 0 else float(torch.kthvalue(est.flatten(), k).values) if k else 0.0
    tensors["thr"] = torch.tensor(thr_hat)
    held = routed & ~fit
    score = {"guessed": 0, "active": 0, "both": 0}
    if held.any():
        guess = estimate(calib.hidden[source][held]) > thr_hat
        truth = F.linear(calib.hidden[layer][held], w3).abs() > thr
        score = {"guessed": int(guess.sum()), "active": int(truth.sum()), "both": int((guess & truth).sum())}
    return tensors, score


def score_predictor(folder: Path, text: str, name: str, max_tokens: int = MAX_TOKENS) -> dict:
    """How well the neuron predictors of the sparse folder `folder` guess on `text` (teacher-forced through the
    sparse model itself): over every (token, routed expert) pair of each predicted layer, the share of guessed
    neurons that are active (precision) and of active neurons that were guessed (recall)."""
    from quant import sparse

    from .runtime import open_checked

    calib = record(folder, text, name, max_tokens)
    ckpt, source, _ = open_checked(folder)
    counts = {"guessed": 0, "active": 0, "both": 0, "pairs": 0}
    try:
        pred = source.predictor
        if pred is None:
            raise UserError(f"{folder}: has no neuron predictors (convert with --predictor-rank > 0)")
        blob = torch.empty(source.layout.nbytes, dtype=torch.uint8)
        for layer, src in pred.source.items():
            for e in range(ckpt.config.num_local_experts):
                routed = (calib.routed[layer] == e).any(1)
                if not routed.any():
                    continue
                source.read_into((layer, e), blob)
                views = source.layout.views(blob)
                _, truth, _ = sparse.active_neurons(source.layout, views, calib.hidden[layer][routed])
                guess = torch.zeros_like(truth)
                for row, h in enumerate(calib.hidden[src][routed]):
                    guess[row, pred.predict(layer, e, h[None])] = True
                counts["guessed"] += int(guess.sum())
                counts["active"] += int(truth.sum())
                counts["both"] += int((guess & truth).sum())
                counts["pairs"] += int(routed.sum())
    finally:
        ckpt.close()
    return {"precision": counts["both"] / max(1, counts["guessed"]),
            "recall": counts["both"] / max(1, counts["active"]),
            "guessed_share": counts["guessed"] / max(1, counts["pairs"] * source.layout.extra["ffn"]),
            "active_share": counts["active"] / max(1, counts["pairs"] * source.layout.extra["ffn"]),
            "tokens": calib.tokens, **counts}
