"""The slot table of a tier: which expert sits in which slot, and who is evicted next. Pure Python, no tensors.

A tier owns N equal slots (device: preallocated VRAM; host: pinned RAM). The table maps key -> slot and
slot -> key in one place, and defers eviction order to a small policy class, so LRU and other policies
(LFU, ...) plug in without touching the tiers.

Global vs per-layer LRU: we use ONE global LRU over all (layer, expert) keys. Per-layer LRU (as in
mixtral-offloading) splits the slots evenly across layers. Measured on the trained demo model
(bench/bench_offload.py, the decode steps of 32 greedy tokens, prefetch off; bench/results/offload-cpu.json),
where both can run they are within two points of each other: hit rate 0.444 global vs 0.452 per-layer at 8
of 32 slots, 0.726 vs 0.742 at 16, 0.927 vs 0.915 at 24. Per-layer cannot run at all below L x top_k slots, which is
the tight-budget regime this runtime is for, and global LRU also lets layers with concentrated routing
give slots to spread-out ones as the budget grows; so: global. `SlotTable(per_layer=L)` is kept for the
comparison (`--per-layer-cache` in the benchmark).

Which key to evict: `Context` (the default, `--cache-policy context`) is `Cycle` with each expert's chance of
use at its layer's next visits learned from what followed the same tokens before; `Cycle` knows that decode
visits the layers in a cycle, so an expert's next use is its layer's cycle distance away plus whole tokens;
LRU evicts exactly the experts the next layers are about to use. Measured against Belady's offline optimum
on the same routing traces in bench/bench_cache.py (bench/results/cache-cpu.json); the figures are in the
README.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable

Key = Hashable


class LRU:
    """Least recently used first. `touch` marks a use; `victim` picks whom to evict. `visit(layer, experts,
    tokens)` says a layer's step begins, running those experts for the forward of those token ids (None: not
    known), and `admit(key)` that a key came in unasked (a prefetch): hooks for policies that use them (LRU
    counts an admission as a use)."""

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def visit(self, layer: int, experts: Iterable[int] = (), tokens: list[int] | None = None) -> None:
        pass

    def touch(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def admit(self, key: Key) -> None:
        self.touch(key)

    def forget(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, keys: Iterable[Key], protected: set) -> Key | None:
        """The evictable resident key to drop next, or None when every resident key is protected."""
        for key in self.order:
            if key not in protected:
                return key
        return None


class LFU(LRU):
    """Least frequently used first (ties: least recently used). An alternative policy for experiments."""

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[Key, int] = {}

    def touch(self, key: Key) -> None:
        super().touch(key)
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, keys, protected):
        candidates = [k for k in self.order if k not in protected]
        return min(candidates, key=lambda k: self.count[k]) if candidates else None


class Cycle:
    """Evict the resident expert whose next use is expected farthest away (Belady's choice, estimated online).

    Keys are (layer, expert). Decode visits the layers in order, once per token, so an expert of layer l is
    next wanted at the earliest `d(l)` layer steps from now (1 for the next layer, L for the one just run),
    and otherwise a whole cycle of L steps per token it is not picked. With r the expert's use rate (uses
    per visit of its layer, exponentially decayed by `decay` per visit, so a changed topic counts after a
    few tokens), the expected number of visits until its next use is about 1/r, and its next use

        T = d(l) + L * (1/r - 1)     layer steps from now.

    An expert of the next layer used at most tokens stays; an expert of the layer just run goes before a
    slightly rarer one the next layer is about to ask for (LRU's mistake: the oldest key is the next used).
    Experts admitted by a prefetch are kept until their layer has run (the guess is the likeliest next
    use). Measured: bench/bench_cache.py.

    Cost: a key's rate decays with its layer's visits only, so within a layer the order of the resident
    keys by rate changes only when one is used: each layer keeps its residents sorted by a fixed number
    (log rate at its last use, minus that visit's decay), and a victim is the best of one candidate per
    layer, O(layers) per eviction, not O(resident keys)."""

    def __init__(self, decay: float = 0.95) -> None:
        self.log_decay = math.log(decay)
        self.decay = decay
        self.rate: dict[Key, tuple[float, int]] = {}   # key -> (use rate at its layer's visit v, v): kept on eviction
        self.visits: dict[int, int] = {}               # layer -> visits so far
        self.position: dict[int, int] = {}             # layer -> its place in the cycle (layers seen, in order)
        self.current: int | None = None                # the layer whose step runs now
        self.sorted: dict[int, list[tuple[float, Key]]] = {}  # layer -> its resident keys, lowest rate first
        self.rank: dict[Key, float] = {}               # resident key -> its sort number in `sorted`
        self.expected: dict[int, set] = {}             # layer -> keys a prefetch brought in for its next visit

    def visit(self, layer: int, experts: Iterable[int] = (), tokens: list[int] | None = None) -> None:
        if layer not in self.visits:
            self.visits[layer] = 0
            self.position = {lay: i for i, lay in enumerate(sorted(self.visits))}
        self.visits[layer] += 1
        self.current = layer
        self.expected.pop(layer, None)

    def _rate(self, key: Key) -> float:
        """The key's decayed use rate now (uses per visit of its layer)."""
        r, v = self.rate.get(key, (0.0, 0))
        return r * self.decay ** (self.visits.get(key[0], 0) - v)

    def touch(self, key: Key) -> None:
        layer = key[0]
        v = self.visits.get(layer, 0)
        r, last = self.rate.get(key, (0.0, -1))
        if last != v:  # once per visit: a hit and a reload in one step are one use
            self.rate[key] = (r * self.decay ** (v - last) + (1 - self.decay) if last >= 0 else 1 - self.decay, v)
        self._place(key)

    def admit(self, key: Key) -> None:
        self.expected.setdefault(key[0], set()).add(key)
        self._place(key)

    def _place(self, key: Key) -> None:
        self.forget_order(key)
        r, v = self.rate.get(key, (0.0, 0))
        # log(rate now) = log(r) + (visits - v) log(decay): the part that differs between keys of a layer.
        rank = (math.log(r) if r > 0 else -1e300) - v * self.log_decay
        self.rank[key] = rank
        bisect.insort(self.sorted.setdefault(key[0], []), (rank, key))

    def forget_order(self, key: Key) -> None:
        rank = self.rank.pop(key, None)
        if rank is not None:
            keys = self.sorted[key[0]]
            del keys[bisect.bisect_left(keys, (rank, key))]

    def forget(self, key: Key) -> None:
        self.forget_order(key)
        self.expected.get(key[0], set()).discard(key)

    def next_use(self, key: Key) -> float:
        """Expected layer steps until `key` is used (inf for a key never used)."""
        L = len(self.position) or 1
        layer = key[0]
        here = self.position.get(self.current, -1)
        d = (self.position.get(layer, 0) - here - 1) % L + 1 if here >= 0 else 1
        r = self._rate(key)
        return d + L * (1 / r - 1) if r > 0 else math.inf

    def victim(self, keys: Iterable[Key], protected: set) -> Key | None:
        best, best_t, fallback = None, -1.0, None
        for layer, resident in self.sorted.items():
            expected = self.expected.get(layer, ())
            for _, key in resident:  # lowest rate first: the first that may go is this layer's candidate
                if key in protected:
                    continue
                if key in expected:
                    fallback = fallback or key
                    continue
                t = self.next_use(key)
                if t > best_t:
                    best, best_t = key, t
                break
        return best if best is not None else fallback


class _Seen:
    """What followed one token context: `n` occurrences, and per layer per expert how many of them used it
    0, 1, .. AHEAD-1 tokens later."""

    __slots__ = ("cells", "n", "used")

    def __init__(self) -> None:
        self.n = 0
        self.used: dict[int, dict[int, list[int]]] = {}  # layer -> expert -> uses per tokens ahead
        self.cells = 0                                    # experts counted (the memory cap's unit)


class Context(Cycle):
    """Cycle, with each expert's chance of being used at its layer's next visits learned from what followed the
    same tokens before.

    Decoded text repeats itself (names, phrases, code, markup, and a small model's loops), and a token's routing
    is mostly a function of the token and its neighbours. So for each of the current token's contexts (the
    token alone, then with one, then with two tokens before it: `NGRAM`), the policy counts how often each
    (layer, expert) was used by that token and the next AHEAD-1 tokens after it. An expert's chance q of being
    used at its layer's next visit, t tokens ahead, starts from its decayed use rate (Cycle's) and each context,
    coarse to fine, moves it toward what it saw: q <- (uses + q) / (n + 1), n that context's earlier
    occurrences (a context seen once moves q halfway; an unseen one leaves it).

    Which to evict: the resident expert whose next use is least urgent, by expected 1/T (T: layer steps until
    its next use), summed over its layer's next AHEAD visits at distance d, d + L, .. (the contexts' q) and then
    its rate (1 / its expected wait). 1/T weights a use soon above a likelier one later, which is what counts
    when the slot will be wanted again before long. Measured against Belady's optimum in bench/bench_cache.py.

    Without token ids (`tokens` None) no context is known and it is Cycle with that urgency. A prefill's tokens
    only extend the history the next decode token's contexts are read from (its routing is not per token here).

    Cost: each layer's resident experts are ranked twice a token (its contexts change with the token, and its
    next visit moves to the next token once it has run), and kept in order as experts come and go; a victim is
    the least urgent of one candidate per layer, from a heap built once a token, not a scan of every resident
    expert. Within a layer the order is taken at the distance of its ranking: as the visit comes closer it may
    shift, and about 1% of victims (tests/test_optimum.py) are not the least urgent resident expert. Memory:
    the contexts seen least recently are dropped once MAX_CELLS (layer, expert) counters are held (about 30 MB
    of Python objects)."""

    NGRAM = 3
    AHEAD = 3
    MAX_CELLS = 1 << 18

    def __init__(self, decay: float = 0.95, prior=None) -> None:
        super().__init__(decay)
        if prior is not None and prior.ahead != self.AHEAD:
            raise ValueError(f"a routing prior counts {prior.ahead} tokens ahead, this policy {self.AHEAD}")
        self.prior = prior                                   # offload/store/prior.py's RoutingPrior, or None
        self.history: list[int] = []                         # the last NGRAM token ids
        self.seen: OrderedDict[tuple[int, ...], _Seen] = OrderedDict()
        self.cells = 0
        self.recent: list[list[_Seen]] = []                  # contexts of this token, the one before, ..
        self.known: list[tuple[int, _Seen]] = []             # this token's contexts seen before: (earlier n, seen)
        self.last_layer: int | None = None
        self.tokens_seen = 0
        self.orders: dict[int, tuple] = {}                   # layer -> ((token, side), ranked keys, key -> rank, view)
        self.views: dict[int, tuple] = {}                    # layer -> its `_view` at a layer step
        self.steps = 0                                       # layer steps so far
        self.changes: dict[int, int] = {}                    # layer -> keys placed or dropped so far
        self.heap: list[tuple[float, int, int, Key]] = []    # (urgency, layer, its changes then, key)
        self.heap_token = -1                                 # the token the heap was built in
        self.dirty: set[int] = set()                         # layers to rank again before the next victim

    def visit(self, layer: int, experts: Iterable[int] = (), tokens: list[int] | None = None) -> None:
        super().visit(layer)
        self.steps += 1
        self._changed(layer)  # its keys' next visit is now the next token's: its heap entry is stale
        if self.last_layer is None or layer <= self.last_layer:  # a forward begins
            self._begin(tokens)
        self.last_layer = layer
        for ahead, contexts in enumerate(self.recent):
            for seen in contexts:
                self._count(seen, layer, experts, ahead)

    def _begin(self, tokens: list[int] | None) -> None:
        """A forward of `tokens`: one decode token gets its contexts; a prefill (or no ids) only history."""
        self.known = []
        self.tokens_seen += 1
        if tokens is None:
            self.history, self.recent = [], []
            return
        self.history = (self.history + list(tokens))[-self.NGRAM:]
        if len(tokens) != 1:
            self.recent = []
            return
        contexts = []
        for m in range(1, len(self.history) + 1):
            ngram = tuple(self.history[-m:])
            seen = self.seen.get(ngram)
            if seen is None:
                seen = self.seen[ngram] = self._new(ngram)
            else:
                self.seen.move_to_end(ngram)
            if seen.n:
                self.known.append((seen.n, seen))
            seen.n += 1
            contexts.append(seen)
        self.recent = [contexts] + self.recent[:self.AHEAD - 1]
        dropped = set()
        while self.cells > self.MAX_CELLS and len(self.seen) > len(contexts):
            _, old = self.seen.popitem(last=False)
            self.cells -= old.cells
            dropped.add(id(old))
        if dropped:  # an earlier token's context dropped here is counted no more (its cells would go uncapped)
            self.recent = [[seen for seen in ctxs if id(seen) not in dropped] for ctxs in self.recent]

    def _new(self, ngram: tuple[int, ...]) -> _Seen:
        """A context met for the first time in this run: empty, or for one token the prior's counts."""
        seen = _Seen()
        if self.prior is not None and len(ngram) == 1:
            seen.n, seen.used = self.prior.used(ngram[0])
            seen.cells = sum(len(per_expert) for per_expert in seen.used.values())
            self.cells += seen.cells
        return seen

    def _count(self, seen: _Seen, layer: int, experts: Iterable[int], ahead: int) -> None:
        per_expert = seen.used.setdefault(layer, {})
        for e in experts:
            uses = per_expert.get(e)
            if uses is None:
                uses = per_expert[e] = [0] * self.AHEAD
                seen.cells += 1
                self.cells += 1
            uses[ahead] += 1

    def urgency(self, key: Key) -> float:
        """Expected 1/T, T the layer steps until `key` is used (0 for a key never used and never counted)."""
        return self._urgency(key, self._view(key[0]))

    def _view(self, layer: int) -> tuple:
        """What `layer`'s keys are weighed with at this layer step: (L, d, first, counts): layers in the cycle,
        steps to the layer's next visit, 0 if that visit is this token's (else 1: the next token's), and for
        each of this token's contexts seen before, (its earlier occurrences, expert -> uses) of the layer."""
        view = self.views.get(layer)
        if view is None or view[0] != self.steps:
            L = len(self.position) or 1
            here = self.position.get(self.current, -1)
            where = self.position.get(layer, 0)
            d = (where - here - 1) % L + 1 if here >= 0 else 1
            view = self.views[layer] = (self.steps, L, d, 0 if where > here else 1,
                                        [(n, seen.used.get(layer, {})) for n, seen in self.known])
        return view

    def _urgency(self, key: Key, view: tuple) -> float:
        _, L, k, first, counts = view
        r = self._rate(key)
        counted = [(n + 1, used.get(key[1])) for n, used in counts]
        v, missed = 0.0, 1.0
        for ahead in range(first, self.AHEAD):
            q = r
            for n1, uses in counted:
                q = ((uses[ahead] if uses else 0) + q) / n1
            v += missed * q / k
            missed *= 1 - q
            k += L
        return v + (missed / (k + L * (1 / r - 1)) if r > 0 else 0.0)

    def next_use(self, key: Key) -> float:
        """Layer steps until `key` is used, as 1 / its urgency (what prefetch weighs a guess against)."""
        u = self.urgency(key)
        return 1 / u if u > 0 else math.inf

    def _ranked(self, layer: int) -> list[tuple[float, Key]]:
        """`layer`'s resident keys, least urgent first, as ranked at this token and side of the layer's visit
        (kept in order as keys come and go, at the distance they were ranked at; ranked again when the token or
        the side changes)."""
        view = self._view(layer)
        stamp = (self.tokens_seen, view[3])
        cached = self.orders.get(layer)
        if cached is None or cached[0] != stamp:
            ranked = sorted((self._urgency(key, view), key) for _, key in self.sorted.get(layer, ()))
            cached = self.orders[layer] = (stamp, ranked, {key: u for u, key in ranked}, view)
        return cached[1]

    def _place(self, key: Key) -> None:
        super()._place(key)
        self._changed(key[0])
        cached = self.orders.get(key[0])
        if cached is not None:
            u = self._urgency(key, cached[3])  # at the distance the others were ranked at
            bisect.insort(cached[1], (u, key))
            cached[2][key] = u

    def forget_order(self, key: Key) -> None:
        super().forget_order(key)
        self._changed(key[0])
        cached = self.orders.get(key[0])
        if cached is not None and key in cached[2]:
            u = cached[2].pop(key)
            del cached[1][bisect.bisect_left(cached[1], (u, key))]

    def _changed(self, layer: int) -> None:
        self.changes[layer] = self.changes.get(layer, 0) + 1
        self.dirty.add(layer)

    def victim(self, keys: Iterable[Key], protected: set) -> Key | None:
        """The least urgent of one candidate per layer, else a prefetched guess. The candidates wait in a heap
        built once per token: as the layer steps go by, a key's next visits only come closer and its contexts'
        counts only grow, so its urgency only grows until its layer runs (or its keys change), which pushes that
        layer again. An entry's urgency is thus a lower bound of its urgency now: the top entry, weighed again,
        is the least urgent of all if it has not grown, else it goes back with its new value."""
        if self.heap_token != self.tokens_seen:
            self.heap_token, self.heap = self.tokens_seen, []
            self.dirty = {layer for layer, resident in self.sorted.items() if resident}
        for layer in self.dirty:
            self._push(layer, protected)
        self.dirty = set()
        while self.heap:
            u, layer, changes, key = self.heap[0]
            if changes != self.changes.get(layer, 0):
                heapq.heappop(self.heap)  # stale: the layer's fresh entry is in the heap
                continue
            if key in protected:
                heapq.heappop(self.heap)
                self._push(layer, protected)
                continue
            now = self._urgency(key, self._view(layer))
            if now > u:
                heapq.heapreplace(self.heap, (now, layer, changes, key))
                continue
            heapq.heappop(self.heap)
            self.dirty.add(layer)  # popped: pushed again at the next call
            return key
        for resident in self.sorted.values():  # only guesses may go
            for _, key in resident:
                if key not in protected:
                    return key
        return None

    def _push(self, layer: int, protected: set) -> None:
        """Put `layer`'s candidate on the heap: its least urgent key that may go (not protected, not a guess
        still to be used), with its urgency now (the rank was taken earlier in the token)."""
        expected = self.expected.get(layer, ())
        for _, key in self._ranked(layer):
            if key not in protected and key not in expected:
                u = self._urgency(key, self._view(layer))
                heapq.heappush(self.heap, (u, layer, self.changes.get(layer, 0), key))
                return


POLICIES = {"context": Context, "cycle": Cycle, "lru": LRU, "lfu": LFU}
DEFAULT_POLICY = "context"


def make_policy(name: str, prior=None) -> LRU | Cycle:
    """A fresh policy `name` of POLICIES; the context policy starts from `prior` (a RoutingPrior) when given."""
    cls = POLICIES[name]
    return cls(prior=prior) if issubclass(cls, Context) else cls()


class SlotTable:
    """slot <-> key bookkeeping for one tier of `n_slots` slots (0: a tier that holds nothing, the device tier
    under --cpu-experts all, where every lookup misses and nothing is ever assigned)."""

    def __init__(self, n_slots: int, policy: LRU | None = None, per_layer: int = 0):
        if n_slots < 0:
            raise ValueError("a tier cannot have a negative number of slots")
        self.n_slots = n_slots
        self.policy = policy or LRU()
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * n_slots
        self.free = list(range(n_slots - 1, -1, -1))
        # Per-layer mode: keys are (layer, expert); each layer owns a fixed share of the slots.
        self.per_layer = per_layer
        self.layer_count: dict[int, int] = {}
        self.by_layer: dict[object, set] = {}  # (layer, expert) keys: layer -> its resident keys

    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def keys_of_layer(self, layer) -> set:
        """The resident keys (layer, expert) of `layer` (a copy)."""
        return set(self.by_layer.get(layer, ()))

    def visit(self, layer: int, experts: Iterable[int] = (), tokens: list[int] | None = None) -> None:
        """A layer's step begins (the store's `prepare`), running `experts` for the forward of `tokens`: the
        policy's clock."""
        self.policy.visit(layer, experts, tokens)

    def demand_step(self, layer: int, experts: list[int], tokens: list[int] | None = None) -> int:
        """A layer step on the table alone, by the store's rule: the policy's clock, then each of the step's
        distinct experts a hit or given a slot, never evicting another of them (none when every slot holds
        one: it is not kept). Returns the hits. How the trace replays and the store's prefetch-off shadow
        take a step."""
        needed = [(layer, e) for e in dict.fromkeys(experts)]
        self.visit(layer, experts, tokens)
        protected = set(needed)
        hits = 0
        for key in needed:
            if self.lookup(key) is not None:
                hits += 1
            else:
                self.assign(key, protected)
        return hits

    def lookup(self, key: Key) -> int | None:
        """The slot holding `key` (and mark it used), or None."""
        slot = self.slot_of.get(key)
        if slot is not None:
            self.policy.touch(key)
        return slot

    def _layer_share(self, layer: int) -> int:
        base, extra = divmod(self.n_slots, self.per_layer)
        return base + (1 if layer < extra else 0)

    def assign(self, key: Key, protected: set = frozenset(), use: bool = True) -> tuple[int, Key | None] | None:
        """Give `key` a slot, evicting if full: (slot, evicted key or None); None if all slots are protected.
        `use`: it is placed to be used now (False: a prefetch's guess)."""
        assert key not in self.slot_of
        if self.per_layer:
            layer = key[0]
            if self.layer_count.get(layer, 0) >= self._layer_share(layer):
                same = {k for k in self.slot_of if k[0] != layer}
                return self._evict_into(key, protected | same, use)
        if self.free:
            slot = self.free.pop()
            self._place(key, slot, use)
            return slot, None
        return self._evict_into(key, protected, use)

    def _evict_into(self, key: Key, protected: set, use: bool):
        victim = self.policy.victim(self.slot_of, protected)
        if victim is None:
            return None
        slot = self.remove(victim)
        self.free.remove(slot)
        self._place(key, slot, use)
        return slot, victim

    def _place(self, key: Key, slot: int, use: bool) -> None:
        self.slot_of[key] = slot
        self.key_of[slot] = key
        if use:
            self.policy.touch(key)
        else:
            self.policy.admit(key)
        if isinstance(key, tuple):
            self.by_layer.setdefault(key[0], set()).add(key)
        if self.per_layer:
            self.layer_count[key[0]] = self.layer_count.get(key[0], 0) + 1

    def remove(self, key: Key) -> int:
        slot = self.slot_of.pop(key)
        self.key_of[slot] = None
        self.policy.forget(key)
        self.free.append(slot)
        if isinstance(key, tuple):
            self.by_layer[key[0]].discard(key)
        if self.per_layer:
            self.layer_count[key[0]] -= 1
        return slot
