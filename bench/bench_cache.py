"""How close the expert cache's eviction gets to the offline optimum, on the routing of trained models.

What it measures, and against what:
  * traces: the expert uses of the decode steps of greedy generations (--prompts held-out passages of the
    demo corpus, --tokens each), layer by layer in the order the forward asks for them, from the trained
    demo model (Mixtral, 8 experts, top-2) and, when it has been trained (scripts/train_finegrained.py),
    the small fine-grained Qwen3-MoE in runs/qwen3-demo (32 experts, top-4);
  * for device-slot counts from an eighth to three quarters of the experts: the demand hit rate (prefetch
    off) of each policy of offload/store/cache.py, and of the default (context) policy started from the model's
    routing prior (offload/store/prior.py: the folder's routing-prior.safetensors, which the demo ships, counted
    on the training text; else one counted now on that text), replayed on the trace through the store's own SlotTable
    with the store's rule that the experts of the layer being run never evict each other, against Belady's
    MIN on the same trace under the same rule (on a miss, evict the resident expert used farthest in the
    future): the best any policy can do without prefetch. Figures: hit rates and policy / MIN;
  * what the prior's gain is made of (these models reproduce their training text): the context policy from a
    prior counted on as many training tokens as the held-out passages the prompts leave unused hold, and on those
    passages;
  * what the gap is made of: the cycle policy told, for the next 1, 2, .. layers of the token, which of their
    experts each will use (not an online policy: `Told`), / MIN;
  * a check that the replay is the store: the runtime's own hit rate with prefetch off at one slot count,
    decoding the same prompts from the prior, equals the replayed default policy's from the prior;
  * what each policy's bookkeeping costs the host thread, in ms per decode token, on the routing shapes of
    Mixtral-8x7B and Qwen3-30B-A3B at a quarter of their experts on the device (synthetic routing: tokens drawn
    from a Zipf law, each routed as the last time it appeared 60% of the time; for cost only, not hit rates);
  * prefetch's cost and worth, from the store itself (default policy and prior, every slot count): decode hit rate and
    bytes host->device per decode token with --prefetch 0, 1 and 2, and the prefetched copies evicted unused.

    python bench/bench_cache.py                 # writes bench/results/cache-cpu.json

Not a test: nothing is asserted. The trace does not depend on the device (greedy tokens, float32 on the CPU).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, device_name, save_record  # noqa: E402

import offload  # noqa: E402
from offload.calibrate import calibration_text, routing_prior  # noqa: E402
from offload.demo import DEMO_DIR, documents  # noqa: E402
from offload.store import Stats  # noqa: E402
from offload.store.cache import DEFAULT_POLICY, POLICIES, Context, Cycle, SlotTable, make_policy  # noqa: E402
from offload.store.optimum import _uses, optimum, rate, replay, step  # noqa: E402
from offload.store.prior import RoutingPrior  # noqa: E402
from offload.store.prior import find as find_prior  # noqa: E402

FINEGRAINED = Path(__file__).resolve().parents[1] / "runs" / "qwen3-demo"
Key = tuple[int, int]


def prompts(n: int, words: int = 12) -> list[str]:
    """The first words of `n` held-out passages: text the model never trained on."""
    return [" ".join(doc.split()[:words]) for doc in documents("heldout")[:n]]


def record_trace(folder: Path, texts: list[str], tokens: int, dtype: str = "float32") -> list[list]:
    """The routing trace (offload/store/optimum.py's format: [decode, layer, experts] per layer step, prefill
    steps kept: they change what the cache holds) of greedy generations of the texts."""
    steps: list[list] = []
    with offload.load(folder, device="cpu", dtype=dtype, prefetch=0) as rt:
        prepare = rt.store.prepare

        def recording(layer, h, experts, guesses=None, tokens=None):
            steps.append(step(h.shape[0] == 1, layer, experts, tokens))
            return prepare(layer, h, experts, guesses, tokens)

        rt.store.prepare = recording
        for text in texts:
            list(rt.generate_ids(rt.encode(text), tokens))
    return steps


class Told(Cycle):
    """The cycle policy told the truth about the next `horizon` layers of the token: for each of their
    resident experts, whether the layer's next visit uses it (used: its next use is that visit; not: a visit
    later, at its rate). Not an online policy: it measures how much of the gap to the optimum is knowing which
    experts the layers still to run will pick, which the best online signal, their routers applied ahead
    (prefetch's guesses), gets right only part of the time (`guess_accuracy`)."""

    def __init__(self, trace: list[list], horizon: int):
        super().__init__()
        self.horizon = horizon
        steps = [(needed[0][0], {e for _, e in needed}) for _, needed, _, _ in _uses(trace) if needed]
        upcoming: dict[int, set] = {}
        self.future: list[dict[int, set]] = [{}] * len(steps)  # step -> layer -> experts of its next visit
        for i in range(len(steps) - 1, -1, -1):
            self.future[i] = dict(upcoming)
            upcoming[steps[i][0]] = steps[i][1]
        self.step = -1

    def visit(self, layer: int, experts=(), tokens=None) -> None:
        super().visit(layer)
        self.step += 1

    def next_use(self, key: Key) -> float:
        L = len(self.position) or 1
        d = (self.position.get(key[0], 0) - self.position.get(self.current, -1) - 1) % L + 1
        if d > self.horizon or d == L:
            return super().next_use(key)
        if key[1] in self.future[self.step].get(key[0], ()):
            return d
        r = self._rate(key)
        return d + L / r if r > 0 else math.inf

    def victim(self, keys, protected):
        candidates = [k for k in keys if k not in protected]
        return max(candidates, key=self.next_use) if candidates else None


def policy_rows(trace: list[list], total: int, per_token: int, layers: int,
                fractions=(1 / 8, 1 / 4, 1 / 2, 3 / 4), prior: RoutingPrior | None = None,
                others: dict[str, RoutingPrior] | None = None) -> list[dict]:
    """For slot counts that are these fractions of the experts: Belady's optimum and each policy's demand hit
    rate on the trace, with policy / optimum (the context policy cold, started from `prior` as `context_prior`,
    and from each of `others` as `context_prior_LABEL`); and the cycle policy told the next 1 .. L-1 layers'
    picks."""
    rows = []
    for fraction in fractions:
        slots = max(per_token, round(total * fraction))
        best = rate(optimum(trace, slots))
        row = {"device_slots": slots, "fraction_of_experts": round(slots / total, 3), "belady_min": round(best, 4)}
        runs = {policy: (policy, None) for policy in POLICIES}
        if prior is not None:
            runs[f"{DEFAULT_POLICY}_prior"] = (DEFAULT_POLICY, prior)
        for label, other in (others or {}).items():
            runs[f"{DEFAULT_POLICY}_prior_{label}"] = (DEFAULT_POLICY, other)
        for name, (policy, start) in runs.items():
            got = rate(replay(trace, slots, policy, start))
            row[name] = round(got, 4)
            row[f"{name}_vs_min"] = round(got / best, 3) if best else None
        for horizon in range(1, layers):
            told = rate(replay(trace, slots, Told(trace, horizon)))
            row[f"cycle_told_{horizon}_layers_vs_min"] = round(told / best, 3) if best else None
        rows.append(row)
        print("  " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def vram_for(folder: Path, slots: int) -> int:
    """A --vram with room for exactly `slots` experts."""
    with offload.load(folder, device="cpu", dtype="float32") as rt:
        plan = rt.store.plan
    return plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + slots * plan.blob_bytes


def study(name: str, folder: Path, texts: list[str], tokens: int) -> dict:
    print(f"{name}: tracing {len(texts)} x {tokens} greedy tokens", flush=True)
    trace = record_trace(folder, texts, tokens)
    cfg = offload.models.open_checkpoint(folder).config
    total = cfg.experts_total
    # The model's routing prior: the folder's (the demo ships one; scripts/train_finegrained.py writes one), else
    # one counted now on the default calibration text (the demo corpus' training split).
    train, source = calibration_text(None)
    prior = find_prior(folder, "auto", cfg) or routing_prior(folder, train, source)
    # What the prior's gain is made of, on this model that has memorized its training text: as little
    # training text as the held-out passages the prompts leave over, and those passages themselves.
    unused = "\n".join(documents("heldout")[len(texts):])
    small = routing_prior(folder, unused, "unused held-out passages")
    others = {"train_as_many_tokens": routing_prior(folder, train, source, max_tokens=int(small.meta["tokens"])),
              "heldout_unused": small}
    rows = policy_rows(trace, total, cfg.num_experts_per_tok, len(cfg.moe_layers), prior=prior, others=others)
    # The replay is the store: the runtime's default policy (from the prior) with prefetch off, at one budget.
    check_slots = rows[1]["device_slots"]
    store = measure_decode(folder, texts, tokens, vram_for(folder, check_slots), prefetch=0, prior=prior)
    prefetch = []
    for row in rows:
        vram = vram_for(folder, row["device_slots"])
        runs = {p: measure_decode(folder, texts, tokens, vram, prefetch=p, prior=prior) for p in (0, 1, 2)}
        off = runs[0]
        entry = {"device_slots": row["device_slots"], "policy": DEFAULT_POLICY, "routing_prior": True}
        for p, r in runs.items():
            entry[f"prefetch_{p}"] = {**r, "bytes_h2d_vs_prefetch_0": round(r["bytes_h2d_per_token"] / off["bytes_h2d_per_token"], 4)
                                      if off["bytes_h2d_per_token"] else None}
        prefetch.append(entry)
        print(f"  slots {row['device_slots']}: " + "; ".join(
            f"prefetch {p}: hit {r['hit_rate']}, h2d/token {r['bytes_h2d_per_token']} "
            f"({entry[f'prefetch_{p}']['bytes_h2d_vs_prefetch_0']}x), issued {r['prefetch_issued']}, "
            f"used {r['prefetch_hits']}, wasted {r['prefetch_wasted']}" for p, r in runs.items()), flush=True)
    return {"model": name, "folder": str(folder), "experts": total, "experts_per_token": cfg.num_experts_per_tok,
            "layers_with_experts": len(cfg.moe_layers),
            "decode_expert_uses": sum(len(s[2]) for s in trace if s[0]),
            "routing_prior": {"source": prior.meta["source"], "tokens": int(prior.meta["tokens"]),
                              "distinct_tokens": len(prior)},
            "other_priors": {label: {"source": p.meta["source"], "tokens": int(p.meta["tokens"])}
                             for label, p in others.items()},
            "rows": rows,
            "check": {"device_slots": check_slots, "policy": DEFAULT_POLICY, "routing_prior": True,
                      "store_decode_hit_rate": store["hit_rate"],
                      "replayed_hit_rate": rows[1][f"{DEFAULT_POLICY}_prior"]},
            "prefetch": prefetch}


def measure_decode(folder: Path, texts: list[str], tokens: int, vram: int, prefetch: int,
                   prior: RoutingPrior) -> dict:
    """The store's own counters over the decode steps (default policy, from the routing `prior`): demand +
    prefetch hit rate, bytes host->device per decode token, and what prefetch issued, got used, and wasted
    (evicted unused)."""
    totals = {k: 0 for k in Stats.FIELDS}
    steps = 0
    with offload.load(folder, device="cpu", dtype="float32", prefetch=prefetch, vram=vram, cpu_experts="never",
                      routing_prior=prior) as rt:
        for text in texts:
            gen = rt.generate_ids(rt.encode(text), tokens)
            next(gen)  # the prefill's token: its experts are not a decode step's
            before = rt.store.stats_.as_dict()
            steps += sum(1 for _ in gen)
            after = rt.store.stats_.as_dict()
            for k in totals:
                totals[k] += after[k] - before[k]
    uses = totals["expert_hits"] + totals["expert_misses"]
    return {"hit_rate": round(totals["expert_hits"] / uses, 4) if uses else None,
            "bytes_h2d_per_token": totals["bytes_h2d"] // max(1, steps), "decode_steps": steps,
            **{k: totals[k] for k in ("prefetch_issued", "prefetch_hits", "prefetch_wasted", "prefetch_skipped")}}


SHAPES = {"Mixtral-8x7B": (32, 8, 2), "Qwen3-30B-A3B": (48, 128, 8)}  # MoE layers, experts, experts per token


def policy_cost(tokens: int = 200, seed: int = 0, calibration: int = 4000) -> list[dict]:
    """Each policy's bookkeeping (visit, lookups, evictions) in ms per decode token on synthetic routing of real
    model shapes, with a quarter of the experts in device slots; the context policy also from a routing prior
    counted on `calibration` tokens more of the same synthetic text (each token new to the run then copies in
    its prior counts: thousands of (layer, expert, ahead) cells for a frequent token of a fine-grained model)."""
    rows = []
    for model, (layers, experts, k) in SHAPES.items():
        rng = random.Random(seed)
        remembered: dict[tuple[int, int], list[int]] = {}
        steps = []
        for _ in range(calibration + tokens):
            token = min(int(rng.paretovariate(1.0)), 300)
            for layer in range(layers):
                picked = remembered.setdefault((token, layer), rng.sample(range(experts), k))
                steps.append((layer, picked if rng.random() < 0.6 else rng.sample(range(experts), k), [token]))
        text, steps = steps[:calibration * layers], steps[calibration * layers:]
        prior = RoutingPrior.build(torch.tensor([t[0] for layer, _, t in text if layer == 0]),
                                   {lay: torch.tensor([p for layer, p, _ in text if layer == lay])
                                    for lay in range(layers)},
                                   layers=layers, experts=experts, vocab=301, ahead=Context.AHEAD)
        slots = layers * experts // 4
        runs = {policy: (policy, None) for policy in POLICIES}
        runs[f"{DEFAULT_POLICY}_prior"] = (DEFAULT_POLICY, prior)
        for name, (policy, start) in runs.items():
            table = SlotTable(slots, make_policy(policy, start))
            misses = 0
            t0 = time.perf_counter()
            for layer, picked, token in steps:
                misses += len(picked) - table.demand_step(layer, picked, token)
            ms = (time.perf_counter() - t0) / tokens * 1e3
            rows.append({"shape": model, "device_slots": slots, "policy": name, "ms_per_token": round(ms, 3),
                         "misses_per_token": round(misses / tokens, 1)})
            print(f"  {model}, {slots} slots, {name}: {ms:.2f} ms/token ({misses / tokens:.1f} misses/token)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--out", type=Path, default=RESULTS / "cache-cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    texts = prompts(args.prompts)
    record = {"benchmark": "cache", "device": device_name("cpu"), "torch": torch.__version__,
              "prompts": texts, "tokens": args.tokens, "models": []}
    models = {"demo (Mixtral, 8 experts, top-2)": DEMO_DIR}
    if (FINEGRAINED / "model.safetensors").is_file():
        models["qwen3-demo (Qwen3-MoE, 32 experts, top-4)"] = FINEGRAINED
    else:
        record["missing"] = f"{FINEGRAINED}: run python scripts/train_finegrained.py to add the fine-grained model"
        print(record["missing"])
    print("policy bookkeeping per decode token:", flush=True)
    record["policy_cost"] = policy_cost()
    for name, folder in models.items():
        record["models"].append(study(name, folder, texts, args.tokens))
        save_record(record, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
