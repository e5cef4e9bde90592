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
    store.copy_stream = copy
    store.ready = [SimEvent() for _ in store.dev_views]
    store.free = [SimEvent() for _ in store.dev_views]
    store._h2d = lambda slot, host: current[-1].enqueue(lambda: store.dev[slot].copy_(store.host[host]))


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


def test_close_waits_for_prefetch_copies_nobody_waited_for(tmp_path, monkeypatch):
    """A wrong router-ahead guess is copied but never waited on: at the end of a generation such copies may
    still be queued, writing into the slot pool. close() must let them finish before the pool can be freed."""
    from conftest import make_checkpoint

    make_checkpoint(tmp_path)  # 2 layers of 4 experts, where these budgets leave the last guesses unused
    rt = offload.load(tmp_path, device="cpu", context=256, prefetch=1, cpu_experts="never",
                      **budgets(tmp_path, 6, 8))
    simulate_cuda(rt.store, monkeypatch)
    decode(rt, steps=4)
    copy = rt.store.copy_stream
    assert any(not isinstance(op, Marker) for op in copy.queue)  # guesses still being copied
    rt.store.close()
    assert copy.queue == []


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
