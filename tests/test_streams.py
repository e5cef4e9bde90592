"""The store's CUDA stream and event protocol, run on a CPU against simulated streams.

On a GPU, copies run on their own stream and finish whenever the hardware gets to them. Two hazards follow,
and the store fences both with events: compute must wait for a slot's copy (`ready`), and the reader thread
must not overwrite a host slot that a queued copy still reads (`host_busy`). Here the copy stream runs
its work as late as it possibly can, only when an event forces it, so a missing or misplaced fence reads
stale bytes and changes the logits. The tests check that the fenced store gives the logits of the plain
CPU store, that the simulation does catch each fence when it is removed, and that the profiler's CUDA
timing (events on both streams, read after each token's sync) gives a valid profile.

The third fence, `free` (a copy must not overwrite a slot that a queued kernel still reads), cannot show
here: simulated compute is done before the next copy is queued. tests/test_gpu.py runs the real streams.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

import offload
from offload.generate import decode_one, prefill
from test_store import _plan, budget

PROMPT = "The quick brown fox jumps over the lazy dog and the experts"


class SimStream:
    """A stream whose queued copies run only when an event recorded after them is waited for."""

    def __init__(self, lazy: bool):
        self.lazy, self.queue, self.lock = lazy, [], threading.RLock()

    def enqueue(self, op) -> None:
        if not self.lazy:
            op()
            return
        with self.lock:
            self.queue.append(op)

    def record(self, event: "SimEvent") -> None:
        with self.lock:
            event.marker = Marker()
            if self.lazy:
                self.queue.append(event.marker)
                event.stream = self
            else:
                event.stream = None  # eager work is done the moment it is queued
                event.marker.t = time.perf_counter()

    def flush_through(self, marker) -> None:
        with self.lock:
            while marker in self.queue:
                op = self.queue.pop(0)
                if isinstance(op, Marker):
                    op.t = time.perf_counter()  # the time the event "happened", for elapsed_time
                else:
                    op()

    def flush(self) -> None:
        with self.lock:
            if self.queue:
                self.queue.append(Marker())
                self.flush_through(self.queue[-1])

    def wait_event(self, event: "SimEvent") -> None:
        event.synchronize()  # the compute stream is eager: it may only go on once the event is done

    synchronize = flush


class Marker:
    t: float | None = None


class SimEvent:
    def __init__(self, *args, **kwargs):
        self.stream, self.marker = None, None

    def elapsed_time(self, end: "SimEvent") -> float:
        # As CUDA: both events must have happened (the profiler synchronizes before it reads them).
        assert self.marker.t is not None and end.marker.t is not None, "elapsed_time of an event not yet done"
        return (end.marker.t - self.marker.t) * 1e3

    def record(self, stream: SimStream) -> None:
        stream.record(self)

    def query(self) -> bool:
        return self.stream is None or self.marker not in self.stream.queue

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.flush_through(self.marker)


def simulate_cuda(store, monkeypatch) -> None:
    """Turn a CPU store's device tier into one fed by a simulated, lazy copy stream."""
    compute, copy = SimStream(lazy=False), SimStream(lazy=True)
    current = [compute]

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "Event", SimEvent)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: copy.flush())
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    store.cuda = True
    store.copy_stream, store.guess_stream = copy, SimStream(lazy=True)
    store.ready = [SimEvent() for _ in store.dev_views]
    store.free = [SimEvent() for _ in store.dev_views]
    # queues the whole blob's copy on the simulated current stream; returns the bytes it moves, as `_h2d` does
    store._h2d = lambda slot, host: (current[-1].enqueue(lambda: store.dev[slot].copy_(store.host[host])),
                                     store.layout.nbytes)[1]


def decode(rt, steps: int = 10) -> torch.Tensor:
    ids = rt.encode(PROMPT)
    logits = [prefill(rt.model, torch.tensor(ids))]
    for i in range(steps):
        logits.append(decode_one(rt.model, int(logits[-1].argmax()), len(ids) + i))
    return torch.stack(logits)


