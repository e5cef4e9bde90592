"""The ruler for the device cache: a routing trace replayed through a policy, and Belady's offline optimum.

A routing trace is what the forward asked the store for, layer step by layer step, in order:
`[(decode, layer, experts, tokens), ...]` (decode: a one-token step; prefill steps are kept, since they change
what the cache holds; tokens: the step's last token ids, as many as the context policy reads, or None where
not known; `step` writes one). Both functions below apply the store's own rule: on a miss the expert takes a slot
(evicting when full), and the experts of the step being run never evict each other. Hit rates count demand
hits of decode steps only (prefetch off): a prefill asks for nearly every expert once.

`optimum` is Belady's MIN under that rule: on a miss with no free slot, evict the resident expert (not
needed by this step) whose next use is farthest away, or never. It minimises misses over the whole trace,
which no online policy can beat (tests/test_optimum.py checks it against an exhaustive search).
Pure Python, no tensors: `moe-offload profile` and bench/bench_cache.py use it on recorded traces.
"""

from __future__ import annotations

from collections.abc import Iterable

from .cache import LRU, Context, SlotTable, make_policy

Step = tuple  # (decode step?, layer, expert ids it ran[, its last token ids or None])


def step(decode: bool, layer: int, experts: list[int], tokens: list[int] | None) -> list:
    """One layer step of a trace (JSON-ready): the tokens cut to what the context policy reads."""
    return [int(decode), layer, list(experts), None if tokens is None else list(tokens[-Context.NGRAM:])]


def _uses(trace: Iterable[Step]) -> list[tuple[bool, list[tuple[int, int]], list[int], list[int] | None]]:
    """Each step: decode?, its keys in the order the store meets them (distinct, as the MoE block groups
    tokens), its experts and its tokens (None in a trace without them)."""
    return [(bool(s[0]), [(s[1], e) for e in dict.fromkeys(s[2])], s[2], s[3] if len(s) > 3 else None)
            for s in trace]


def replay(trace: Iterable[Step], slots: int, policy: str | LRU, prior=None) -> dict:
    """`policy` (a name of POLICIES, started from the routing `prior` if it takes one, or a policy object)'s
    hits on the trace through the store's SlotTable: {"hits", "uses"} of the decode steps."""
    table = SlotTable(slots, make_policy(policy, prior) if isinstance(policy, str) else policy)
    hits = uses = 0
    for decode, needed, experts, tokens in _uses(trace):
        if needed:
            hit = table.demand_step(needed[0][0], experts, tokens)
            hits += hit if decode else 0
            uses += len(needed) if decode else 0
    return {"hits": hits, "uses": uses}


def optimum(trace: Iterable[Step], slots: int) -> dict:
    """Belady's MIN on the trace: {"hits", "uses"} of the decode steps, and "misses_all" over every step
    (the quantity MIN minimises)."""
    steps = _uses(trace)
    flat = [key for _, needed, _, _ in steps for key in needed]
    never = len(flat)
    next_use = [never] * len(flat)
    seen: dict = {}
    for i in range(len(flat) - 1, -1, -1):
        next_use[i] = seen.get(flat[i], never)
        seen[flat[i]] = i
    resident: dict = {}  # key -> position of its next use
    hits = uses = misses = i = 0
    for decode, needed, _, _ in steps:
        protected = set(needed)
        for key in needed:
            hit = key in resident
            if not hit and len(resident) >= slots:
                candidates = [k for k in resident if k not in protected]
                if candidates:
                    del resident[max(candidates, key=resident.__getitem__)]
            if hit or len(resident) < slots:
                resident[key] = next_use[i]
            hits += hit and decode
            uses += decode
            misses += not hit
            i += 1
    return {"hits": hits, "uses": uses, "misses_all": misses}


def rate(counts: dict) -> float | None:
    """hits / uses, or None for a trace without decode steps."""
    return counts["hits"] / counts["uses"] if counts["uses"] else None
