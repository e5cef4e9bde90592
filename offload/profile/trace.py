"""A profiled run as a Chrome / Perfetto trace (trace.json, the "traceEvents" format).

Open it at https://ui.perfetto.dev or chrome://tracing. One process, one track per place work happens:

    host thread     each token, and the waits of the compute thread for an expert to reach host RAM
    compute stream  expert kernels and the stalls before them (CUDA: from events on the compute stream)
    copy stream     host->device copies and prefetches (CUDA: from events on the copy stream, so copies
                    that overlap compute show as bars beside it; on CPU the copies are synchronous)
    disk reader     preads of experts from the safetensors shards into host slots (the reader thread)
    CPU experts     misses computed on the CPU instead of copied
"""

from __future__ import annotations

import json
from pathlib import Path

TRACKS = {"host": 1, "compute": 2, "copy": 3, "disk": 4, "cpu_experts": 5}
NAMES = {"cuda": {"host": "host thread", "compute": "compute stream (GPU)", "copy": "copy stream (GPU)",
                  "disk": "disk reader thread", "cpu_experts": "CPU experts"},
         "cpu": {"host": "host thread", "compute": "compute (host thread)",
                 "copy": "copies to the slot pool (host thread, synchronous)", "disk": "disk reader thread",
                 "cpu_experts": "CPU experts"}}


def trace_events(spans, record: dict) -> list[dict]:
    """Complete ("X") events in microseconds, plus the metadata that names the process and tracks."""
    pid = 1
    where = record["device"]["name"]
    events = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": f"moe-offload profile: {where}"}}]
    for track, tid in TRACKS.items():
        name = NAMES[record["device"]["type"]][track]
        events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}})
        events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
    for span in spans:
        events.append({"ph": "X", "pid": pid, "tid": TRACKS[span.track], "name": span.name,
                       "cat": span.track, "ts": round(span.t0 * 1e6, 3),
                       "dur": round(max(0.0, span.t1 - span.t0) * 1e6, 3), "args": span.args})
    return events


def write_trace(spans, record: dict, path: Path) -> Path:
    path.write_text(json.dumps({"traceEvents": trace_events(spans, record), "displayTimeUnit": "ms",
                                "otherData": {"model": record["model"], "verdict": record["verdict"]["text"]}}))
    return path
