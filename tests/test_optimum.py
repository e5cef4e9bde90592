"""The cache's ruler: Belady's MIN is the optimum (checked by exhaustive search on small traces), and the
policies' replay is the store's own bookkeeping."""

from __future__ import annotations

import functools
import random

import pytest

from offload.store.cache import POLICIES, Context, Cycle, SlotTable
from offload.store.optimum import optimum, replay


def random_trace(rng: random.Random, layers: int, experts: int, k: int, tokens: int) -> list:
    """A prefill step per layer (k+1 experts), then `tokens` decode tokens through the layer cycle."""
    trace = [(False, layer, sorted(rng.sample(range(experts), k + 1))) for layer in range(layers)]
    for _ in range(tokens):
        trace += [(True, layer, sorted(rng.sample(range(experts), k))) for layer in range(layers)]
    return trace


def fewest_misses(trace: list, slots: int) -> int:
    """Every eviction choice tried (the store's rule: a step's experts never evict each other): the fewest
    misses any schedule achieves."""
    keys = [((s[1], e), i) for i, s in enumerate(trace) for e in s[2]]

    @functools.cache
    def best(pos: int, resident: frozenset) -> int:
        if pos == len(keys):
            return 0
        key, step = keys[pos]
        if key in resident:
            return best(pos + 1, resident)
        if len(resident) < slots:
            return 1 + best(pos + 1, resident | {key})
        protected = {(trace[step][1], e) for e in trace[step][2]}
        options = [resident - {v} | {key} for v in resident if v not in protected] or [resident]
        return 1 + min(best(pos + 1, r) for r in options)

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_the_fewest_misses_any_eviction_schedule_achieves(seed):
    rng = random.Random(seed)
    layers, experts, k = rng.choice([(2, 3, 1), (3, 3, 1), (2, 4, 2), (3, 4, 2)])
    trace = random_trace(rng, layers, experts, k, tokens=rng.randint(3, 5))
    for slots in range(k, layers * experts + 1):
        assert optimum(trace, slots)["misses_all"] == fewest_misses(trace, slots), (seed, slots)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_no_policy_misses_less_than_the_optimum(policy):
    rng = random.Random(7)
    trace = random_trace(rng, layers=4, experts=8, k=2, tokens=60)
    for slots in (2, 4, 8, 16, 24, 32):
        best, got = optimum(trace, slots), replay(trace, slots, policy)
        assert got["uses"] == best["uses"] == 60 * 4 * 2
        assert got["hits"] <= best["hits"]
    assert replay(trace, 32, policy)["hits"] == optimum(trace, 32)["hits"]  # everything fits: only cold misses


def test_cycle_keeps_what_the_next_layers_use_and_evicts_the_layer_just_run():
    """LRU's failure on a layer cycle: the oldest expert is the one the next layer asks for. Cycle evicts the
    expert of the layer just run (the farthest in the cycle) instead, at equal use rates."""
    tables = {name: SlotTable(3, POLICIES[name]()) for name in ("cycle", "lru")}
    for table in tables.values():
        for layer in (0, 1, 2):  # one token through three layers, one expert each: the slots are full
            table.visit(layer)
            table.assign((layer, 0))
        table.visit(0)  # the next token: layer 0 uses its expert again, and a new one
        needed = {(0, 0), (0, 1)}
        assert table.lookup((0, 0)) is not None
        table.assign((0, 1), needed)
    assert (1, 0) in tables["cycle"] and (2, 0) not in tables["cycle"]
    assert (1, 0) not in tables["lru"]  # the oldest: exactly what layer 1 is about to ask for


def test_cycle_prefers_to_keep_a_frequently_used_expert():
    policy = Cycle()
    table = SlotTable(2, policy)
    for _ in range(10):  # expert (0, 0) is used every token; (0, 1) once
        policy.visit(0)
        table.lookup((0, 0)) is not None or table.assign((0, 0))
    table.assign((0, 1))
    policy.visit(0)
    table.assign((0, 2), protected={(0, 2)})
    assert (0, 0) in table and (0, 1) not in table


def test_cycle_keeps_a_prefetched_guess_until_its_layer_has_run():
    """A guess never used before has no use rate (its next use would look infinitely far): it is kept anyway
    until its layer has run, unless nothing else may go."""
    policy = Cycle()
    table = SlotTable(3, policy)
    policy.visit(2)
    table.assign((2, 3))
    policy.visit(0)
    table.assign((0, 0))
    table.assign((1, 5), use=False)  # a guess for layer 1
    table.assign((0, 1), protected={(0, 0), (0, 1)})
    assert (1, 5) in table and (2, 3) not in table
    policy.visit(1)  # its layer ran without it: now it goes first
    table.assign((1, 6), protected={(1, 6)})
    assert (1, 5) not in table