def budgets(folder, device_slots: int, host_slots: int) -> dict:
    return dict(vram=budget(folder, device_slots), ram=host_slots * _plan(str(folder)).blob_bytes)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return decode(offload.load(tiny_checkpoint, device="cpu", context=256))


def simulated(folder, monkeypatch, prefetch: int, device_slots: int, host_slots: int, break_fence=None):
    copy_every_guess(monkeypatch)  # every guess copied: the fences are tested with guess copies in flight
    rt = offload.load(folder, device="cpu", context=256, prefetch=prefetch, cpu_experts="never",
                      **budgets(folder, device_slots, host_slots))
    simulate_cuda(rt.store, monkeypatch)
    if break_fence:
        break_fence(rt.store, monkeypatch)
    logits = decode(rt)
    rt.store.close()
    return logits, rt.store.stats()


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("device_slots,host_slots", [(3, 2), (4, 3), (5, 18)])
def test_fenced_copies_give_the_cpu_stores_logits(tiny_checkpoint, reference, monkeypatch, prefetch, device_slots,
                                                   host_slots):
    logits, stats = simulated(tiny_checkpoint, monkeypatch, prefetch, device_slots, host_slots)
    assert stats["expert_misses"] > 0 and stats["bytes_h2d"] > 0  # copies really went through the stream
    assert torch.equal(logits, reference)


def no_ready_wait(store, monkeypatch):
    compute = torch.cuda.current_stream()
    monkeypatch.setattr(compute, "wait_event", lambda event: None)


def no_host_fence(store, monkeypatch):
    class Forgetful(dict):
        def __setitem__(self, key, value):
            pass

    store.host_busy = Forgetful()


@pytest.mark.parametrize("break_fence,prefetch", [(no_ready_wait, 0), (no_host_fence, 1)])
def test_the_simulation_catches_a_missing_fence(tiny_checkpoint, reference, monkeypatch, break_fence, prefetch):
    # 4 device slots, 3 host slots: host slots are reused while copies out of them are still queued.
    logits, _ = simulated(tiny_checkpoint, monkeypatch, prefetch, 4, 3, break_fence)
    assert not torch.equal(logits, reference)


def copy_every_guess(monkeypatch) -> None:
    """The tiny random models' router-ahead guesses rarely pay for themselves, so the store would copy few
    (ExpertStore._worth_copying): tests of the copy mechanics take every guess as certain."""
    from offload.store import ExpertStore

    monkeypatch.setattr(ExpertStore, "guess_accuracy", lambda self, layer, ahead, rank: 1.0)
    monkeypatch.setattr(ExpertStore, "WASTE_SHARE", float("inf"))


def test_close_waits_for_prefetch_copies_nobody_waited_for(tmp_path, monkeypatch):
    """A wrong router-ahead guess is copied but never waited on: at the end of a generation such copies may
    still be queued, writing into the slot pool. close() must let them finish before the pool can be freed."""
    from conftest import make_checkpoint

    make_checkpoint(tmp_path)  # 2 layers of 4 experts, where these budgets leave the last guesses unused
    copy_every_guess(monkeypatch)
    rt = offload.load(tmp_path, device="cpu", context=256, prefetch=1, cpu_experts="never",
                      **budgets(tmp_path, 6, 8))
    simulate_cuda(rt.store, monkeypatch)
    decode(rt, steps=4)
    streams = rt.store.copy_streams()
    assert any(not isinstance(op, Marker) for s in streams for op in s.queue)  # guesses still being copied
    rt.store.close()
    assert all(s.queue == [] for s in streams)


