"""Side by side on one checkpoint and one VRAM budget: moe-offload against Hugging Face accelerate offloading.

Decodes the same prompt, greedily, the same number of tokens, with
  (a) moe-offload at its best settings under --vram: the fastest of a small sweep (prefetch 0/1/2 x CPU
      experts never/always on CPU, never/auto on a GPU), measured again after the sweep;
  (b) transformers + accelerate: `AutoModelForCausalLM.from_pretrained(device_map="auto",
      max_memory={0: VRAM, "cpu": RAM})`, the same VRAM and RAM budgets as (a). Accelerate places whole
      decoder layers (attention and all of their experts); the layers that do not fit the GPU budget stay
      in CPU RAM and its hooks copy their weights to the GPU on every forward. Without a GPU there is no
      like-for-like run of it: `max_memory={"cpu": VRAM}` plus an offload folder makes the CPU play the GPU,
      and the layers beyond that budget are memory-mapped from disk and reloaded on every forward, while
      (a) keeps every expert in RAM; it is recorded, labelled as what it is, not as the headline;
  (c) moe-offload with every expert resident (the upper bound; prefetch off);
  (b') transformers without offloading (the whole model on the device), when it fits.
and reports decode tokens/s of each (--repeats measured runs after one warm-up run: the median over them of
each run's median decode step, which a burst of other load on a shared machine barely moves; each run's
whole-generation tokens/s and the best of them are kept too; the first token, from prefill, is not
counted; steps are timed by common.step_clock: with --threads 1 on a CPU the process's CPU time, which other
processes sharing the core do not inflate, else the wall clock), the ratios, and (a)'s time per token
against its transfer bound
(the bytes it moved per decode token over the host->device bandwidth, from offload.profile). The headline
ratio compares like with like: on a GPU a/b (the same budgets); on a CPU a/b' (every weight of both in RAM:
what it measures is the runtime's own cost of serving experts through its slots and store against
transformers' forward). Every figure is a ratio against a baseline measured in the same run; absolute
times mean something only on a GPU, with the device named.

    python bench/compare.py --threads 1 --repeats 10 --tokens 48 # CPU: the demo model, 1/4 of experts fit
    python bench/compare.py --slice-layers 4 --vram 6GiB         # GPU: a Mixtral-shaped slice

Writes bench/results/compare-<device slug>.json (e.g. compare-cpu-x86-64-1-threads.json; --out FILE to choose).
`--table RECORD` prints a saved record as the README's Markdown table instead of running anything.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, bench_offload, when run as a program

import offload  # noqa: E402
from common import PROMPT, RESULTS, device_name, load_average, save_record, step_clock, sync  # noqa: E402
from offload.models import open_checkpoint  # noqa: E402
from offload.inspect import memory_plan  # noqa: E402
from offload.store.memory import default_ram_budget, human  # noqa: E402
from offload.profile import profile_runtime  # noqa: E402
from offload.runtime import resolve_model_path  # noqa: E402
from offload.tokenizer import Tokenizer  # noqa: E402
from quant.units import parse_bytes  # noqa: E402


def release(device: str) -> None:
    """Free the last contender's memory before the next one loads (the allocator caches freed blocks)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def step_median_speed(stamps: list[float]) -> float:
    """Tokens/s of the median decode step, from the times (common.step_clock) each token, the first one from
    prefill, was ready."""
    return 1 / statistics.median([b - a for a, b in zip(stamps, stamps[1:])])


def speed_fields(whole_runs: list[float], step_medians: list[float]) -> dict:
    """A contender's speed: `tokens_per_s`, the median over its runs of each run's median decode step (a
    burst of other work on a shared machine stalls a few steps of a run, not its median one), which every
    ratio uses; and each run's whole-generation decode tokens/s, with the best of them."""
    return {"tokens_per_s": statistics.median(step_medians), "runs_step_median_tokens_per_s": step_medians,
            "best_run_tokens_per_s": max(whole_runs), "runs_tokens_per_s": whole_runs}


# ---- (a) and (c): this runtime ---------------------------------------------------------------------------

