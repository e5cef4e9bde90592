"""The profile.json record of a profiled run (schema: offload/profile/schema.json), its verdict (what
bounds the run) and the terminal summary, plus the host->device bandwidth probe the transfer bound uses."""

from __future__ import annotations

import platform
import resource

import torch

from quant import cpu_kernels, pinned

from ..store.cache import POLICIES
from ..store.memory import human
from ..store.optimum import optimum, rate, replay
from ..store.prior import describe
from ..store.timing import copy_bandwidth
from .profiler import TIME_PARTS, Profiler
from .schema import SCHEMA_ID

PART_LABELS = {"dense_s": "dense", "expert_s": "experts", "copy_wait_s": "copy wait", "disk_wait_s": "disk wait",
               "cpu_expert_s": "CPU experts"}


COLD_BYTES = 128 << 20  # more than a CPU's last-level cache: CPU probes copy from this much, in turn


def measure_h2d(store, min_s: float = 0.02) -> float:
    """Bytes/s of one expert blob copied host -> device slot, the copy the store makes on a miss.

    From a scratch blob (pinned on CUDA, as the host tier is; written first, so its pages are real) into
    a device slot (`ExpertStore.scratch_slot`: a free one, else the least recently used expert's; a scratch
    blob of its own on the device would be memory outside the budget). On a
    CPU the "device" is RAM too, and one blob copied again and again would be served from the cache
    (~100 GB/s, where a miss reads cold RAM): there the copies take their turn from enough distinct blobs to
    exceed the cache."""
    n = store.layout.nbytes
    sources = 1 if store.cuda else max(1, min(COLD_BYTES // n, 4096))
    src = pinned.empty((sources, n), pin=store.cuda).fill_(1)
    return copy_bandwidth(src, store.scratch_slot(), min_s)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}), {torch.get_num_threads()} threads"


def build_record(rt, prof: Profiler, prompt: str, prompt_ids: list[int], probe: float) -> dict:
    """The profile.json record (offload/profile/schema.json) of a finished profiled run.

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
        "prefetch_wasted": counts["prefetch_wasted"], "prefetch_skipped": counts["prefetch_skipped"],
        "bytes_prefetch_wasted": counts["bytes_prefetch_wasted"],
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
                     "cache_policy": store.policy, "threads": torch.get_num_threads(),
                     "routing_prior": describe(store.routing_prior),
                     "cpu_kernels": cpu_kernels.path(),  # how quantized experts run on the CPU here
                     "device_slots": plan.device_slots, "host_slots": plan.host_slots, "blob_bytes": plan.blob_bytes,
                     "cpu_expert_costs": store.measured},
        "plan": plan.as_dict(),
        "totals": totals,
        "per_token": rows,
        "per_layer": layers,
        "memory": prof.memory,
    }
    record["routing"] = routing_record(prof.routing, plan.device_slots, store.policy, store.routing_prior)
    record["verdict"] = verdict(record)
    return record


def routing_record(trace: list[list], slots: int, policy: str, prior=None) -> dict:
    """The run's routing trace and, at its device-slot count, the demand hit rate (decode steps, prefetch
    off, from empty slots) each cache policy gets replaying it (the context policy from the run's routing
    `prior`) next to Belady's optimum on the same trace."""
    counts = optimum(trace, slots)
    best = rate(counts)
    replayed = {name: rate(replay(trace, slots, name, prior)) for name in POLICIES}
    return {"trace": trace, "device_slots": slots, "policy": policy, "decode_expert_uses": counts["uses"],
            "optimum_hit_rate": best, "policy_hit_rate": replayed[policy],
            "policy_vs_optimum": replayed[policy] / best if best else None, "replayed_hit_rates": replayed}


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


def cache_row(routing: dict) -> str:
    """The cache policy's demand hit rate on this run's routing next to Belady's optimum, at its slot count."""
    if routing["optimum_hit_rate"] is None:
        return "-"
    return (f"{routing['policy']} {routing['policy_hit_rate']:.1%} vs optimum {routing['optimum_hit_rate']:.1%} "
            f"at {routing['device_slots']} slots (demand hits of the decode steps replayed, prefetch off)")


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
        ("prefetch accuracy", (f"{pct(t['prefetch_accuracy'])} ({t['prefetch_hits']} of {t['prefetch_issued']} used, "
                               f"{t['prefetch_wasted']} evicted unused, {t['prefetch_skipped']} not worth copying)")),
        ("cache vs optimum", cache_row(record["routing"])),
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
