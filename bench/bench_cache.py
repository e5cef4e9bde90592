"""How close the expert cache's eviction gets to the offline optimum, on the routing of trained models.

What it measures, and against what:
  * traces: the expert uses of the decode steps of greedy generations (--prompts held-out passages of the
    demo corpus, --tokens each), layer by layer in the order the forward asks for them, from the trained
    demo model (Mixtral, 8 experts, top-2) and, when it has been trained (scripts/train_finegrained.py),
    the small fine-grained Qwen3-MoE in runs/qwen3-demo (32 experts, top-4);
  * for device-slot counts from an eighth to three quarters of the experts: the demand hit rate (prefetch
    off) of each policy of offload/store/cache.py, replayed on the trace through the store's own SlotTable
    with the store's rule that the experts of the layer being run never evict each other, against Belady's
    MIN on the same trace under the same rule (on a miss, evict the resident expert used farthest in the
    future): the best any policy can do without prefetch. Figures: hit rates and policy / MIN;
  * a check that the replay is the store: the runtime's own hit rate with prefetch off at one slot count,
    decoding the same prompts, equals the replayed LRU's.

    python bench/bench_cache.py                 # writes bench/results/cache-cpu.json

Not a test: nothing is asserted. The trace does not depend on the device (greedy tokens, float32 on the CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import offload  # noqa: E402
from common import RESULTS, device_name, save_record  # noqa: E402
from offload.demo import DEMO_DIR, documents  # noqa: E402
from offload.store.cache import POLICIES, SlotTable  # noqa: E402

FINEGRAINED = Path(__file__).resolve().parents[1] / "runs" / "qwen3-demo"
Key = tuple[int, int]


def prompts(n: int, words: int = 12) -> list[str]:
    """The first words of `n` held-out passages: text the model never trained on."""
    return [" ".join(doc.split()[:words]) for doc in documents("heldout")[:n]]


def record_trace(folder: Path, texts: list[str], tokens: int) -> list[tuple[bool, list[Key]]]:
    """The experts each layer step asks the store for, in order, over greedy generations of the texts:
    (is it a decode step, [keys]). Prefill steps are kept: they change what the cache holds."""
    steps: list[tuple[bool, list[Key]]] = []
    with offload.load(folder, device="cpu", dtype="float32", prefetch=0) as rt:
        prepare = rt.store.prepare

        def recording(layer, h, experts, *rest):
            steps.append((h.shape[0] == 1, [(layer, e) for e in experts]))
            return prepare(layer, h, experts, *rest)

        rt.store.prepare = recording
        for text in texts:
            list(rt.generate_ids(rt.encode(text), tokens))
    return steps


def replay(steps: list[tuple[bool, list[Key]]], slots: int, policy: str) -> float:
    """Decode-step demand hit rate of `policy` on the trace, through the store's SlotTable and its rule."""
    table = SlotTable(slots, POLICIES[policy]())
    hits = uses = 0
    for decode, needed in steps:
        protected = set(needed)
        for key in needed:
            hit = table.lookup(key) is not None
            if not hit:
                table.assign(key, protected)  # None: fewer slots than this layer's experts; nothing is kept
            hits += hit and decode
            uses += decode
    return hits / uses


def belady(steps: list[tuple[bool, list[Key]]], slots: int) -> float:
    """Belady's MIN on the trace (decode-step hit rate): on a miss with no free slot, evict the resident key
    not needed by the layer being run whose next use is farthest away, or never."""
    flat = [key for _, needed in steps for key in needed]
    next_use = [0] * len(flat)
    seen: dict[Key, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        next_use[i] = seen.get(flat[i], len(flat))
        seen[flat[i]] = i
    resident: dict[Key, int] = {}  # key -> position of its next use
    hits = uses = i = 0
    for decode, needed in steps:
        protected = set(needed)
        for key in needed:
            hit = key in resident
            if not hit and len(resident) >= slots:
                candidates = [k for k in resident if k not in protected]
                if candidates:
                    del resident[max(candidates, key=resident.__getitem__)]
            if hit or len(resident) < slots:
                resident[key] = next_use[i]
            hits += hit and decode
            uses += decode
            i += 1
    return hits / uses


def study(name: str, folder: Path, texts: list[str], tokens: int) -> dict:
    print(f"{name}: tracing {len(texts)} x {tokens} greedy tokens")
    steps = record_trace(folder, texts, tokens)
    cfg = offload.models.open_checkpoint(folder).config
    total = cfg.experts_total
    rows = []
    for fraction in (1 / 8, 1 / 4, 1 / 2, 3 / 4):
        slots = max(cfg.num_experts_per_tok, round(total * fraction))
        optimum = belady(steps, slots)
        row = {"device_slots": slots, "fraction_of_experts": round(slots / total, 3), "belady_min": round(optimum, 4)}
        for policy in POLICIES:
            rate = replay(steps, slots, policy)
            row[policy] = round(rate, 4)
            row[f"{policy}_vs_min"] = round(rate / optimum, 3) if optimum else None
        rows.append(row)
        print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    # The replay is the store: the runtime's LRU with prefetch off, at one budget, on the same prompts.
    check_slots = rows[1]["device_slots"]
    with offload.load(folder, device="cpu", dtype="float32") as rt:
        plan = rt.store.plan
    vram = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + check_slots * plan.blob_bytes
    store = measure_decode_hits(folder, texts, tokens, vram)
    return {"model": name, "folder": str(folder), "experts": total, "experts_per_token": cfg.num_experts_per_tok,
            "layers_with_experts": len(cfg.moe_layers),
            "decode_expert_uses": sum(len(needed) for decode, needed in steps if decode), "rows": rows,
            "check": {"device_slots": check_slots, "store_lru_decode_hit_rate": store,
                      "replayed_lru_hit_rate": rows[1]["lru"]}}


def measure_decode_hits(folder: Path, texts: list[str], tokens: int, vram: int) -> float:
    """The store's own demand hit rate over the decode steps (prefetch off), from its per-step counters."""
    hits = uses = 0
    with offload.load(folder, device="cpu", dtype="float32", prefetch=0, vram=vram) as rt:
        for text in texts:
            ids = rt.encode(text)
            gen = rt.generate_ids(ids, tokens)
            next(gen)  # the prefill's token: its experts are not a decode step's
            before = rt.store.stats_.as_dict()
            for _ in gen:
                pass
            after = rt.store.stats_.as_dict()
            hits += after["expert_hits"] - before["expert_hits"]
            uses += (after["expert_hits"] + after["expert_misses"]) - (before["expert_hits"] + before["expert_misses"])
    return round(hits / uses, 4) if uses else None


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
    for name, folder in models.items():
        record["models"].append(study(name, folder, texts, args.tokens))
        save_record(record, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