def ours(folder, device: str, tokens: int, repeats: int, context: int, logits: dict | None = None,
         key: str = "", **options) -> dict:
    """Load, one warm-up generation (the cache warm, as in a running server), then `repeats` measured ones.
    With `logits`, the prompt's logits at every position (after the measured runs) land in logits[key]."""
    rt = offload.load(folder, device=device, context=context, **options)
    ids = rt.encode(PROMPT)
    list(rt.generate_ids(ids, 4))
    speeds, steps, out = [], [], []
    clock = step_clock(device)[1]
    for _ in range(repeats):
        sync(device)
        stamps, out = [], []
        for token in rt.generate_ids(ids, tokens):
            stamps.append(clock())  # the token is an int on the host: its step has finished
            out.append(token)
        sync(device)
        speeds.append(rt.last["tokens_per_s"])
        steps.append(step_median_speed(stamps))
    s = rt.stats()
    uses = s["expert_hits"] + s["expert_misses"]
    dtype = str(rt.model.dtype).removeprefix("torch.")
    if logits is not None:
        logits[key] = rt.model.forward(torch.tensor(ids, device=rt.model.device), 0, all_logits=True).cpu()
    rt.close()
    del rt
    release(device)
    # The counters cover the last measured generation, prefill included (its copies too).
    return {"options": {k: v for k, v in options.items() if k not in ("vram", "ram", "dtype")},
            "cpu_experts_decided": s["cpu_experts"], "cpu_expert_costs": s["cpu_expert_costs"], "dtype": dtype,
            **speed_fields(speeds, steps), "tokens": out, "device_slots": s["device_slots"],
            "hit_rate_with_prefill": round(s["expert_hits"] / uses, 4) if uses else None,
            "cpu_expert_calls": s["cpu_expert_calls"],
            "bytes_h2d_per_new_token_with_prefill": s["bytes_h2d"] // max(1, len(out)),
            # GPU: torch's allocator peak over the last measured generation (on CPU there is no allocator to ask)
            "peak_vram_bytes": s["peak_vram_bytes"] if device.startswith("cuda") else None}


def transfer_bound(folder, device: str, tokens: int, context: int, **options) -> dict:
    """(a)'s bytes per decode token and the host->device bandwidth, from one profiled run after a warm-up."""
    rt = offload.load(folder, device=device, context=context, **options)
    ids = rt.encode(PROMPT)
    list(rt.generate_ids(ids, 4))
    record = profile_runtime(rt, ids, tokens).record
    rt.close()
    del rt
    release(device)
    t = record["totals"]
    decode = [r for r in record["per_token"][1:] if r["token"] is not None]  # as the profile's own totals
    return {"transfer_bound_s_per_token": t["transfer_bound_s_per_token"],
            "h2d_bandwidth_bytes_per_s": t["h2d_bandwidth_bytes_per_s"],
            "bytes_h2d_per_decode_token": sum(r["bytes_h2d"] for r in decode) / max(1, len(decode)),
            "decode_copy_hidden_fraction": t["decode_copy_hidden_fraction"],
            "profiled_verdict": record["verdict"]["text"]}


# ---- (b): transformers + accelerate --------------------------------------------------------------------

