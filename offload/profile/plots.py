"""The PNG plots of a profile record (matplotlib, Agg backend: no display needed).

    latency.png    per-token decode latency against the transfer bound of the bytes that token moved
    layers.png     per-layer expert hit rate and prefetch accuracy
    breakdown.png  per-token time, stacked: dense part, expert compute, copy wait, disk wait, CPU experts
    memory.png     device memory (allocated, reserved, the --vram budget) and process RSS over the run
"""

from __future__ import annotations

from pathlib import Path

PARTS = (("dense_s", "dense (attention, norms, lm_head, ...)", "#4c72b0"),
         ("expert_s", "expert compute", "#55a868"),
         ("copy_wait_s", "waiting on copies", "#c44e52"),
         ("disk_wait_s", "waiting on disk", "#8172b2"),
         ("cpu_expert_s", "experts on CPU", "#ccb974"))


def write_plots(record: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where = f"{record['device']['name']}, {record['device']['dtype']}"
    s = record["settings"]
    setting = f"{s['device_slots']} device slots, prefetch {s['prefetch']}"
    rows = record["per_token"]
    decode = rows[1:] or rows
    first = decode[0]["index"]
    idx = [r["index"] for r in decode]
    files = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    # Latency against the transfer bound.
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(idx, [r["latency_s"] * 1e3 for r in decode], marker="o", ms=3, lw=1.2, label="measured latency")
    ax.plot(idx, [r["transfer_bound_s"] * 1e3 for r in decode], ls="--", color="#c44e52",
            label=f"transfer bound (bytes moved / {record['totals']['h2d_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
    ax.set_xlabel("token index" + (" (token 0 = prefill, not shown)" if first else ""))
    ax.set_ylabel("time per token (ms)")
    ttft = record["totals"]["time_to_first_token_s"] * 1e3
    ax.set_title(f"Per-token latency ({setting}; time to first token {ttft:.1f} ms)\n{where}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "latency.png")

    # Per-layer hit rate and prefetch accuracy.
    layers = record["per_layer"]
    x = [r["layer"] for r in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(x) + 3), 4.2))
    w = 0.4
    ax.bar([i - w / 2 for i in x], [r["hit_rate"] or 0 for r in layers], w, label="hit rate (device slot)")
    ax.bar([i + w / 2 for i in x], [r["prefetch_accuracy"] or 0 for r in layers], w,
           label="prefetch accuracy (prefetched copies used)")
    for r in layers:  # say so where there is nothing to measure, rather than drawing a zero
        if r["hit_rate"] is None:
            ax.text(r["layer"] - w / 2, 0.02, "no uses", rotation=90, ha="center", va="bottom", fontsize=7)
        if r["prefetch_accuracy"] is None:
            ax.text(r["layer"] + w / 2, 0.02, "none prefetched", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.3)  # the legend sits above the bars, which reach 1 at most
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xticks(x)
    ax.set_title(f"Expert cache per layer, prefill + decode ({setting})\n{where}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    save(fig, "layers.png")

    # Stacked time breakdown per token.
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bottom = [0.0] * len(decode)
    for key, label, color in PARTS:
        values = [r[key] * 1e3 for r in decode]
        ax.bar(idx, values, 0.8, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("token index")
    ax.set_ylabel("time (ms)")
    ax.set_title(f"Where each decode token's time goes ({setting})\n{where}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    ax.set_ylim(0, max(bottom + [1e-3]) * 1.35)  # room for the legend above the bars
    save(fig, "breakdown.png")

    # Memory over time.
    mem = record["memory"]
    t = [m["t_s"] for m in mem]
    mib = 1 / 2**20
    fig, (top, bot) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True)
    cuda = record["device"]["type"] == "cuda"
    # Each sample after the first is the peak of the token it ends: drawn over that token ("pre").
    top.step(t, [m["vram_allocated_bytes"] * mib for m in mem], where="pre",
             label="allocated (allocator peak per token)" if cuda else "allocated (runtime's device-tier tensors)")
    top.step(t, [m["vram_reserved_bytes"] * mib for m in mem], where="pre",
             label="reserved (allocator peak per token)" if cuda else "reserved (memory plan incl. workspace)")
    top.axhline(s["vram_budget"] * mib, ls="--", color="#c44e52", label="--vram budget")
    top.set_ylabel("device memory (MiB)")
    top.set_ylim(0, s["vram_budget"] * mib * 1.15)
    top.set_title(f"Memory over the run\n{where}", fontsize=10)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="lower right")
    bot.plot(t, [m["rss_bytes"] * mib for m in mem], marker="o", ms=3, color="#55a868", label="process RSS")
    bot.set_xlabel("time since start of prefill (s)")
    bot.set_ylabel("host RSS (MiB)")
    bot.set_ylim(bottom=0)
    bot.grid(alpha=0.3)
    bot.legend(fontsize=8, loc="lower right")
    save(fig, "memory.png")
    return files
