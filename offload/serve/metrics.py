"""What GET /metrics reports, in the Prometheus text exposition format (version 0.0.4): totals since the
server started, summed from each generation's runtime statistics, and the queue as it is now."""

from __future__ import annotations

import threading
from collections import Counter

import psutil

# metric name -> (the runtime's per-generation statistic summed into it, help text)
SUMMED = {
    "prompt_tokens": ("prompt_tokens", "Prompt tokens of the generations run."),
    "prompt_tokens_reused": ("prompt_tokens_reused", "Prompt tokens taken from the KV cache instead of "
                                                     "prefilled (prefix reuse)."),
    "completion_tokens": ("new_tokens", "Tokens generated."),
    "expert_hits": ("expert_hits", "Expert uses served from the device tier."),
    "expert_misses": ("expert_misses", "Expert uses that missed the device tier."),
    "prefetch_hits": ("prefetch_hits", "Misses that a router-ahead prefetch had already copied."),
    "cpu_expert_calls": ("cpu_expert_calls", "Missed experts computed on the CPU instead of copied."),
    "bytes_h2d": ("bytes_h2d", "Bytes copied host to device."),
    "bytes_disk": ("bytes_disk", "Bytes read from disk."),
}


class Metrics:
    """Counters written by the engine's worker thread and read by the /metrics route, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # by outcome: stop, length, cancelled, rejected, error
        self.totals: Counter[str] = Counter()
        self.tokens_per_s = 0.0  # of the latest generation

    def count(self, outcome: str, stats: dict | None = None) -> None:
        """One request ended with `outcome`; `stats`: its generation's runtime statistics, if one ran."""
        with self.lock:
            self.requests[outcome] += 1
            if stats:
                for name, (key, _) in SUMMED.items():
                    self.totals[name] += stats.get(key) or 0
                self.tokens_per_s = stats.get("tokens_per_s") or self.tokens_per_s

    def render(self, queued: int, generating: bool) -> str:
        with self.lock:
            requests, totals, tps = dict(self.requests), dict(self.totals), self.tokens_per_s
        hits, misses = totals.get("expert_hits", 0), totals.get("expert_misses", 0)
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP moe_offload_{name} {help_}", f"# TYPE moe_offload_{name} {kind}"])
            # Integers written whole: a byte count in %g would lose its last digits.
            lines.extend(f"moe_offload_{name}{labels} {value if isinstance(value, int) else float(value)!r}"
                         for labels, value in samples)

        metric("requests_total", "counter", "Generation requests by outcome (finish reason, cancelled, "
               "rejected: the queue was full, error).",
               [(f'{{outcome="{k}"}}', v) for k, v in sorted(requests.items())] or [('{outcome="stop"}', 0)])
        for name, (_, help_) in SUMMED.items():
            metric(f"{name}_total", "counter", help_, [("", totals.get(name, 0))])
        metric("expert_hit_rate", "gauge", "Expert hits / (hits + misses) since start.",
               [("", hits / (hits + misses) if hits + misses else 0.0)])
        metric("tokens_per_second", "gauge", "Decode speed of the latest generation.", [("", tps)])
        metric("queue_length", "gauge", "Requests waiting for the model.", [("", queued)])
        metric("generating", "gauge", "1 while a generation runs.", [("", int(generating))])
        metric("resident_memory_bytes", "gauge", "The server process's resident memory.",
               [("", psutil.Process().memory_info().rss)])
        return "\n".join(lines) + "\n"