def test_cycle_finds_victims_per_layer_not_by_scanning_every_key():
    """The victim is the best of one candidate per layer: the sorted lists stay consistent through churn."""
    rng = random.Random(0)
    policy = Cycle()
    table = SlotTable(16, policy)
    for _ in range(300):
        for layer in range(6):
            table.visit(layer)
            needed = {(layer, e) for e in rng.sample(range(12), 2)}
            for key in needed:
                if table.lookup(key) is None:
                    table.assign(key, needed)
        resident = sorted(k for layer in policy.sorted.values() for _, k in layer)
        assert resident == sorted(table.slot_of)
        for layer in policy.sorted.values():
            assert layer == sorted(layer)


def repeating_trace(seed: int, layers: int = 4, experts: int = 8, k: int = 2, vocab: int = 8, length: int = 30,
                    repeats: int = 4) -> list:
    """Decoded text that repeats itself (a passage of `length` tokens, `repeats` times), each token routed to
    the same experts wherever it appears: routing the context policy can learn and Cycle's rates cannot."""
    rng = random.Random(seed)
    route = {(t, layer): sorted(rng.sample(range(experts), k)) for t in range(vocab) for layer in range(layers)}
    text = [rng.randrange(vocab) for _ in range(length)]
    trace = [(False, layer, sorted(rng.sample(range(experts), k + 1)), text[:3]) for layer in range(layers)]
    for t in text * repeats:
        trace += [(True, layer, route[t, layer], [t]) for layer in range(layers)]
    return trace


@pytest.mark.parametrize("seed", range(4))
def test_context_learns_the_routing_that_follows_the_same_tokens(seed):
    """On text that repeats, knowing what followed the same tokens before brings the policy near the optimum,
    far above Cycle; the same trace without its token ids gives it nothing to learn from."""
    trace = repeating_trace(seed)
    blind = [s[:3] for s in trace]
    for slots in (4, 8, 16):
        best = optimum(trace, slots)["hits"]
        got = replay(trace, slots, "context")["hits"]
        assert got >= 0.8 * best, (slots, got, best)
        assert got > replay(trace, slots, "cycle")["hits"]
        assert got > replay(blind, slots, "context")["hits"]


def test_context_ranks_stay_consistent_and_victims_nearly_always_least_urgent():
    """Each layer's ranked keys are exactly its resident ones, in order, through churn; and the heap's victim is
    the least urgent resident key now, except where a layer's order, ranked earlier in the token, has shifted
    as its visit came closer (rare: the exception the per-layer ranking trades for not scanning every key)."""
    rng = random.Random(1)
    policy = Context()
    table = SlotTable(20, policy)
    route = {(t, layer): rng.sample(range(16), 4) for t in range(12) for layer in range(6)}
    evictions = least = 0
    for _ in range(200):
        t = rng.randrange(12)
        for layer in range(6):
            experts = route[t, layer] if rng.random() < 0.7 else rng.sample(range(16), 4)
            table.visit(layer, experts, [t])
            needed = {(layer, e) for e in experts}
            for key in needed:
                if table.lookup(key) is not None:
                    continue
                candidates = [k for k in table.slot_of if k not in needed]
                floor = min(map(policy.urgency, candidates)) if len(table) == table.n_slots else None
                before = set(table.slot_of)
                table.assign(key, needed)
                if floor is not None:
                    evicted, = before - set(table.slot_of)
                    evictions += 1
                    least += policy.urgency(evicted) <= floor
            for lay, (_, ranked, rank, _) in policy.orders.items():
                assert ranked == sorted(ranked) and sorted(k for _, k in ranked) == sorted(rank)
                assert sorted(rank) == sorted(table.keys_of_layer(lay))
    assert evictions > 1000 and least >= 0.97 * evictions


@pytest.mark.parametrize("cap", [5, 200])
def test_context_memory_is_capped(cap):
    """Past MAX_CELLS counters the contexts seen least recently are dropped, and the policy goes on; one dropped
    while an earlier token's context (a cap below a token's counters) is counted no more, so the count stays
    the true sum."""
    policy = Context()
    policy.MAX_CELLS = cap
    table = SlotTable(6, policy)
    rng = random.Random(2)
    for _ in range(400):
        t = rng.randrange(1000)  # many distinct contexts
        for layer in range(4):
            table.demand_step(layer, rng.sample(range(8), 2), [t])
        assert policy.cells <= policy.MAX_CELLS + 3 * 4 * 8  # at most one token's new counters over the cap
        assert policy.cells == sum(seen.cells for seen in policy.seen.values())
    assert len(policy.seen) < 3 * 400