def test_the_profilers_cuda_timing_under_simulated_streams(tiny_checkpoint, reference, monkeypatch):
    """The profiler's CUDA branch: timing events on both streams, read after each token's sync."""
    from offload.profile import profile_runtime
    from offload.profile.schema import load_schema, schema_errors
    from quant import pinned
    from test_store import FakeCudart

    monkeypatch.setattr(pinned, "_cudart", lambda: FakeCudart())  # the bandwidth probe pins a scratch blob
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, prefetch=1, cpu_experts="never",
                      **budgets(tiny_checkpoint, 4, 3))
    simulate_cuda(rt.store, monkeypatch)
    ids = rt.encode(PROMPT)
    result = profile_runtime(rt, ids, 11)
    rt.store.close()
    assert result.record["tokens"] == reference.argmax(-1).tolist()
    assert schema_errors(result.record, load_schema()) == []
    copies = [s for s in result.spans if s.track == "copy"]
    assert len(copies) * rt.store.plan.blob_bytes == result.record["totals"]["bytes_h2d"]
    for row in result.record["per_token"]:
        assert row["copy_wait_s"] >= 0 and row["expert_s"] > 0
        assert row["copy_wait_s"] + row["expert_s"] <= row["latency_s"]
        assert 0 <= row["copy_hidden_s"] <= row["copy_s"]


# ---- host syncs: one device-to-host transfer per layer, one per token ----------------------------------------

