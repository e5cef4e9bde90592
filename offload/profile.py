"""Profiling one generation: where each token's time goes, what moved, and what memory it held.

The expert store calls the `Profiler` at five points (the `if prof` lines in offload/store.py):
  * an expert computed on the device, with the stall before it (waiting on its slot's copy event),
  * a host->device copy (on the copy stream),
  * a disk read (on the reader thread),
  * the compute thread blocking until an expert is in host RAM,
  * an expert computed on the CPU.
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

`profile()` loads a model, runs it and writes DIR/profile.json (schema: offload/profile_schema.json),
DIR/trace.json (offload/trace.py) and the PNG plots (offload/plots.py).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil
import torch

from quant import pinned
from quant.files import work_folder

from .errors import UserError
from .generate import Sampling
from .memory import human

SCHEMA_PATH = Path(__file__).resolve().parent / "profile_schema.json"
SCHEMA_ID = "moe-offload-profile/2"  # 2: copy_s, copy_hidden_s and the decode_copy totals
DEFAULT_PROMPT = "The for statement"
TIME_PARTS = ("dense_s", "expert_s", "copy_wait_s", "disk_wait_s", "cpu_expert_s")
PART_LABELS = {"dense_s": "dense", "expert_s": "experts", "copy_wait_s": "copy wait", "disk_wait_s": "disk wait",
               "cpu_expert_s": "CPU experts"}
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
        from .store import ExpertStore

        if not isinstance(runtime.store, ExpertStore):
            raise UserError("profile runs Mixtral expert models; this folder holds lookup tables (MoLE)")
        self.rt, self.store = runtime, runtime.store
        self.cuda, self.device = self.store.cuda, self.store.device
        self.pending: list[tuple] = []          # this token's timing points, resolved at its end
        self.disk_points: list[tuple] = []      # appended by the reader thread (list.append is atomic)
        self.disk_seen = 0
        self.spans: list[Span] = []
        self.tokens: list[dict] = []
        self.memory: list[dict] = []
        self.layer_extra: dict[int, dict[str, int]] = {}
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
            self.store.copy_stream.synchronize()
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
    tensors = {id(t): t for t in (*m.dense_tensors(), m.cache.k, m.cache.v, m.cos, m.sin, rt.store.dev)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


COLD_BYTES = 128 << 20  # more than a CPU's last-level cache: CPU probes copy from this much, in turn


def measure_h2d(store, min_s: float = 0.02) -> float:
    """Bytes/s of one expert blob copied host -> device slot, the copy the store makes on a miss.

    From a scratch blob (pinned on CUDA, as the host tier is; written first, so its pages are real) into
    a free device slot when there is one (nothing reads it), else into a scratch blob on the device. On a
    CPU the "device" is RAM too, and one blob copied again and again would be served from the cache
    (~100 GB/s, where a miss reads cold RAM): there the copies take their turn from enough distinct blobs to
    exceed the cache."""
    n = store.layout.nbytes
    sources = 1 if store.cuda else max(1, min(COLD_BYTES // n, 4096))
    src = pinned.empty((sources, n), pin=store.cuda).fill_(1)
    dst = store.dev[store.dev_table.free[-1]] if store.dev_table.free else torch.empty(n, dtype=torch.uint8,
                                                                                       device=store.device)
    rate = copy_bandwidth(src, dst, min_s)
    del dst, src
    if store.cuda:
        torch.cuda.empty_cache()  # hand a scratch blob back, so it does not count as reserved
    return rate


def copy_bandwidth(src: torch.Tensor, dst: torch.Tensor, min_s: float = 0.02) -> float:
    """Bytes/s of `dst.copy_(src)`, from `median_time` of synchronized copies; a `src` of several times
    dst's size gives its dst-sized pieces in turn (a source colder than the cache)."""
    pieces = src.reshape(-1, dst.numel())
    turn = itertools.count()
    sync = (lambda: torch.cuda.synchronize(dst.device)) if dst.device.type == "cuda" else (lambda: None)
    copy = lambda: dst.copy_(pieces[next(turn) % len(pieces)], non_blocking=True)  # noqa: E731
    return dst.numel() * dst.element_size() / median_time(copy, sync, min_s)


