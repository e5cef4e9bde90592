"""The sparse feed-forward block: a router picks experts per token, an expert provider runs them, shared
experts (when a family has them) run densely beside them.

Experts do not live here: the block asks an `ExpertProvider` for the output of expert (layer, e) on the
tokens routed to it, so tiers, caches, prefetch and CPU fallback all live behind that one seam
(offload/store/) and the forward never mentions them.

Dimension legend: T tokens in this step, D hidden, E experts, k experts per token, F expert ffn.
"""

from __future__ import annotations

import itertools
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


class ExpertProvider(Protocol):
    """Whoever owns the experts. The MoE block calls `prepare` once per layer, then `run` per expert; a
    provider may also have `guess(layer, h)`, device tensors of expert ids it wants on the host for that
    `prepare` (router-ahead guesses), which the block brings over with its own routing and the step's token
    ids in one transfer."""

    def prepare(self, layer: int, h: torch.Tensor, experts: list[int], guesses: list[list[int]] | None = None,
                tokens: list[int] | None = None) -> None:
        """Layer `layer` is about to run `experts` (sorted) on router input h [T, D]; start what can start.
        `guesses`: `guess(layer, h)`'s tensors as lists, and `tokens` the T token ids, when the provider has
        `guess`."""

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert (layer, expert) applied to x [t, D] -> [t, D], in x's dtype and on x's device. A provider may
        also have `run_group(layer, experts, x)`: `run` of each of `experts` on one token's x [1, D]."""


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: w2(silu(w1 x) * w3 x). x [t, D]; w1 (gate), w3 (up) [F, D]; w2 (down) [D, F]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class SwiGLU:
    """A dense SwiGLU FFN on the device (a shared expert, or a dense MLP layer)."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor):
        self.w1, self.w2, self.w3 = w1, w2, w3

    def dense_tensors(self) -> list[torch.Tensor]:
        return [self.w1, self.w2, self.w3]

    def __call__(self, h: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return expert_ffn(h, self.w1, self.w2, self.w3)


class SoftmaxRouter:
    """Softmax over the E router logits (in float32), top-k, renormalized over the k when `renormalize`
    (Mixtral) or not (a softmax over every expert, k = E, as MoLE's router)."""

    def __init__(self, weight: torch.Tensor, k: int, renormalize: bool = True):
        self.weight, self.k, self.renormalize = weight, k, renormalize  # weight [E, D]

    def dense_tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, D] -> (weights [T, k] in h's dtype, expert ids [T, k])."""
        probs = F.softmax(F.linear(h, self.weight), dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, self.k, dim=-1)                         # [T, k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(h.dtype), ids

    def choose(self, h: torch.Tensor) -> torch.Tensor:
        """The expert ids [T, k] this router would pick for h [T, D] (softmax keeps the logits' order):
        what router-ahead prefetch guesses with a later layer's router."""
        return torch.topk(F.linear(h, self.weight), self.k, dim=-1).indices


def to_host(t: torch.Tensor) -> list[int]:
    """The MoE block's one device -> host transfer per layer. On a GPU it waits for the compute stream to
    produce `t` (and so, since compute waits on its slots' copies, for those copies too): a host sync, which
    is why everything the host needs to plan the layer travels in this one tensor."""
    return t.tolist()


class MoE:
    """Routed experts behind the provider, weighted by the router, plus an optional dense `shared` part.

    The experts read h, or `expert_input(token_ids)` [T, D] where a family feeds them something else
    (MoLE's experts read the token's normalized embedding)."""

    def __init__(self, layer: int, router: SoftmaxRouter, experts: ExpertProvider, shared: SwiGLU | None = None,
                 expert_input: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.layer, self.router, self.experts, self.shared = layer, router, experts, shared
        self.expert_input = expert_input
        self.last_routing: torch.Tensor | None = None  # [T, k] expert ids of the latest call, for stats/profiling

    def dense_tensors(self) -> list[torch.Tensor]:
        tensors = self.router.dense_tensors() + (self.shared.dense_tensors() if self.shared else [])
        return tensors + getattr(self.expert_input, "dense_tensors", lambda: [])()

    def __call__(self, h: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(h)  # [T, k]
        k = ids.shape[1]
        self.last_routing = ids
        x = h if self.expert_input is None else self.expert_input(token_ids)  # [T, D]
        # Group the tokens by expert, so each needed expert is fetched and run once for the whole step: the
        # positions of the flattened routing sorted by expert stay on the device; the sorted ids, and the
        # provider's router-ahead guesses, cross to the host together (no op here has a data-dependent
        # shape, which would sync on its own).
        flat = ids.flatten()                                          # [T*k]
        order = torch.argsort(flat, stable=True)                      # [T*k] positions grouped by expert
        guess = getattr(self.experts, "guess", None)
        ahead = guess(self.layer, h) if guess else []                 # [T, k'] per layer ahead, on the device
        tokens = [token_ids.flatten().to(flat.dtype)] if guess else []  # for the store's cache policy
        host = to_host(torch.cat([flat[order], *(g.flatten() for g in ahead), *tokens]))
        sorted_ids, rest = host[:flat.numel()], host[flat.numel():]
        guesses = []
        for g in ahead:
            guesses.append(rest[:g.numel()])
            rest = rest[g.numel():]
        used, counts = zip(*((e, len(list(run))) for e, run in itertools.groupby(sorted_ids)))
        used = list(used)
        if guess:
            self.experts.prepare(self.layer, h, used, guesses, rest)
        else:
            self.experts.prepare(self.layer, h, used)
        if h.shape[0] == 1:
            # One token (decode): every expert reads x itself (the provider may run them together), and the
            # token sums its k weighted outputs in one reduction. Per expert, the index_add_ below costs a
            # scatter of hundreds of microseconds on a CPU, where a token uses 8 of 128 small experts
            # (measured on the Qwen3-30B-A3B slice).
            group = getattr(self.experts, "run_group", None)  # a provider that runs several experts at once
            ys = group(self.layer, used, x) if group else [self.experts.run(self.layer, e, x) for e in used]
            out = (torch.cat(ys) * weights.flatten()[order, None]).sum(0, keepdim=True)     # [1, D]
        else:
            out = torch.zeros_like(h)
            start = 0
            for e, n in zip(used, counts):
                slots = order[start:start + n]          # positions in the flattened [T*k] routing
                start += n
                tokens = slots // k
                y = self.experts.run(self.layer, e, x[tokens])                # [n, D]
                out.index_add_(0, tokens, y * weights.flatten()[slots, None])
        if self.shared is not None:
            out = out + self.shared(h)
        return out


class GroupedRouter:
    """DeepSeek's routers, in float32. Scores: a softmax over the E logits ("softmax", DeepSeek-V2) or a sigmoid
    of each ("sigmoid", DeepSeek-V3, GLM-4.5). Choice: the top k of the scores plus `bias` (V3's
    e_score_correction_bias: it steers the choice, never the weights), among the experts of the `topk_group`
    best of `groups` equal groups, a group ranked by its best score ("max", V2's group_limited_greedy) or by
    the sum of its two best ("top2", V3). Weights: the chosen experts' scores, renormalized over the k when
    `renormalize`, times `scaling` (routed_scaling_factor)."""

    def __init__(self, weight: torch.Tensor, k: int, scoring: str, groups: int = 1, topk_group: int = 1,
                 group_score: str = "max", bias: torch.Tensor | None = None, renormalize: bool = False,
                 scaling: float = 1.0):
        self.weight, self.k, self.scoring, self.bias = weight, k, scoring, bias  # weight [E, D], bias [E]
        self.groups, self.topk_group, self.group_score = groups, topk_group, group_score
        self.renormalize, self.scaling = renormalize, scaling

    def dense_tensors(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """h [T, D] -> float32 scores [T, E]."""
        logits = F.linear(h.float(), self.weight.float())
        return logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, k] for float32 scores [T, E]."""
        choice = scores if self.bias is None else scores + self.bias.float()
        if self.topk_group < self.groups:
            T, E = choice.shape
            grouped = choice.view(T, self.groups, E // self.groups)                   # [T, G, E/G]
            if self.group_score == "max":
                rank = grouped.max(dim=-1).values
            else:
                rank = grouped.topk(2, dim=-1).values.sum(dim=-1)                      # [T, G]
            kept = torch.topk(rank, self.topk_group, dim=-1).indices                   # [T, topk_group]
            keep = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, kept, True)
            choice = choice.masked_fill(~keep.repeat_interleave(E // self.groups, dim=1), float("-inf"))
        return torch.topk(choice, self.k, dim=-1).indices

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, D] -> (weights [T, k] in h's dtype, expert ids [T, k])."""
        scores = self.scores(h)
        ids = self.pick(scores)
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scaling).to(h.dtype), ids

    def choose(self, h: torch.Tensor) -> torch.Tensor:
        """The expert ids [T, k] the forward would pick for h [T, D], bias and groups included: what
        router-ahead prefetch guesses with."""
        return self.pick(self.scores(h))