def accelerate_offload(folder, device: str, vram: int | None, ram: int | None, tokens: int, repeats: int,
                       dtype, logits: dict | None = None, key: str = "") -> dict:
    """Hugging Face's own offloading under the same budget; decode tokens/s from per-token timestamps.
    vram=None: no budget, the whole model on the device (a reference for transformers' own speed).
    With `logits`, the prompt's logits at every position land in logits[key], as in `ours`."""
    # Whatever family the folder holds (Mixtral, Qwen-MoE, OLMoE): transformers' own class for it.
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    clock = step_clock(device)[1]

    class Stamps(BaseStreamer):
        """Called with the prompt, then once per new token: the wall time of each, and its time by step_clock."""

        def __init__(self):
            self.t, self.steps = [], []

        def put(self, value):
            sync(device)
            self.t.append(time.perf_counter())
            self.steps.append(clock())

        def end(self):
            pass

    ckpt = open_checkpoint(resolve_model_path(folder))
    tokenizer = Tokenizer(ckpt.path, ckpt.config.bos_token_id, ckpt.config.eos_token_id)  # the same ids as (a)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    gpu = device.startswith("cuda")
    home = (torch.device(device).index or 0) if gpu else "cpu"  # where the model computes
    with tempfile.TemporaryDirectory() as offload_dir:
        if vram is None:
            max_memory = None
            what = "transformers, the whole model on the device (no offloading)"
        elif gpu:
            ram = ram or default_ram_budget()
            max_memory = {home: vram, "cpu": ram}
            what = f"device_map='auto', max_memory={{{home}: {human(vram)}, 'cpu': {human(ram)}}}"
        else:
            max_memory = {"cpu": vram}
            what = (f"accelerate with disk offload, not like for like: device_map='auto', max_memory={{'cpu': "
                    f"{human(vram)}}}, the layers beyond it reloaded from an offload folder every forward, while "
                    f"(a) holds every expert in RAM")
        placed = dict(device_map="auto", max_memory=max_memory, offload_folder=offload_dir) if vram else \
            dict(device_map={"": home})
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype, **placed).eval()
        # Inputs go where the model computes, not to model.device: that is the first parameter's device, which
        # is 'meta' when accelerate offloaded the embedding to disk (generate then fails on meta tensors).
        ids = ids.to(home)
        kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids),
                      pad_token_id=min(tokenizer.eos_ids) if tokenizer.eos_ids else 0)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
            if gpu:  # accelerate's max_memory places weights; what decoding adds on top shows in this peak
                torch.cuda.reset_peak_memory_stats(home)
            speeds, steps, out = [], [], []
            for _ in range(repeats):
                stamps = Stamps()
                result = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, streamer=stamps, **kwargs)
                out = result[0, ids.shape[1]:].tolist()
                # stamps[0]: the prompt; [1]: the first token (prefill); decode speed counts the tokens after it.
                speeds.append((len(stamps.t) - 2) / (stamps.t[-1] - stamps.t[1]))
                steps.append(step_median_speed(stamps.steps[1:]))
            peak = int(torch.cuda.max_memory_allocated(home)) if gpu else None
            if logits is not None:
                logits[key] = model(ids, attention_mask=torch.ones_like(ids)).logits[0].float().cpu()
        placement = {}
        for name, where in getattr(model, "hf_device_map", {"": str(model.device)}).items():
            placement.setdefault(str(where), []).append(name)
        del model
        release(device)
    return {"what": what, **speed_fields(speeds, steps), "tokens": out,
            "placement": placement, "peak_vram_bytes": peak}


# ---- the comparison ----------------------------------------------------------------------------------------

