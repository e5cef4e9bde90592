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
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable

Key = Hashable


class LRU:
    """Least recently used first. `touch` marks a use; `victim` picks whom to evict."""

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

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


POLICIES = {"lru": LRU, "lfu": LFU}


class SlotTable:
    """slot <-> key bookkeeping for one tier of `n_slots` slots."""

    def __init__(self, n_slots: int, policy: LRU | None = None, per_layer: int = 0):
        if n_slots < 1:
            raise ValueError("a tier needs at least one slot")
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

    def lookup(self, key: Key) -> int | None:
        """The slot holding `key` (and mark it used), or None."""
        slot = self.slot_of.get(key)
        if slot is not None:
            self.policy.touch(key)
        return slot

    def _layer_share(self, layer: int) -> int:
        base, extra = divmod(self.n_slots, self.per_layer)
        return base + (1 if layer < extra else 0)

    def assign(self, key: Key, protected: set = frozenset()) -> tuple[int, Key | None] | None:
        """Give `key` a slot, evicting if full: (slot, evicted key or None); None if all slots are protected."""
        assert key not in self.slot_of
        if self.per_layer:
            layer = key[0]
            if self.layer_count.get(layer, 0) >= self._layer_share(layer):
                same = {k for k in self.slot_of if k[0] != layer}
                return self._evict_into(key, protected | same)
        if self.free:
            slot = self.free.pop()
            self._place(key, slot)
            return slot, None
        return self._evict_into(key, protected)

    def _evict_into(self, key: Key, protected: set):
        victim = self.policy.victim(self.slot_of, protected)
        if victim is None:
            return None
        slot = self.remove(victim)
        self.free.remove(slot)
        self._place(key, slot)
        return slot, victim

    def _place(self, key: Key, slot: int) -> None:
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.policy.touch(key)
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
