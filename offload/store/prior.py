"""A routing prior: which experts each token, and the tokens that follow it, were routed to on calibration text.

The `context` cache policy (offload/store/cache.py) learns, as it decodes, which (layer, expert) the current
token and the next AHEAD-1 tokens use after each context of up to NGRAM tokens. A token it has not decoded yet
in this run tells it nothing, so early in a run, and for every new word, it falls back to the experts' use
rates. A prior fills that gap for the one-token contexts: for each token id of the calibration text, how often
it occurred (`n`) and, per (layer, expert, tokens ahead), how many of those occurrences used the expert at that
layer that many tokens later. The policy starts a token it meets for the first time in the run from these
counts, then goes on counting on top of them.

Built by `moe-offload prior` (offload/calibrate.py runs the model teacher-forced over the text and records the
routing) and stored as routing-prior.safetensors in the model folder, which `load` picks up:

    token    int32 [T]      the token ids seen, ascending
    n        int32 [T]      occurrences of each
    offsets  int64 [T + 1]  token i's cells are cells[offsets[i]:offsets[i + 1]]
    cells    int16/32 [C]   (layer * experts + expert) * ahead + tokens ahead
    counts   int16/32 [C]   occurrences of the token whose that many tokens later used that expert at that layer

with metadata naming the model's shape (layers, experts, vocabulary), `ahead`, and the calibration text.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from quant.errors import UserError
from quant.files import save_tensors

FILE = "routing-prior.safetensors"
FORMAT = "moe-offload routing prior 1"
TENSORS = ("token", "n", "offsets", "cells", "counts")


class RoutingPrior:
    """Per token id of the calibration text: its occurrences and the expert uses that followed it (module doc)."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]):
        self.meta = meta
        self.layers, self.experts, self.ahead = (int(meta[k]) for k in ("layers", "experts", "ahead"))
        self.vocab = int(meta["vocab"])
        self.tensors = tensors
        token = tensors["token"].tolist()
        self.index = {t: i for i, t in enumerate(token)}
        self.n = tensors["n"].tolist()
        self.offsets = tensors["offsets"].tolist()
        self.cells = tensors["cells"]
        self.counts = tensors["counts"]

    def __contains__(self, token: int) -> bool:
        return token in self.index

    def __len__(self) -> int:
        return len(self.index)

    def used(self, token: int) -> tuple[int, dict[int, dict[int, list[int]]]]:
        """`token`'s occurrences and, per layer per expert, its uses 0 .. ahead-1 tokens later ((0, {}) for a
        token the calibration text never had)."""
        i = self.index.get(token)
        if i is None:
            return 0, {}
        a, b = self.offsets[i], self.offsets[i + 1]
        out: dict[int, dict[int, list[int]]] = {}
        for cell, count in zip(self.cells[a:b].tolist(), self.counts[a:b].tolist()):
            rest, ahead = divmod(cell, self.ahead)
            layer, expert = divmod(rest, self.experts)
            out.setdefault(layer, {}).setdefault(expert, [0] * self.ahead)[ahead] = count
        return self.n[i], out

    @classmethod
    def build(cls, ids: torch.Tensor, routing: dict[int, torch.Tensor], *, layers: int, experts: int, vocab: int,
              ahead: int, source: str = "") -> RoutingPrior:
        """From the token ids of a text [N] and each MoE layer's routing of them [N, k] (layer -> expert ids)."""
        ids = ids.long()
        N = ids.numel()
        span = layers * experts * ahead
        found, tallies = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
        for layer, chosen in routing.items():  # counted a layer at a time: N x k x ahead keys at once, not x layers
            if chosen.shape[0] != N:
                raise ValueError(f"layer {layer}: routing of {chosen.shape[0]} tokens, {N} token ids")
            keys = []
            for a in range(min(ahead, N)):
                # token at i, the experts its layer used for the token at i + a
                token = ids[:N - a].unsqueeze(1).expand(-1, chosen.shape[1])
                cell = (layer * experts + chosen[a:].long()) * ahead + a
                keys.append((token * span + cell).flatten())
            uniq, counts = torch.unique(torch.cat(keys), return_counts=True)
            found.append(uniq)
            tallies.append(counts)
        uniq, order = torch.sort(torch.cat(found))  # keys of different layers differ: a sort merges them
        counts = torch.cat(tallies)[order]
        owner, cells = uniq // span, uniq % span
        token, n = torch.unique(ids, return_counts=True)
        per_token = torch.zeros(token.numel(), dtype=torch.long)
        where = torch.searchsorted(token, owner)
        per_token.index_add_(0, where, torch.ones_like(where))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), per_token.cumsum(0)])
        tensors = {"token": token.int(), "n": n.int(), "offsets": offsets, "cells": _narrow(cells),
                   "counts": _narrow(counts)}
        meta = {"format": FORMAT, "layers": str(layers), "experts": str(experts), "vocab": str(vocab),
                "ahead": str(ahead), "tokens": str(N), "source": source}
        return cls(tensors, meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write to `path` whole or not at all (a temporary file of its own beside it, renamed over it)."""
        path = Path(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            save_tensors(self.tensors, tmp, metadata=self.meta)  # its "format" is ours
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingPrior:
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise UserError(f"routing prior {path}: cannot read it ({exc}); make it again with "
                            f"`moe-offload prior`") from None
        if meta.get("format") != FORMAT or set(tensors) != set(TENSORS):
            raise UserError(f"routing prior {path}: not a routing prior written by `moe-offload prior`")
        problem = _damage(tensors, meta)
        if problem:
            raise UserError(f"routing prior {path}: damaged ({problem}); make it again with `moe-offload prior`")
        return cls(tensors, meta)

    def check(self, cfg, path: str | os.PathLike) -> None:
        """Refuse a prior made for a model of another shape, or counted over another span of tokens ahead
        than the context policy's."""
        from .cache import Context

        if self.ahead != Context.AHEAD:
            raise UserError(f"routing prior {path} counts {self.ahead} tokens ahead, the context policy "
                            f"{Context.AHEAD}: make it again with `moe-offload prior`")
        model = (cfg.num_hidden_layers, cfg.num_local_experts, cfg.vocab_size)
        mine = (self.layers, self.experts, self.vocab)
        if model != mine:
            raise UserError(f"routing prior {path} was made for a model with {mine[0]} layers, {mine[1]} experts "
                            f"and {mine[2]} tokens; this one has {model[0]}, {model[1]} and {model[2]}: make it "
                            f"again with `moe-offload prior`, or pass --routing-prior none")


def _damage(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str | None:
    """What is wrong with a routing prior file's contents, or None: every field `used` reads is checked here,
    so a damaged file is refused at load, not midway through a run."""
    for key in ("layers", "experts", "vocab", "ahead", "tokens"):
        if not meta.get(key, "").isdigit() or (key != "tokens" and int(meta[key]) == 0):
            return f"metadata {key!r} is {meta.get(key)!r}, not a positive whole number"
    for name, t in tensors.items():
        if t.dtype not in (torch.int16, torch.int32, torch.int64) or t.dim() != 1:
            return f"{name} is {t.dtype} of shape {list(t.shape)}, not a vector of whole numbers"
    T, C = tensors["token"].numel(), tensors["cells"].numel()
    offsets = tensors["offsets"]
    if tensors["n"].numel() != T or offsets.numel() != T + 1 or tensors["counts"].numel() != C:
        return "the tensors' lengths do not agree"
    if int(offsets[0]) != 0 or int(offsets[-1]) != C or bool((offsets[1:] < offsets[:-1]).any()):
        return "offsets do not run from 0 to the cell count"
    span = int(meta["layers"]) * int(meta["experts"]) * int(meta["ahead"])
    cells, token = tensors["cells"], tensors["token"]
    if C and (int(cells.min()) < 0 or int(cells.max()) >= span):
        return f"a cell is outside 0 .. {span - 1}"
    if T and (int(token.min()) < 0 or int(token.max()) >= int(meta["vocab"])):
        return "a token id is outside the vocabulary"
    return None


def describe(prior: RoutingPrior | None) -> str:
    """A run's routing prior in stats and profiles: its calibration text and tokens, or 'none'."""
    return "none" if prior is None else f"{prior.meta.get('source') or 'unnamed text'} ({prior.meta['tokens']} tokens)"


def _narrow(t: torch.Tensor) -> torch.Tensor:
    """int16 when every value fits (half the file), else int32."""
    fits = t.numel() == 0 or int(t.max()) < 1 << 15
    return t.to(torch.int16 if fits else torch.int32)


def find(folder: str | os.PathLike, choice, cfg) -> RoutingPrior | None:
    """The prior a run uses: `choice` 'auto' (the folder's FILE when there is one), 'none', a path, or a
    RoutingPrior."""
    if isinstance(choice, RoutingPrior):
        choice.check(cfg, choice.meta.get("source") or "given")
        return choice
    if choice is None or str(choice) == "none":
        return None
    if str(choice) == "auto":
        path = Path(folder) / FILE
        if not path.is_file():
            return None
    else:
        path = Path(choice)
        if not path.is_file():
            raise UserError(f"--routing-prior {choice}: no such file (make one with `moe-offload prior MODEL`)")
    prior = RoutingPrior.load(path)
    prior.check(cfg, path)
    return prior
