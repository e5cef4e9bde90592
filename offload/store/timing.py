"""Timing helpers below both the store (which measures CPU expert against copy costs at start-up) and
the profiler: a robust median of synchronized runs, and the bandwidth of a copy."""

from __future__ import annotations

import itertools
import statistics
import time

import torch


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


def copy_bandwidth(src: torch.Tensor, dst: torch.Tensor, min_s: float = 0.02) -> float:
    """Bytes/s of `dst.copy_(src)`, from `median_time` of synchronized copies; a `src` of several times
    dst's size gives its dst-sized pieces in turn (a source colder than the cache)."""
    pieces = src.reshape(-1, dst.numel())
    turn = itertools.count()
    sync = (lambda: torch.cuda.synchronize(dst.device)) if dst.device.type == "cuda" else (lambda: None)
    copy = lambda: dst.copy_(pieces[next(turn) % len(pieces)], non_blocking=True)  # noqa: E731
    return dst.numel() * dst.element_size() / median_time(copy, sync, min_s)