class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops after which a host must wait for a device to have computed a value: a tensor read as a
    Python number (item, int, bool: _local_scalar_dense) and ops whose output shape depends on the data
    (unique, nonzero, masked_select, bincount). `tolist()` does not dispatch on a CPU tensor: counted apart."""

    SYNCING = ("_local_scalar_dense", "unique", "nonzero", "masked_select", "bincount")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.removeprefix("aten::")
        if any(name.startswith(s) or name.startswith("_" + s) for s in self.SYNCING):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_a_decode_step_reads_the_device_once_per_layer_and_once_for_its_token(tiny_checkpoint, monkeypatch, prefetch):
    """On a GPU each read of a device value by the host drains the compute stream (and the copies compute
    waits on). A decode step reads once per layer (the routed experts with the router-ahead guesses and the
    token id the cache policy learns from, in one transfer: offload.models.moe.to_host) and once to sample its
    token; nothing else reads on the way."""
    from offload.models import moe

    copy_every_guess(monkeypatch)
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, prefetch=prefetch, cpu_experts="never",
                      **budgets(tiny_checkpoint, 5, 18))
    layers = rt.config.num_hidden_layers
    steps = rt.generate_ids(rt.encode(PROMPT), 9)
    next(steps)  # the prefill and its token
    transfers, tolists = [], []
    real_to_host, real_tolist = getattr(moe, "to_host", None), torch.Tensor.tolist
    monkeypatch.setattr(moe, "to_host", lambda t: (transfers.append(t.numel()), real_to_host(t))[1], raising=False)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (tolists.append(t.numel()), real_tolist(t))[1])
    with HostReads() as reads:
        tokens = list(steps)
    decode_steps = len(tokens)
    assert decode_steps == 8 and rt.store.stats()["expert_misses"] > 0
    assert reads.ops == ["_local_scalar_dense"] * decode_steps  # sampling: one number per token
    assert len(tolists) <= layers * decode_steps            # lists to the host: at most one per layer ...
    assert len(transfers) == layers * decode_steps          # ... the MoE block's transfer, once per layer
    assert len(tolists) == len(transfers)
    if prefetch:
        assert rt.store.stats()["prefetch_issued"] > 0
        k = rt.config.num_experts_per_tok
        assert max(transfers) == k + min(prefetch, layers - 1) * k + 1  # routing, the guesses, the token: one tensor
    assert len(transfers) + len(reads.ops) <= (layers + 1) * decode_steps


# ---- copies needed now never wait behind router-ahead guesses -------------------------------------------------

def watch_copy_order(store, monkeypatch) -> dict:
    """Tag each simulated copy as a guess or a copy needed now, and, whenever compute waits for a slot whose
    latest copy was needed now, note every guess copy that had to run first (on one in-order copy stream,
    a guess queued ahead of it)."""
    log = {"ran": [], "slot_kind": {}, "waits": 0, "guesses_waited_for": 0}
    kind = ["demand"]
    fill = store._fill_slot

    def tagged_fill(key, slot, prefetch, *chunks):
        kind[0] = log["slot_kind"][slot] = "guess" if prefetch else "demand"
        fill(key, slot, prefetch, *chunks)

    def h2d(slot, host):
        copy_kind = kind[0]
        torch.cuda.current_stream().enqueue(
            lambda: (log["ran"].append(copy_kind), store.dev[slot].copy_(store.host[host])))
        return store.layout.nbytes

    compute = torch.cuda.current_stream()

    def wait_event(event):
        slot = next((i for i, ready in enumerate(store.ready) if ready is event), None)
        before = len(log["ran"])
        event.synchronize()
        if slot is not None and log["slot_kind"].get(slot) == "demand":
            log["waits"] += 1
            log["guesses_waited_for"] += log["ran"][before:].count("guess")

    store._fill_slot, store._h2d = tagged_fill, h2d
    monkeypatch.setattr(compute, "wait_event", wait_event)
    return log


def one_copy_stream(store, monkeypatch):
    store.guess_stream = store.copy_stream  # guesses and copies needed now in one stream's order, as before


@pytest.mark.parametrize("prefetch", [1, 2])
def test_a_copy_needed_now_never_waits_behind_a_guess(tiny_checkpoint, reference, monkeypatch, prefetch):
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, prefetch=prefetch, cpu_experts="never",
                      **budgets(tiny_checkpoint, 4, 18))
    simulate_cuda(rt.store, monkeypatch)
    log = watch_copy_order(rt.store, monkeypatch)
    logits = decode(rt)
    rt.store.close()
    assert torch.equal(logits, reference)
    assert log["waits"] > 0 and "guess" in log["ran"]  # copies needed now were waited for; guesses were copied
    assert log["guesses_waited_for"] == 0


def test_the_simulation_catches_a_copy_queued_behind_a_guess(tiny_checkpoint, reference, monkeypatch):
    copy_every_guess(monkeypatch)  # as the test it checks: guess copies in flight for a demand copy to queue behind
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, prefetch=2, cpu_experts="never",
                      **budgets(tiny_checkpoint, 4, 18))
    simulate_cuda(rt.store, monkeypatch)
    one_copy_stream(rt.store, monkeypatch)
    log = watch_copy_order(rt.store, monkeypatch)
    decode(rt, steps=12)
    rt.store.close()
    assert log["guesses_waited_for"] > 0


def test_guess_copies_in_flight_are_bounded_to_one_layers_worth(tiny_checkpoint, monkeypatch):
    """Guesses queue on their own stream, but a GPU with one copy engine still runs a guess it has started
    before a later copy: so only a layer's worth (k) of guess copies is in flight at any time."""
    copy_every_guess(monkeypatch)
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, prefetch=2, cpu_experts="never",
                      **budgets(tiny_checkpoint, 6, 18))
    simulate_cuda(rt.store, monkeypatch)
    store, most = rt.store, []
    fill = store._fill_slot

    def counted_fill(key, slot, prefetch, *chunks):
        fill(key, slot, prefetch, *chunks)
        most.append(sum(1 for op in store.guess_stream.queue if not isinstance(op, Marker)))

    store._fill_slot = counted_fill
    decode(rt, steps=12)
    assert store.stats()["prefetch_issued"] > 0
    assert 0 < max(most) <= rt.config.num_experts_per_tok
    store.close()


def test_a_guess_never_evicts_the_next_layers_experts(tiny_checkpoint, monkeypatch):
    """Four slots, all full: this layer's expert in use, two experts of the next layer, a stale one of the
    layer after. Guesses may take the stale slot, never the next layer's (nor this layer's)."""
    copy_every_guess(monkeypatch)
    rt = offload.load(tiny_checkpoint, device="cpu", context=256, prefetch=2, cpu_experts="never",
                      **budgets(tiny_checkpoint, 4, 18))
    store = rt.store
    for key in [(2, 5), (1, 0), (1, 1), (0, 3)]:  # least recently used first
        store._to_device(key, protected=set(), prefetch=False)
    store._prefetch(0, [[2], [0, 4]], needed={(0, 3)})  # layer 1 is guessed to use expert 2, layer 2 0 and 4
    resident = set(store.dev_table.slot_of)
    assert {(0, 3), (1, 0), (1, 1)} <= resident
    assert (1, 2) in resident and (2, 5) not in resident  # the guess for the next layer took the stale slot
    assert store.stats_.prefetch_issued == 1
    rt.close()