def compare(folder, device: str, vram: int | None, ram: int | None, tokens: int, repeats: int, context: int,
            dtype: str, skip_hf: bool = False, record: dict | None = None, save=lambda: None) -> dict:
    """Run every contender; each result goes into `record` and `save()` is called after it, so a run cut
    short (a time limit on a lent GPU, a failing transformers) keeps what it measured."""
    record = {} if record is None else record
    ram = ram or default_ram_budget()  # one RAM budget, given to (a), (b) and (c) alike
    plan = memory_plan(folder, device=device, dtype=dtype, context=context, ram=ram, vram=vram or 10**15)["plan"]
    fixed = plan["dense_bytes"] + plan["kv_bytes"] + plan["margin_bytes"]
    if vram is None:  # default: a quarter of the experts fit
        vram = fixed + max(1, plan["experts_total"] // 4) * plan["blob_bytes"]
    all_in = fixed + plan["experts_total"] * plan["blob_bytes"]
    gpu = device.startswith("cuda")
    common = dict(vram=vram, ram=ram, dtype=dtype)
    sweep = []
    record.update({"vram_budget": vram, "ram_budget": plan["ram_budget"], "dtype": None,
                   "blob_bytes": plan["blob_bytes"], "experts_total": plan["experts_total"], "tokens": tokens,
                   "repeats": repeats})
    for prefetch in (0, 1, 2):
        for cpu in (("never", "auto") if gpu else ("never", "always")):
            row = ours(folder, device, tokens, repeats, context, prefetch=prefetch, cpu_experts=cpu, **common)
            sweep.append(row)
            record["dtype"] = row["dtype"]  # what --dtype auto resolved to
            record["a_sweep"] = [{k: r[k] for k in ("options", "cpu_experts_decided", "tokens_per_s",
                                                    "hit_rate_with_prefill")} for r in sweep]
            save()
            print(f"  (a) prefetch {prefetch} cpu-experts {cpu:6} ({row['cpu_experts_decided']}): "
                  f"{row['tokens_per_s']:8.2f} tok/s, hit rate {row['hit_rate_with_prefill']}, "
                  f"{row['device_slots']} slots", flush=True)
    # The sweep picks the settings; the best one is then measured afresh, so that picking the fastest of
    # six noisy measurements does not flatter (a) against (b) and (c), which are measured once each. `auto`
    # is decided from timings at each load: the re-measure and the bound run take what it decided.
    fastest = max(sweep, key=lambda r: r["tokens_per_s"])
    chosen = dict(fastest["options"], cpu_experts="always" if fastest["cpu_experts_decided"] in ("on", "always")
                  else "never")
    logits = {}  # the prompt's logits at every position, from each contender: do they compute the same model?
    best = ours(folder, device, tokens, repeats, context, logits, "a", **chosen, **common)
    print(f"  (a) best settings {chosen}, measured again: {best['tokens_per_s']:8.2f} tok/s", flush=True)
    bound = transfer_bound(folder, device, tokens, context, **best["options"], **common)
    per_token = 1 / best["tokens_per_s"] if best["tokens_per_s"] else None
    bound["time_per_token_s"] = per_token
    bound["time_per_token_vs_transfer_bound"] = (per_token / bound["transfer_bound_s_per_token"]
                                                 if per_token and bound["transfer_bound_s_per_token"] > 0 else None)
    record.update({"device_slots": best["device_slots"], "a_moe_offload_best": best, "a_transfer_bound": bound})
    save()
    free = torch.cuda.mem_get_info(device)[0] if gpu else None
    resident = None
    if free is None or all_in <= free:
        resident = ours(folder, device, tokens, repeats, context, logits, "c", prefetch=0, cpu_experts="never",
                        vram=all_in, ram=ram, dtype=dtype)
        print(f"  (c) every expert resident: {resident['tokens_per_s']:8.2f} tok/s", flush=True)
    record["c_all_resident"] = resident
    save()
    hf = hf_all = None
    if not skip_hf:
        hf_dtype = getattr(torch, best["dtype"])  # the dtype (a) ran in
        hf = hf_run(folder, device, vram, ram, tokens, repeats, hf_dtype, logits, "b")
        record["b_accelerate"] = hf
        save()
        if resident is not None and "error" not in hf:  # transformers' own speed: its overhead vs offloading's
            hf_all = hf_run(folder, device, None, ram, tokens, repeats, hf_dtype, logits, "b'")

    def ratio(x, y):
        return round(x / y, 3) if x and y else None

    def speed(r):
        return r and r.get("tokens_per_s")

    def same(x, y):  # (b) is held to exactly --tokens; (a) and (c) stop early at an end-of-sequence token
        return None if not (x and y and "tokens" in x and "tokens" in y) else x["tokens"] == y["tokens"][:len(x["tokens"])]

    record.update({
        "b_accelerate": hf, "b_reference_transformers_no_offload": hf_all,
        # Like for like: on a GPU (a) and (b) get the same budgets; on a CPU (b) reloads layers from disk while
        # (a) holds every expert in RAM, so the comparison that measures the runtime is against (b').
        "headline": "a_vs_b" if gpu else "a_vs_b_no_offload",
        "a_vs_b": ratio(best["tokens_per_s"], speed(hf)),
        "a_vs_b_no_offload": ratio(best["tokens_per_s"], speed(hf_all)),
        "c_vs_b_no_offload": ratio(speed(resident), speed(hf_all)),
        "a_vs_c": ratio(best["tokens_per_s"], speed(resident)),
        "same_tokens": {"a_c": same(best, resident), "a_b": same(best, hf)},
        # Greedy tokens alone prove little where the output repeats one token (random weights): the logits
        # over every prompt position compare the whole distributions.
        "prompt_logits": {pair: agreement(logits, *pair.split("_")) for pair in ("a_c", "a_b", "c_b'")},
    })
    save()
    return record


def agreement(logits: dict, x: str, y: str) -> dict | None:
    """How closely two contenders' prompt logits [T, V] agree: positions with the same top token, and the
    largest difference, also against the spread (standard deviation) of y's logits; None if one is missing."""
    if x not in logits or y not in logits:
        return None
    lx, ly = logits[x], logits[y]
    diff = float((lx - ly).abs().max())
    return {"positions": lx.shape[0], "top1_same": int((lx.argmax(-1) == ly.argmax(-1)).sum()),
            "max_abs_diff": diff, "max_abs_diff_vs_std": diff / spread if (spread := float(ly.std())) else None}


def hf_run(folder, device: str, vram: int | None, ram: int | None, tokens: int, repeats: int, dtype,
           logits: dict | None = None, key: str = "") -> dict:
    """`accelerate_offload`, printed; a failure (a transformers version that loads this folder differently,
    running out of memory) is recorded and reported instead of ending the comparison."""
    label = "(b) transformers + accelerate" if vram else "(b') transformers, no offloading"
    try:
        result = accelerate_offload(folder, device, vram, ram, tokens, repeats, dtype, logits, key)
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result to report, whatever its type
        release(device)
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(f"  {label}: failed ({message})", flush=True)
        return {"error": message}
    print(f"  {label}: {result['tokens_per_s']:8.2f} tok/s ({result['what']})", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="model folder (default: the demo model on CPU, a slice on GPU)")
    ap.add_argument("--slice-layers", type=int, default=4, help="GPU: layers of the Mixtral-shaped slice")
    ap.add_argument("--vram", default=None, help="device budget (default: dense part + a quarter of the experts)")
    ap.add_argument("--ram", default=None, help="host RAM budget (default: 80%% of available)")
    ap.add_argument("--tokens", type=at_least(2), default=None,
                    help="new tokens per run, at least 2 (default 32 on CPU, 16 on GPU)")
    ap.add_argument("--repeats", type=at_least(1), default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for every contender (default: torch's)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--no-hf", action="store_true", help="skip (b), transformers + accelerate")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", metavar="RECORD", default=None,
                    help="print a saved record as the README's Markdown table, and run nothing")
    args = ap.parse_args()
    if args.table:
        try:
            saved = json.loads(Path(args.table).read_text())
        except (OSError, ValueError) as exc:
            sys.exit(f"compare: error: cannot read {args.table}: {exc}")
        if not isinstance(saved, dict) or saved.get("benchmark") != "compare":
            sys.exit(f"compare: error: {args.table} is not a bench/compare.py record")
        print(markdown_table(saved, args.table))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    gpu = device.startswith("cuda")
    tokens = args.tokens or (16 if gpu else 32)
    name = device_name(device)
    record = {"benchmark": "compare", "device": name, "torch": torch.__version__, "prompt": PROMPT,
              "step_clock": step_clock(device)[0], "load_average_at_start": load_average()}
    vram, ram = parse_bytes(args.vram, "--vram"), parse_bytes(args.ram, "--ram")
    slug = re.sub(r"[^a-z0-9]+", "-", ("gpu " if gpu else "") + name.lower()).strip("-")
    out = args.out or RESULTS / f"compare-{slug}.json"

    def save():
        save_record(record, out)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder, label = args.model, args.model
        elif gpu:
            from bench_offload import write_mixtral_slice

            folder, label = Path(tmp) / "mixtral-slice", f"Mixtral-shaped slice, {args.slice_layers} layers, random bf16"
            print(f"writing a {args.slice_layers}-layer Mixtral-shaped slice ...", flush=True)
            write_mixtral_slice(folder, args.slice_layers)
        else:
            folder, label = "demo", "demo model (offload/demo_model)"
        print(f"{label} on {name}", flush=True)
        record["model"] = label
        compare(folder if folder == "demo" else Path(folder), device, vram, ram, tokens, args.repeats, args.context,
                args.dtype, skip_hf=args.no_hf, record=record, save=save)
    record["load_average_at_end"] = load_average()
    save()
    print("\n" + markdown_table(record, str(out)))
    print(f"wrote {out}")


def markdown_table(record: dict, path: str) -> str:
    """A saved record as the README's Performance table: the setting, then one row per contender, the
    like-for-like pair first (on a CPU (a) and (b'), both with every weight in RAM; on a GPU (a) and (b))."""
    a, b, c = record.get("a_moe_offload_best"), record.get("b_accelerate"), record.get("c_all_resident")
    b_all = record.get("b_reference_transformers_no_offload")
    if not a:
        raise SystemExit(f"compare: error: {path} has no (a) result (a run cut short before it)")
    headline = record.get("headline", "a_vs_b")

    def num(r):
        return f"{r['tokens_per_s']:.1f}" if r and "tokens_per_s" in r else ("failed" if r else "not run")

    def best(r):
        return f"{r['best_run_tokens_per_s']:.1f}" if r and "best_run_tokens_per_s" in r else ""

    def ratios(*pairs):
        return ", ".join((f"**{name} = {record[key]:.2f}**" if key == headline else f"{name} = {record[key]:.2f}")
                         for name, key in pairs if record.get(key) is not None)

    cpu = "CPU experts " + {"on": "auto (on)", "off": "auto (off)"}.get(a["cpu_experts_decided"],
                                                                        a["cpu_experts_decided"])
    b_row = (f"| (b) transformers + accelerate: {b['what'] if b and 'what' in b else (b or {}).get('error', '')} | "
             f"{num(b)} | {best(b)} | |")
    c_b = ratios(("c/b'", "c_vs_b_no_offload"))
    b_all_row = f"| (b') transformers, no offloading | {num(b_all)} | {best(b_all)} | {c_b} |"
    a_ratios = ratios(("a/b'", "a_vs_b_no_offload"), ("a/b", "a_vs_b"), ("a/c", "a_vs_c"))
    rows = [f"| (a) moe-offload, best settings (prefetch {a['options'].get('prefetch')}, {cpu}) | {num(a)} | "
            f"{best(a)} | {a_ratios} |"]
    rows += [b_all_row] * bool(b_all) if headline == "a_vs_b_no_offload" else [b_row]
    rows.append(f"| (c) moe-offload, every expert resident | {num(c)} | {best(c)} | |")
    rows += [b_row] if headline == "a_vs_b_no_offload" else [b_all_row] * bool(b_all)
    lines = [f"{record['model']}, {record['dtype']}, `--vram` {human(record['vram_budget'])} ("
             f"{record.get('device_slots', '?')} of {record['experts_total']} expert slots), on {record['device']}, "
             f"{record['tokens']} new tokens, {record['repeats']} runs each after a warm-up (`{path}`); decode "
             f"tok/s of the median step by {record.get('step_clock', 'wall clock')}, median over the runs, and of "
             f"the best whole run by the wall clock:", "",
             "| run | decode tok/s | best run | ratios (headline in bold) |",
             "| --- | ---: | ---: | --- |", *rows]
    tb = record.get("a_transfer_bound") or {}
    if tb.get("time_per_token_vs_transfer_bound"):
        hidden = tb.get("decode_copy_hidden_fraction")
        lines += ["", f"(a) takes {tb['time_per_token_s'] * 1e3:.2f} ms per token, "
                      f"{tb['time_per_token_vs_transfer_bound']:.1f}x its transfer bound "
                      f"({tb['transfer_bound_s_per_token'] * 1e3:.3f} ms: "
                      f"{tb['bytes_h2d_per_decode_token'] / 2**20:.1f} MiB per token at "
                      f"{tb['h2d_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)"
                      + (f"; {hidden:.0%} of its copying hid under compute." if hidden is not None else ".")]
    elif tb.get("time_per_token_s"):
        lines += ["", f"(a) takes {tb['time_per_token_s'] * 1e3:.2f} ms per token and copied nothing host->device "
                      f"while decoding (hits and CPU experts only), so there is no transfer bound."]
    peaks = [f"({k}) {human(r['peak_vram_bytes'])}" for k, r in (("a", a), ("b", b), ("c", c), ("b'", b_all))
             if r and r.get("peak_vram_bytes")]
    if peaks:
        lines += ["", "Peak GPU memory while decoding (torch's allocator): " + ", ".join(peaks) + f", against "
                  f"`--vram` {human(record['vram_budget'])}. (a)'s budget includes its KV cache and workspace; "
                  f"accelerate's `max_memory` places weights only, and what decoding needs comes on top."]
    agree = [f"({x}) vs ({y}) {v['top1_same']}/{v['positions']}, largest difference {v['max_abs_diff']:.2g}"
             for pair, v in (record.get("prompt_logits") or {}).items() if v for x, y in [pair.split("_")]]
    if agree:
        lines += ["", "Prompt logits, same top token at how many positions: " + "; ".join(agree) + "."]
    if tb.get("profiled_verdict"):
        lines += ["", f"`moe-offload profile`'s verdict on (a)'s settings: `{tb['profiled_verdict']}`."]
    return "\n".join(lines)


def at_least(least: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return parse


if __name__ == "__main__":
    try:
        main()
    except offload.UserError as exc:  # a bad --vram, --ram or model folder: one line
        sys.exit(f"compare: error: {exc}")
