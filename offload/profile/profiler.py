"""Profiling one generation: where each token's time goes, what moved, and what memory it held.

The expert store calls the `Profiler` at six points (the `if prof` lines in offload/store/store.py):
  * an expert computed on the device, with the stall before it (waiting on its slot's copy event),
  * a host->device copy (on the copy stream),
  * a disk read (on the reader thread),
  * the compute thread blocking until an expert is in host RAM,
  * an expert computed on the CPU,
  * a layer step's routing (which experts it asked for: the trace the cache is measured on).
On CUDA the device-side points are timing events recorded on the compute and copy streams, never a sync:
the compute stream's become times once per token, when it is done with the token (sampling has waited for
that already); the copy stream's only after the run (`finish`). A copy may still be queued when its token
ends (a router-ahead guess nobody waited for) and run under the next token's compute, as it would without
profiling: waiting for it at the token's end would be a sync only profiling adds. On CPU the points are
`perf_counter()` times. With no profiler attached (`store.profiler is None`) each point costs one `if`.

A token's latency is the wall time between two yielded tokens (token 0: prefill, time to first token); the
profiler's own bookkeeping between tokens is left out. It splits into:
  copy_wait_s   the compute stream stalled on a copy (CUDA); on CPU, the synchronous copies themselves
  expert_s      experts computed on the device
  cpu_expert_s  experts computed on the CPU (--cpu-experts)
  disk_wait_s   the compute thread blocked until an expert was read from disk into host RAM
  dense_s       the rest: attention, norms, routers, lm_head, sampling, Python (latency minus the others)
On CUDA the first two are GPU time and the next two CPU time; they can overlap, so dense_s is clamped at 0.

Whether copies hide under compute, per token: copy_s is the time the copy stream was busy with the copies
the token issued (their union), copy_hidden_s the part of it inside the compute stream's span of any token
(a late guess may hide under the next one) while neither the compute stream was stalled on a copy nor the
host thread was blocked (on host RAM or a disk read, when the compute stream soon runs dry). Time the
compute stream spent waiting for the host to launch kernels still counts as hidden: events cannot tell it
from work. On CPU the copies run on the compute thread itself, so
none is hidden.

The record built from these points is offload/profile/record.py; the command that runs a profile and
writes its files, offload/profile/run.py.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import psutil
import torch

from quant.errors import UserError

from ..store import ExpertStore
from ..store.optimum import step

TIME_PARTS = ("dense_s", "expert_s", "copy_wait_s", "disk_wait_s", "cpu_expert_s")
TRACE_MIN_S = 20e-6  # host waits shorter than this (a lookup under the lock) are summed but not drawn


class Span(NamedTuple):
    """One bar of the trace: `track` is compute | copy | disk | cpu_experts | host; times in s from the start."""

    track: str
    name: str
    t0: float
    t1: float
    args: dict


class Profiler:
    """Collects the store's timing points for one generation, token by token."""

    def __init__(self, runtime) -> None:
        if not isinstance(runtime.store, ExpertStore):
            raise UserError("profile runs models with routed experts; this folder holds lookup tables (MoLE)")
        self.rt, self.store = runtime, runtime.store
        self.cuda, self.device = self.store.cuda, self.store.device
        self.pending: list[tuple] = []          # this token's timing points, resolved at its end
        self.disk_points: list[tuple] = []      # appended by the reader thread (list.append is atomic)
        self.disk_seen = 0
        self.spans: list[Span] = []
        self.tokens: list[dict] = []
        self.memory: list[dict] = []
        self.layer_extra: dict[int, dict[str, int]] = {}
        self.routing: list[list] = []           # [decode 0/1, layer, expert ids] per layer step, in order
        self.copies: list[tuple] = []           # (row, copy point) of the run: read after it, in `finish`
        self.stalls: list[tuple[float, float]] = []   # compute stalled on a copy, host blocked: the run's
        self.compute_spans: list[tuple[float, float]] = []  # each token's span on the compute stream
        self.copy_s = 0.0                       # summed duration and bytes of every copy: achieved bandwidth
        self.copy_bytes = 0

    # ---- the store's timing points ----------------------------------------------------------------

    def mark(self, stream=None):
        """A point in time: a timing event on `stream` (default: the current stream) on CUDA, else a float."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return event

    def expert(self, key, kind: str, waited, started, ended) -> None:
        self.pending.append(("expert", key, kind, waited, started, ended))

    def copy(self, key, prefetch: bool, started, ended, nbytes: int) -> None:
        self.pending.append(("copy", key, prefetch, started, ended, nbytes))
        if prefetch:
            self._layer(key[0])["prefetch_issued"] += 1

    def disk(self, key, t0: float, t1: float, nbytes: int) -> None:
        self.disk_points.append((key, t0, t1, nbytes))

    def route(self, layer: int, experts: list[int], decode: bool, tokens: list[int] | None = None) -> None:
        """A layer step's routing (the store's `prepare`): profile.json's trace, replayed against the optimum."""
        self.routing.append(step(decode, layer, experts, tokens))

    def host_wait(self, key, t0: float, t1: float) -> None:
        self.pending.append(("host_wait", key, t0, t1))

    def cpu_expert(self, key, t0: float, t1: float) -> None:
        self.pending.append(("cpu_expert", key, t0, t1))

    # ---- token boundaries ---------------------------------------------------------------------------

    def begin(self) -> None:
        """Start the clock; on CUDA, anchor GPU event times to the wall clock (the GPU is idle here)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)  # peaks of this run, not of loading
            self.anchor = torch.cuda.Event(enable_timing=True)
            self.anchor.record(torch.cuda.current_stream(self.device))
            self.anchor.synchronize()
        self.t_start = time.perf_counter()
        self.last_counts = self.store.stats_.as_dict()
        self.memory.append({"t_s": 0.0, **self._memory_now()})
        self._start_token()

    def _start_token(self) -> None:
        self.pending = []
        self.token_begin = self.mark()
        self.t_token = time.perf_counter()

    def end_token(self, token: int | None) -> None:
        """Close the current token: wait for the device, turn its timing points into times and spans.
        `token` None: the step sampled end-of-sequence (a forward pass whose token is not part of the text)."""
        token_end = self.mark()
        if self.cuda:
            token_end.synchronize()  # the compute stream only (already done: sampling read the logits)
        t_end = time.perf_counter()
        i = len(self.tokens)
        row = {"index": i, "token": token, "phase": "prefill" if i == 0 else "decode",
               "latency_s": t_end - self.t_token, **{p: 0.0 for p in TIME_PARTS if p != "dense_s"}}
        T = self._t
        self.spans.append(Span("host", f"token {i} ({row['phase']})", self.t_token - self.t_start,
                               t_end - self.t_start, {"token": token}))
        self.spans.append(Span("compute", f"token {i}", T(self.token_begin), T(token_end), {}))
        self.compute_spans.append((T(self.token_begin), T(token_end)))
        row["copy_s"] = row["copy_hidden_s"] = 0.0  # filled in by `finish`
        for point in self.pending:
            kind, key = point[0], point[1]
            name = f"L{key[0]}.E{key[1]}"
            if kind == "expert":
                _, _, how, waited, started, ended = point
                if self.cuda:
                    stall = T(started) - T(waited)
                    row["copy_wait_s"] += stall
                    if stall > 0:
                        self.spans.append(Span("compute", f"wait copy {name}", T(waited), T(started), {}))
                        self.stalls.append((T(waited), T(started)))
                row["expert_s"] += T(ended) - T(started)
                self.spans.append(Span("compute", f"expert {name} ({how})", T(started), T(ended), {"kind": how}))
            elif kind == "copy":
                self.copies.append((i, point))
                if not self.cuda:  # synchronous on CPU: the compute thread waits for all of it
                    _, _, _, started, ended, _ = point
                    row["copy_wait_s"] += T(ended) - T(started)
                    self.stalls.append((T(started), T(ended)))
            elif kind == "host_wait":
                _, _, t0, t1 = point
                row["disk_wait_s"] += t1 - t0
                self.stalls.append((T(t0), T(t1)))
                if t1 - t0 >= TRACE_MIN_S:
                    self.spans.append(Span("host", f"wait for RAM {name}", T(t0), T(t1), {}))
            else:
                _, _, t0, t1 = point
                row["cpu_expert_s"] += t1 - t0
                self.spans.append(Span("cpu_experts", f"cpu expert {name}", T(t0), T(t1), {}))
        n = len(self.disk_points)
        for key, t0, t1, nbytes in self.disk_points[self.disk_seen:n]:
            self._layer(key[0])["bytes_disk"] += nbytes
            self.spans.append(Span("disk", f"read L{key[0]}.E{key[1]}", T(t0), T(t1), {"bytes": nbytes}))
        self.disk_seen = n
        row["dense_s"] = max(0.0, row["latency_s"] - sum(row[p] for p in TIME_PARTS if p != "dense_s"))
        counts = self.store.stats_.as_dict()
        for f in ("expert_hits", "expert_misses", "prefetch_hits", "cpu_expert_calls", "bytes_h2d", "bytes_disk"):
            row[f] = counts[f] - self.last_counts[f]
        self.last_counts = counts
        row["t_end_s"] = t_end - self.t_start
        mem = self._memory_now(per_token_peak=True)
        self.memory.append({"t_s": row["t_end_s"], **mem})
        row.update({"vram_allocated_bytes": mem["vram_allocated_bytes"], "rss_bytes": mem["rss_bytes"]})
        self.tokens.append(row)
        self._start_token()

    def finish(self) -> None:
        """After the run: wait for the copy stream, then turn every copy into a span and into its token's
        copy_s and copy_hidden_s."""
        if self.cuda:
            for stream in self.store.copy_streams():
                stream.synchronize()
        T = self._t
        by_row: dict[int, list[tuple[float, float]]] = {}
        for i, (_, key, prefetch, started, ended, nbytes) in self.copies:
            t0, t1 = T(started), T(ended)
            by_row.setdefault(i, []).append((t0, t1))
            self.copy_s += t1 - t0
            self.copy_bytes += nbytes
            self.spans.append(Span("copy", f"{'prefetch' if prefetch else 'copy'} L{key[0]}.E{key[1]}", t0, t1,
                                   {"bytes": nbytes, "prefetch": prefetch}))
        exposed = exposed_time(self.stalls, self.compute_spans)
        for i, copies in by_row.items():
            row = self.tokens[i]
            row["copy_s"], row["copy_hidden_s"] = copy_time_hidden(copies, exposed)

    def _t(self, m) -> float:
        """Seconds since `begin()` of a mark: a wall-clock float, or a CUDA event (once it has happened)."""
        if isinstance(m, float):
            return m - self.t_start
        return self.anchor.elapsed_time(m) / 1e3

    def _layer(self, layer: int) -> dict[str, int]:
        return self.layer_extra.setdefault(layer, {"prefetch_issued": 0, "bytes_disk": 0})

    # ---- memory -------------------------------------------------------------------------------------

    def _memory_now(self, per_token_peak: bool = False) -> dict:
        """Device bytes (CUDA: the allocator's peak since the last sample; CPU: the runtime's device-tier
        tensors, and what the plan reserves) and the process's resident memory."""
        if self.cuda:
            alloc = int(torch.cuda.max_memory_allocated(self.device))
            reserved = int(torch.cuda.max_memory_reserved(self.device))
            if per_token_peak:
                self.store.reset_device_peak()
        else:
            alloc = device_tier_bytes(self.rt)
            plan = self.store.plan
            reserved = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + plan.expert_pool_bytes
        return {"vram_allocated_bytes": alloc, "vram_reserved_bytes": reserved,
                "rss_bytes": int(psutil.Process().memory_info().rss)}


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of (t0, t1) intervals as sorted, disjoint intervals."""
    out: list[tuple[float, float]] = []
    for t0, t1 in sorted(intervals):
        if out and t0 <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], t1))
        else:
            out.append((t0, t1))
    return out


def total_length(intervals: list[tuple[float, float]]) -> float:
    return sum(t1 - t0 for t0, t1 in intervals)


def overlap_length(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two `merged` interval lists."""
    i = j = 0
    length = 0.0
    while i < len(a) and j < len(b):
        length += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return length


def exposed_time(stalls, compute) -> list[tuple[float, float]]:
    """When a copy does not hide under compute: outside every interval of `compute` (the compute stream's
    spans of the tokens), or inside one of `stalls`. Sorted, disjoint intervals."""
    edges = [-float("inf"), *(t for span in merged(compute) for t in span), float("inf")]
    idle = list(zip(edges[::2], edges[1::2]))  # before, between and after the compute spans
    return merged([*stalls, *idle])


def copy_time_hidden(copies, exposed) -> tuple[float, float]:
    """(busy, hidden): the length of the union of `copies`, and of its part outside `exposed_time`."""
    busy = merged(copies)
    length = total_length(busy)
    return length, max(0.0, length - overlap_length(busy, exposed))


def device_tier_bytes(rt) -> int:
    """What the runtime holds on its compute device: dense weights, KV cache, rotary tables, expert slots."""
    m = rt.model
    tensors = {id(t): t for t in (*m.dense_tensors(), *m.cache.tensors(), m.cos, m.sin, rt.store.dev)}
    return sum(t.numel() * t.element_size() for t in tensors.values())