def median_time(fn, sync, min_s: float = 0.0, repeats: int = 5) -> float:
    """Seconds of one `fn()` followed by `sync()`: the median (robust to a busy, shared CPU) of at least
    `repeats` runs after a warm-up, more until `min_s` has passed (at most 200)."""
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"


# ---- one profiled generation ---------------------------------------------------------------------------

@dataclass
class Profile:
    """What a profiled run produced: the profile.json record and the trace spans."""

    record: dict
    spans: list[Span]
    files: list[Path] = field(default_factory=list)


def profile_runtime(rt, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                    prompt: str = "", bandwidth: float | None = None) -> Profile:
    """Generate with the profiler attached; tokens are the same as `rt.generate_ids` would give.

    `bandwidth` (bytes/s) is the host->device bandwidth of the transfer bound; default: measured here."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    prof = Profiler(rt)
    probe = bandwidth or measure_h2d(rt.store)
    rt.store.reset_stats()  # counters from zero now (generate_ids resets them too, after begin() has read them)
    rt.store.profiler = prof
    try:
        prof.begin()
        for token in rt.generate_ids(prompt_ids, max_new_tokens, sampling):
            prof.end_token(token)
        if len(prof.tokens) < max_new_tokens:
            prof.end_token(None)  # it stopped at end-of-sequence: that step's forward pass is a row too
        prof.finish()
    finally:
        rt.store.profiler = None
    return Profile(build_record(rt, prof, prompt, prompt_ids, probe), prof.spans)


def build_record(rt, prof: Profiler, prompt: str, prompt_ids: list[int], probe: float) -> dict:
    """The profile.json record (offload/profile_schema.json) of a finished profiled run.

    The transfer bound divides the bytes each token moved by the better of two bandwidths: the probe's
    (a blob copied before the run) and what the run's own copies achieved. Either can be low on a busy
    machine; the better one keeps the bound a bound."""
    store, plan = rt.store, rt.store.plan
    achieved = prof.copy_bytes / prof.copy_s if prof.copy_s > 0 else None
    bandwidth = max(probe, achieved or 0.0)
    counts = store.stats_.as_dict()
    rows = prof.tokens
    for r in rows:
        r["transfer_bound_s"] = r["bytes_h2d"] / bandwidth
    # Decode speed counts the tokens the run produced, as Runtime.stats() does: a last step that only
    # sampled end-of-sequence is a row (its work is in the counts) but not a token.
    decode = [r for r in rows[1:] if r["token"] is not None]
    decode_s = sum(r["latency_s"] for r in decode)
    bound_s = sum(r["transfer_bound_s"] for r in decode)
    uses = counts["expert_hits"] + counts["expert_misses"]
    layers = []
    for layer in range(rt.config.num_hidden_layers):
        base = store.stats_.per_layer.get(layer, {"hits": 0, "misses": 0, "prefetch_hits": 0, "bytes_h2d": 0})
        extra = prof.layer_extra.get(layer, {"prefetch_issued": 0, "bytes_disk": 0})
        n = base["hits"] + base["misses"]
        layers.append({"layer": layer, **base, **extra,
                       "hit_rate": base["hits"] / n if n else None,
                       "prefetch_accuracy": (base["prefetch_hits"] / extra["prefetch_issued"]
                                             if extra["prefetch_issued"] else None)})
    time_s = {p: sum(r[p] for r in decode) for p in TIME_PARTS}
    copy_s, hidden_s = sum(r["copy_s"] for r in decode), sum(r["copy_hidden_s"] for r in decode)
    totals = {
        "prompt_tokens": len(prompt_ids), "new_tokens": sum(r["token"] is not None for r in rows),
        "decode_tokens": len(decode),
        "time_to_first_token_s": rows[0]["latency_s"] if rows else 0.0,
        "decode_s": decode_s,
        "tokens_per_s": len(decode) / decode_s if decode_s > 0 else None,
        "decode_time_s": time_s,
        "expert_hits": counts["expert_hits"], "expert_misses": counts["expert_misses"],
        "hit_rate": counts["expert_hits"] / uses if uses else None,
        "prefetch_issued": counts["prefetch_issued"], "prefetch_hits": counts["prefetch_hits"],
        "prefetch_accuracy": counts["prefetch_hits"] / counts["prefetch_issued"] if counts["prefetch_issued"] else None,
        "cpu_expert_calls": counts["cpu_expert_calls"],
        "bytes_h2d": counts["bytes_h2d"], "bytes_disk": counts["bytes_disk"],
        "h2d_bandwidth_bytes_per_s": bandwidth,
        "h2d_probe_bytes_per_s": probe, "h2d_achieved_bytes_per_s": achieved,
        "transfer_bound_s_per_token": bound_s / len(decode) if decode else 0.0,
        "time_per_token_vs_transfer_bound": decode_s / bound_s if bound_s > 0 else None,
        "decode_copy_s": copy_s, "decode_copy_hidden_s": hidden_s,
        "decode_copy_hidden_fraction": hidden_s / copy_s if copy_s > 0 else None,
        "peak_vram_allocated_bytes": max(m["vram_allocated_bytes"] for m in prof.memory),
        "peak_vram_reserved_bytes": max(m["vram_reserved_bytes"] for m in prof.memory),
        "vram_accounting": "torch.cuda allocator peaks" if prof.cuda else
                           "runtime device-tier tensors (allocated) and the memory plan (reserved)",
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "host_tier_bytes": store.host.numel(),
        "pinned_bytes": store.host.numel() if store.host.is_pinned() else 0,
    }
    record = {
        "schema": SCHEMA_ID,
        "model": str(rt.ckpt.path), "prompt": prompt, "tokens": [r["token"] for r in rows if r["token"] is not None],
        "device": {"type": store.device.type, "name": device_name(store.device),
                   "dtype": str(store.dtype).removeprefix("torch."), "torch": torch.__version__},
        "settings": {"vram_budget": plan.vram_budget, "ram_budget": plan.ram_budget, "prefetch": store.prefetch,
                     "cpu_experts": store.stats()["cpu_experts"], "context": rt.model.max_seq,
                     "device_slots": plan.device_slots, "host_slots": plan.host_slots, "blob_bytes": plan.blob_bytes,
                     "cpu_expert_costs": store.measured},
        "plan": plan.as_dict(),
        "totals": totals,
        "per_token": rows,
        "per_layer": layers,
        "memory": prof.memory,
    }
    record["verdict"] = verdict(record)
    return record


# ---- reading a record ------------------------------------------------------------------------------------

BOUNDS = {"transfer": ("copy_wait_s",), "compute": ("dense_s", "expert_s"), "CPU experts": ("cpu_expert_s",),
          "disk": ("disk_wait_s",)}


def verdict(record: dict) -> dict:
    """What bounds this run: the largest of transfer, compute, CPU experts and disk in decode time."""
    t = record["totals"]
    parts, of, wall = t["decode_time_s"], "decode time", t["decode_s"]
    if not t["decode_tokens"]:  # one token: only prefill ran
        parts, of = {p: record["per_token"][0][p] for p in TIME_PARTS}, "prefill time"
        wall = record["per_token"][0]["latency_s"]
    total = sum(parts.values()) or 1.0
    if total > 1.02 * wall:  # on a GPU, host-side waits can overlap device time: shares of the parts' sum
        of += f" (its measured parts, which overlap: {total / wall:.2f}x the wall time)"
    shares = {name: sum(parts[p] for p in keys) / total for name, keys in BOUNDS.items()}
    bound = max(shares, key=shares.get)
    where = "GPU" if record["device"]["type"] == "cuda" else "CPU slot pool"
    detail = ", ".join(f"{name} {share:.0%}" for name, share in sorted(shares.items(), key=lambda kv: -kv[1]))
    text = f"{bound}-bound ({where}): {detail} of {of}"
    if t["time_per_token_vs_transfer_bound"]:
        text += (f"; {t['decode_s'] / t['decode_tokens'] * 1e3:.2f} ms/token is "
                 f"{t['time_per_token_vs_transfer_bound']:.1f}x the transfer bound "
                 f"({t['transfer_bound_s_per_token'] * 1e3:.3f} ms at {t['h2d_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
        if record["device"]["type"] == "cuda" and t["decode_copy_hidden_fraction"] is not None:
            text += f", with {t['decode_copy_hidden_fraction']:.0%} of the copying hidden under compute"
    elif t["decode_tokens"]:
        why = "misses ran on the CPU" if t["cpu_expert_calls"] else "every expert hit its device slot"
        text += f"; nothing was copied host->device while decoding ({why})"
    return {"bound": bound, "shares": shares, "text": text}


def summary_rows(record: dict) -> list[tuple[str, str]]:
    """(label, value) pairs for the terminal summary."""
    t, s = record["totals"], record["settings"]

    def ms(x):
        return f"{x * 1e3:.2f} ms"

    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    per_tok = t["decode_s"] / t["decode_tokens"] if t["decode_tokens"] else 0.0
    rows = [
        ("device", f"{record['device']['name']} ({record['device']['dtype']})"),
        ("budgets", f"--vram {human(s['vram_budget'])}, --ram {human(s['ram_budget'])}, prefetch {s['prefetch']}"),
        ("expert slots", f"{s['device_slots']} on device, {s['host_slots']} in host RAM, blob {human(s['blob_bytes'])}"),
        ("tokens", f"{t['prompt_tokens']} prompt + {t['new_tokens']} new"),
        ("time to first token", ms(t["time_to_first_token_s"])),
        ("decode", f"{t['tokens_per_s']:.2f} tok/s, {ms(per_tok)}/token" if t["tokens_per_s"] else "-"),
        ("hit rate", f"{pct(t['hit_rate'])} ({t['expert_hits']} hits, {t['expert_misses']} misses)"),
        ("prefetch accuracy", f"{pct(t['prefetch_accuracy'])} ({t['prefetch_hits']} of {t['prefetch_issued']} used)"),
        ("CPU expert calls", str(t["cpu_expert_calls"])),
        ("moved", f"{human(t['bytes_h2d'])} host->device, {human(t['bytes_disk'])} from disk"),
        ("transfer bound", f"{ms(t['transfer_bound_s_per_token'])}/token at "
                           f"{t['h2d_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s"),
        ("copies under compute", "-" if t["decode_copy_hidden_fraction"] is None else
         f"{t['decode_copy_hidden_fraction']:.0%} of {ms(t['decode_copy_s'])} of copying while decoding"
         + ("" if record["device"]["type"] == "cuda" else " (on CPU the compute thread copies)")),
    ]
    if t["decode_tokens"]:
        parts = t["decode_time_s"]
        total = sum(parts.values()) or 1.0
        rows.append(("decode time", ", ".join(f"{PART_LABELS[p]} {parts[p] / total:.0%}" for p in TIME_PARTS)))
    rows += [
        ("peak VRAM", f"{human(t['peak_vram_allocated_bytes'])} allocated, {human(t['peak_vram_reserved_bytes'])} "
                      f"reserved" + ("" if record["device"]["type"] == "cuda" else " (CPU: the runtime's accounting)")),
        ("peak RSS", human(t["peak_rss_bytes"])),
        ("pinned host memory", human(t["pinned_bytes"])),
    ]
    return rows


# ---- the schema check ---------------------------------------------------------------------------------------

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_errors(value, schema: dict, where: str = "$") -> list[str]:
    """Check `value` against the JSON Schema subset profile_schema.json uses (type, required, properties,
    additionalProperties, items, enum, minimum, maximum); a list of what is wrong, empty when it fits."""
    types = schema.get("type")
    if types is not None:
        ok = False
        for name in [types] if isinstance(types, str) else types:
            if name == "integer":
                ok |= isinstance(value, int) and not isinstance(value, bool)
            elif name == "number":
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok |= isinstance(value, _TYPES[name])
        if not ok:
            return [f"{where}: expected {types}, got {type(value).__name__}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{where}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(v, schema["additionalProperties"], f"{where}.{k}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected {k!r}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], f"{where}[{i}]")
    return errors


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


# ---- the command -------------------------------------------------------------------------------------------

ARTIFACTS = ("profile.json", "trace.json", "latency.png", "layers.png", "breakdown.png", "memory.png")


def write(result: Profile, out: Path) -> list[Path]:
    """Write profile.json (checked against the schema first), trace.json and the plots into `out`.

    They are written into a hidden folder inside `out` and moved into place only once all are done: a run
    stopped while writing (Ctrl-C, a full disk) leaves `out` as it was, never half of one profile beside
    half of another. In a folder whose profile.json is an earlier profile, its files are replaced; in any
    other, a file of one of those names stops the run (`check_replaceable`)."""
    from .plots import write_plots
    from .trace import write_trace

    errors = schema_errors(result.record, load_schema())
    if errors:  # a bug, not a user error: the record and its schema disagree
        raise ValueError("profile record does not match profile_schema.json: " + "; ".join(errors[:5]))
    make_out_dir(out)
    check_replaceable(out)
    try:
        tmp = work_folder(out / "profile")  # out/.profile.tmp-PID: on out's filesystem, so each move is a rename
        try:
            path = tmp / "profile.json"
            path.write_text(json.dumps(result.record, indent=1))
            written = [path, write_trace(result.spans, result.record, tmp / "trace.json"),
                       *write_plots(result.record, tmp)]
            # profile.json last: it is what marks the folder's files as a profile's (`check_replaceable`).
            for f in sorted(written, key=lambda f: f.name == "profile.json"):
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write the profile ({exc.strerror or exc})") from None
    result.files = [out / f.name for f in written]
    return result.files


def check_replaceable(out: Path) -> None:
    """Refuse to overwrite a file in `out` that has an artifact's name but is not from a profile: a profile
    folder is one whose profile.json is a moe-offload profile (or that holds none of the names)."""
    present = [name for name in ARTIFACTS if (out / name).exists()]
    if not present:
        return
    try:
        ours = json.loads((out / "profile.json").read_text()).get("schema", "").startswith("moe-offload-profile")
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"--out {out}: holds {present[0]}, which is not from a moe-offload profile; choose another "
                        f"--out (a profile replaces only its own files)")


def make_out_dir(out: Path) -> None:
    """Create the output folder, or say in one line why it cannot be one."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None


def profile(model: str | None, prompt: str = DEFAULT_PROMPT, out: str | Path = "profile", max_new_tokens: int = 32,
            sampling: Sampling = Sampling(), chat: bool = False, device: str = "auto", dtype: str = "auto",
            context: int = 2048, **store_options) -> Profile:
    """Load MODEL, generate from PROMPT with timing on, and write the artifacts into OUT."""
    from .runtime import load

    if max_new_tokens < 1:  # before loading, which can read every expert
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not str(out).strip():  # Path("") is the current folder: the files would land there unasked
        raise UserError("--out is empty; name the folder for the profile (e.g. --out prof)")
    out = Path(out)
    made = not out.exists()
    make_out_dir(out)  # before the run: a bad --out must not cost a generation
    check_replaceable(out)
    try:
        rt = load(model, device=device, dtype=dtype, context=context, **store_options)
        try:
            result = profile_runtime(rt, rt.encode(prompt, chat), max_new_tokens, sampling, prompt=prompt)
        finally:
            rt.close()
        write(result, out)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed leaves no empty folder it made behind
        raise
    return result
