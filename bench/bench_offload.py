"""Decode under a sweep of VRAM budgets and prefetch depths; report hit rates, bytes moved and speed.

What it measures, and against what (every figure is a ratio against a baseline measured in this run):
  * the trained demo model: for each (device slots, prefetch) setting, hit rate, prefetch accuracy,
    bytes host->device per token, tokens/s, and tokens/s relative to the all-experts-resident run;
    global LRU vs per-layer LRU misses at equal slot counts (the choice documented in offload/store/cache.py);
  * cache policies against the optimum: on the demo model, the fine-grained model (runs/qwen3-demo, when
    scripts/train_finegrained.py has made it) and the Mixtral-shaped slice, the routing trace of greedy
    decoding replayed through each policy of offload/store/cache.py at a sweep of slot counts, next to
    Belady's optimum on the same trace (bench/bench_cache.py's method): policy / optimum per budget;
  * a Mixtral-shaped layer slice (real Mixtral dimensions D=4096, F=14336, 8 experts, top-2, V=32000,
    random bf16 weights, a few layers): the same sweep, and on a GPU the measured pinned host->device
    bandwidth and the ratio of time per token to the transfer bound (bytes that had to move / bandwidth).

How: each setting loads a runtime, warms it with the request it will be timed on (the caches then hold what
a server repeating it would hold; the all-resident baseline is warmed until a whole generation copies
nothing, so it is resident in fact, not just in budget), then times one generation, with device syncs
around it. Every setting, the baseline included, is measured --repeats times, interleaved (round r measures
every setting once, each round in a rotated order), so a slow spell of a shared machine falls on all of
them. Speed is tokens/s of the median decode step of a run, then the median over the repeats (a burst of
other work on a shared machine stalls a few steps, not the median one); steps are timed by
`common.step_clock`: on a CPU with one torch thread (--threads 1) the process's CPU time, which other
processes sharing the core do not inflate, else the wall clock. Each run's whole-generation wall-clock
tokens/s is recorded too, with its own ratio. Ratios are against the all-resident baseline's speed of the
same kind. The counters (hits, bytes) are deterministic without CPU experts; the record says if they varied.

    python bench/bench_offload.py --threads 1      # demo model + a 1-layer slice on CPU
    python bench/bench_offload.py --slice-layers 4 # on a GPU: more layers
    python bench/bench_offload.py --no-slice       # demo model only
    python bench/bench_offload.py --policies-only  # the policy / optimum sweep only (offload-policies-<device>.json)

Writes bench/results/offload-<device>.json. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import offload
from common import PROMPT, RESULTS, device_name, load_average, save_record, step_clock, sync
from offload.models import open_checkpoint
from offload.inspect import memory_plan
from offload.store.memory import human
from offload.store.timing import copy_bandwidth
from offload.runtime import resolve_model_path
from offload.store import Stats
from quant import pinned


def h2d_bandwidth(nbytes: int = 256 << 20) -> float:
    """Pinned host -> device copy bandwidth in bytes/s, from memory pinned as the host tier pins it."""
    src = pinned.empty(nbytes, pin=True).fill_(1)
    return copy_bandwidth(src, torch.empty(nbytes, dtype=torch.uint8, device="cuda"))


def vram_for(folder, device: str, slots: int, context: int, dtype: str = "auto") -> int:
    """A --vram with room for exactly `slots` experts (the store's own plan, made without loading weights)."""
    plan = memory_plan(folder, device=device, context=context, dtype=dtype, vram=10**15)["plan"]
    return plan["dense_bytes"] + plan["kv_bytes"] + plan["margin_bytes"] + slots * plan["blob_bytes"]


def config_of(folder):
    return open_checkpoint(resolve_model_path(folder)).config


WARM_UP_MIN = 2    # warm-up generations of every setting: the baseline needs 2 to stop copying on the demo model,
                   # and giving every setting the same number keeps the baseline from being the only one warmed twice
WARM_UP_LIMIT = 8  # generations the all-resident baseline may take to stop copying


def decode(folder, device: str, tokens: int, context: int, until_no_copies: bool = False,
           warm_tokens: int | None = None, min_warm_ups: int = WARM_UP_MIN, **options) -> dict:
    """Load, warm up with the request to be timed (`warm_tokens` of it if given), `min_warm_ups` times or, when
    `until_no_copies`, until a whole generation copies nothing, then time one generation of `tokens` tokens.

    Counters are of the decode steps only, as tokens/s is: prefill uses nearly every expert of every layer,
    and would inflate the bytes per token and deflate the hit rate. Missed experts are copied, never
    computed on the CPU (unless `cpu_experts` says otherwise): the sweep measures the copy path."""
    options.setdefault("cpu_experts", "never")
    rt = offload.load(folder, device=device, context=context, **options)
    ids = rt.encode(PROMPT)
    for warm_ups in range(1, WARM_UP_LIMIT + 1):
        list(rt.generate_ids(ids, max_new_tokens=warm_tokens or tokens))
        if warm_ups >= min_warm_ups and (not until_no_copies or rt.stats()["bytes_h2d"] == 0):
            break
    sync(device)
    after_prefill, stamps, clock = {}, [], step_clock(device)[1]
    for i, _ in enumerate(rt.generate_ids(ids, max_new_tokens=tokens)):
        stamps.append(clock())  # each token is an int on the host: its step has finished
        if i == 0:
            after_prefill = rt.store.stats_.as_dict()
    sync(device)
    s = rt.stats()
    steps = [b - a for a, b in zip(stamps, stamps[1:])]  # decode steps only: the first token came from prefill
    rt.close()
    d = {k: s[k] - after_prefill.get(k, 0) for k in Stats.FIELDS}
    uses = d["expert_hits"] + d["expert_misses"]
    decoded = max(1, s["new_tokens"] - 1)
    return {
        "device_slots": s["device_slots"], "host_slots": s["host_slots"], "prefetch": s["prefetch"],
        "warm_up_generations": warm_ups, "bytes_h2d_whole_generation": s["bytes_h2d"],
        "hit_rate": round(d["expert_hits"] / max(1, uses), 4),
        "prefetch_issued": d["prefetch_issued"], "prefetch_hits": d["prefetch_hits"],
        "prefetch_accuracy": round(d["prefetch_hits"] / d["prefetch_issued"], 4) if d["prefetch_issued"] else None,
        "bytes_h2d_per_token": d["bytes_h2d"] // decoded, "bytes_disk_per_token": d["bytes_disk"] // decoded,
        "decode_steps": decoded, "tokens_per_s": s["tokens_per_s"],
        "step_median_tokens_per_s": round(1 / statistics.median(steps), 3) if steps else None,
        "prefill_s": s["prefill_s"],
        "cpu_expert_calls": d["cpu_expert_calls"], "peak_vram_bytes": s["peak_vram_bytes"],
        "blob_bytes": s["blob_bytes"],
    }


def repeated(runs: list[dict]) -> dict:
    """One setting's repeats as one row: the first run's counters; speed as the median over runs of each run's
    median decode step (a burst of other work on the machine stalls a few steps of a run, not its median),
    and each run's whole-generation tokens/s (its median, best and every run)."""
    speeds = [r["tokens_per_s"] for r in runs]
    timed = ("tokens_per_s", "step_median_tokens_per_s", "prefill_s", "peak_vram_bytes")
    counters = [{k: v for k, v in r.items() if k not in timed} for r in runs]
    steps = [r["step_median_tokens_per_s"] for r in runs]
    return {**counters[0], "counters_varied": any(c != counters[0] for c in counters[1:]),
            "step_median_tokens_per_s": statistics.median(steps), "runs_step_median_tokens_per_s": steps,
            "tokens_per_s": statistics.median(speeds), "best_tokens_per_s": max(speeds), "runs_tokens_per_s": speeds,
            "prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "peak_vram_bytes": max((r["peak_vram_bytes"] or 0) for r in runs) or None}


def sweep(folder, device: str, slot_counts: list[int], prefetches: list[int], tokens: int, context: int,
          bandwidth: float | None, label: str, repeats: int, dtype: str = "auto", into: dict | None = None,
          save=lambda: None) -> dict:
    """The all-resident baseline and every (slots, prefetch) setting, each measured `repeats` times in
    interleaved rounds; rows filled into `into` (returned), with `save()` after each round."""
    total = slot_counts[-1]
    settings = [("baseline", total, 0)] + [("row", slots, p) for slots in slot_counts for p in prefetches]
    runs: dict[int, list[dict]] = {i: [] for i in range(len(settings))}
    result = into if into is not None else {}
    for r in range(repeats):
        order = list(range(len(settings)))
        order = order[r % len(order):] + order[:r % len(order)]  # rotated: no setting always runs first
        for i in order:
            kind, slots, p = settings[i]
            runs[i].append(decode(folder, device, tokens, context, until_no_copies=kind == "baseline",
                                  vram=vram_for(folder, device, slots, context, dtype), prefetch=p, dtype=dtype))
        base = repeated(runs[0])
        rows = []
        for i, (_, slots, p) in enumerate(settings[1:], start=1):
            row = repeated(runs[i])
            row["speed_vs_all_resident"] = round(row["step_median_tokens_per_s"] / base["step_median_tokens_per_s"], 4)
            row["whole_run_speed_vs_all_resident"] = round(row["tokens_per_s"] / base["tokens_per_s"], 4)
            if bandwidth:
                bound_s = row["bytes_h2d_per_token"] / bandwidth
                row["transfer_bound_s_per_token"] = bound_s
                row["time_per_token_vs_transfer_bound"] = (round((1 / row["step_median_tokens_per_s"]) / bound_s, 3)
                                                           if bound_s > 0 else None)
            rows.append(row)
        result.update(repeats_done=r + 1, baseline_all_resident=base, sweep=rows)
        save()
        print(f"{label:>8} round {r + 1}/{repeats} done", flush=True)
    print(f"{label:>8} all-resident: hit {base['hit_rate']:.3f} after {base['warm_up_generations']} warm-up "
          f"generation(s), {base['step_median_tokens_per_s']:8.2f} tok/s (median step)")
    for row in result["sweep"]:
        print(f"{label:>8} slots {row['device_slots']:>4}/{total} prefetch {row['prefetch']}: hit {row['hit_rate']:.3f}  "
              f"h2d/token {human(row['bytes_h2d_per_token']):>11}  {row['step_median_tokens_per_s']:8.2f} tok/s  "
              f"({row['speed_vs_all_resident']}x of all-resident; whole runs {row['whole_run_speed_vs_all_resident']}x)",
              flush=True)
    return result


def policy_comparison(folder, device: str, slot_counts: list[int], tokens: int, context: int) -> list[dict]:
    """Global LRU vs per-layer LRU misses at equal slot counts (prefetch off, so only the policy differs), after
    one 4-token warm-up, as offload/store/cache.py quotes them."""
    cfg = config_of(folder)
    rows = []
    for slots in slot_counts:
        if slots < cfg.num_hidden_layers * cfg.num_experts_per_tok:
            continue
        row = {"device_slots": slots}
        for name, per_layer in (("global_lru", False), ("per_layer_lru", True)):
            r = decode(folder, device, tokens, context, warm_tokens=4, min_warm_ups=1, vram=vram_for(folder, device, slots, context),
                       prefetch=0, per_layer_cache=per_layer)
            row[name + "_hit_rate"] = r["hit_rate"]
        rows.append(row)
        print(f"  policy slots {slots}: global {row['global_lru_hit_rate']:.3f} vs per-layer {row['per_layer_lru_hit_rate']:.3f}")
    return rows


def policy_sweep(models: dict, texts: list[str], tokens: dict) -> list[dict]:
    """Each model's routing trace (greedy, prefetch off, float32 on the CPU: the trace does not depend on the
    device) replayed through every cache policy next to Belady's optimum, at an eighth to three quarters of
    its experts; the context policy also from the folder's routing prior where it has one (`context_prior`:
    the runtime's default there)."""
    from bench_cache import policy_rows, record_trace

    from offload.store.prior import find

    out = []
    for name, (folder, dtype) in models.items():
        print(f"policies on {name}: tracing {len(texts)} x {tokens[name]} greedy tokens", flush=True)
        trace = record_trace(folder, texts, tokens[name], dtype)
        cfg = config_of(folder)
        prior = find(folder, "auto", cfg)
        out.append({"model": name, "dtype": dtype, "tokens": tokens[name], "experts": cfg.experts_total, "experts_per_token": cfg.num_experts_per_tok,
                    "decode_expert_uses": sum(len(s[2]) for s in trace if s[0]),
                    "rows": policy_rows(trace, cfg.experts_total, cfg.num_experts_per_tok, len(cfg.moe_layers),
                                        prior=prior)})
    return out


def write_mixtral_slice(folder: Path, layers: int) -> None:
    """Real Mixtral-8x7B dimensions, random bf16 weights, `layers` layers, Hub names; the demo tokenizer."""
    import shutil

    from safetensors.torch import save_file

    from offload.demo import DEMO_DIR

    D, F, E, V, H, K = 4096, 14336, 8, 32000, 32, 8
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": D,
              "intermediate_size": F, "num_hidden_layers": layers, "num_attention_heads": H,
              "num_key_value_heads": K, "num_local_experts": E, "num_experts_per_tok": 2, "vocab_size": V,
              "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 32768, "sliding_window": None,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / name, folder / name)
    # Drawn on the GPU when there is one: tens of GB of normal samples take minutes on a CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(0)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(torch.bfloat16).cpu()

    weight_map = {}
    dense = {"model.embed_tokens.weight": rnd(V, D), "model.norm.weight": torch.ones(D, dtype=torch.bfloat16),
             "lm_head.weight": rnd(V, D)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shard = {f"{p}.input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
                 f"{p}.post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
                 f"{p}.self_attn.q_proj.weight": rnd(H * 128, D), f"{p}.self_attn.k_proj.weight": rnd(K * 128, D),
                 f"{p}.self_attn.v_proj.weight": rnd(K * 128, D), f"{p}.self_attn.o_proj.weight": rnd(D, H * 128),
                 f"{p}.block_sparse_moe.gate.weight": rnd(E, D, scale=0.5)}
        for e in range(E):
            q = f"{p}.block_sparse_moe.experts.{e}"
            shard.update({f"{q}.w1.weight": rnd(F, D), f"{q}.w2.weight": rnd(D, F), f"{q}.w3.weight": rnd(F, D)})
        name = f"model-{i + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        del shard
    save_file(dense, folder / "model-dense.safetensors", metadata={"format": "pt"})
    weight_map.update({k: "model-dense.safetensors" for k in dense})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=128,
                    help="tokens generated per demo setting (the decode steps after the first are timed)")
    ap.add_argument("--repeats", type=int, default=5, help="measured runs of every setting, interleaved")
    ap.add_argument("--policy-tokens", type=int, default=32,
                    help="tokens of the global vs per-layer LRU comparison (offload/store/cache.py quotes it at 32)")
    ap.add_argument("--slice-layers", type=int, default=None, help="layers of the Mixtral-shaped slice (default: 1 on CPU, 4 on GPU)")
    ap.add_argument("--slice-tokens", type=int, default=None,
                    help="tokens per slice setting (default: 16 on CPU, 32 on GPU)")
    ap.add_argument("--slice-repeats", type=int, default=3,
                    help="measured runs of every slice setting (each reloads the slice: fewer than the demo's)")
    ap.add_argument("--no-slice", action="store_true", help="skip the Mixtral-shaped slice")
    ap.add_argument("--policies-only", action="store_true",
                    help="only the cache policy / optimum sweep (demo, fine-grained, slice), into offload-policies-<device>.json")
    ap.add_argument("--policy-prompts", type=int, default=5, help="held-out prompts traced for the policy sweep")
    ap.add_argument("--policy-trace-tokens", type=int, default=120, help="greedy tokens per traced prompt")
    ap.add_argument("--policy-slice-layers", type=int, default=2, help="layers of the slice the policy sweep traces")
    ap.add_argument("--policy-slice-tokens", type=int, default=48, help="greedy tokens per prompt on the slice")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device.startswith("cuda")
    bandwidth = h2d_bandwidth() if gpu else None
    record = {"benchmark": "offload", "device": device_name(device), "torch": torch.__version__,
              "h2d_bandwidth_bytes_per_s": bandwidth, "prompt": PROMPT, "repeats": args.repeats,
              "slice_repeats": args.slice_repeats,
              "tokens": args.tokens, "policy_tokens": args.policy_tokens,
              "step_clock": step_clock(device)[0], "load_average_at_start": load_average()}
    if bandwidth:
        print(f"pinned host->device bandwidth: {bandwidth / 1e9:.1f} GB/s")

    out = args.out or RESULTS / f"offload-{'policies-' if args.policies_only else ''}{'gpu' if gpu else 'cpu'}.json"

    def save():  # after each measured row: a run stopped part-way (gpu_session.sh's deadline) keeps those
        save_record(record, out)

    if args.policies_only:
        policies(record, args, save)
        print(f"wrote {out}")
        return

    cfg = config_of("demo")
    total = cfg.num_hidden_layers * cfg.num_local_experts
    slots = sorted({2, total // 8, total // 4, total // 2, 3 * total // 4, total})
    record["demo"] = {}
    sweep("demo", device, slots, [0, 1, 2], args.tokens, 256, bandwidth, "demo", args.repeats, into=record["demo"],
          save=save)
    record["demo"]["policy"] = policy_comparison("demo", device, slots, args.policy_tokens, 256)
    save()

    if not args.no_slice:
        layers = args.slice_layers or (4 if gpu else 1)
        tokens = args.slice_tokens or (32 if gpu else 16)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "mixtral-slice"
            print(f"writing a {layers}-layer Mixtral-shaped slice (random bf16 weights) ...", flush=True)
            write_mixtral_slice(folder, layers)
            total = layers * 8
            slice_slots = sorted({2, 4, total // 2, total})
            # bfloat16 everywhere (as on a GPU); float32 on CPU would double every pool for no insight.
            record["mixtral_slice"] = {"layers": layers, "dtype": "bfloat16", "tokens": tokens}
            sweep(folder, device, slice_slots, [0, 1], tokens, 64, bandwidth, "slice", args.slice_repeats, dtype="bfloat16",
                  into=record["mixtral_slice"], save=save)
    policies(record, args, save)
    record["load_average_at_end"] = load_average()
    save()
    print(f"wrote {out}")


def policies(record: dict, args, save) -> None:
    """The policy / optimum sweep on the demo model, the fine-grained model if present, and a Mixtral-shaped
    slice of 2 layers (random weights: routing with little to learn from, the hard case for any policy)."""
    from bench_cache import FINEGRAINED, prompts

    texts = prompts(args.policy_prompts)
    models = {"demo": (resolve_model_path("demo"), "float32")}
    if (FINEGRAINED / "model.safetensors").is_file():
        models["qwen3-demo"] = (FINEGRAINED, "float32")
    tokens = {name: args.policy_trace_tokens for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_slice:
            folder = Path(tmp) / "mixtral-slice"
            print(f"writing a {args.policy_slice_layers}-layer Mixtral-shaped slice (random bf16 weights) ...", flush=True)
            write_mixtral_slice(folder, args.policy_slice_layers)
            name = f"mixtral-slice ({args.policy_slice_layers} layers, random weights)"
            models[name] = (folder, "bfloat16")  # bfloat16: float32 would double tens of GB for the same routing
            tokens[name] = args.policy_slice_tokens
        record["policies"] = {"prompts": texts, "models": policy_sweep(models, texts, tokens)}
    save()


if __name__ == "__main__":
    main()
