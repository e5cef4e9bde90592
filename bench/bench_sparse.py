"""Sparse experts (FloE) against plain quantization: held-out perplexity against bytes moved per token.

What it measures, and against what (every setting on the trained demo model, offload/demo_model):
  * (a) plain group-wise experts at 8/4/3/2 bits (groups 64/64/64/16, as bench_quant.py), and (b) sparse
    blobs (`convert --sparse TARGET`: the up projection at U bits, each neuron's gate row and down column as one
    chunk at C bits, thresholds calibrated on the demo's training text) at several targets over 4-bit and 3-bit
    chunks;
  * perplexity: teacher-forced over the held-out text `offload.demo.corpus("heldout")` in windows of 256 tokens
    with bos prepended, through the runtime's forward (bench_quant.perplexity), as a ratio against the plain
    4-bit row of this run;
  * bytes moved per token: a teacher-forced decode (one token a step, as generation runs) of the first
    DECODE_TOKENS held-out tokens after a bos prefill, at ONE device budget for every setting (the dense part,
    KV cache and margin plus SLOTS plain 4-bit blobs: more slots fit for smaller blobs), prefetch off; the
    store's bytes_h2d over the decode, per token, as a ratio against plain 4-bit. For a sparse blob that is the
    base (header, threshold, up projection) of each miss plus the chunks of the neurons its uses found active
    and its slot did not hold yet (offload/store/partial.py);
  * the share of (token, neuron) pairs active on the held-out decode (against the calibration target);
  * a Mixtral-8x7B-shaped expert (D=4096, F=14336), from the layouts alone: bytes of one miss, plain at each
    width and sparse assuming the neurons active per token are 1 - TARGET (as calibrated), against plain 4-bit.
Which sparse settings dominate which plain ones (no more bytes and no higher perplexity) is computed and
stated; the acceptance check: the sparse settings within 4-bit's perplexity + 5%, and their bytes against 4-bit.

    python bench/bench_sparse.py            # writes bench/results/sparse-<cpu|cuda>.json (or --out FILE)

Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

import offload  # noqa: E402
import quant  # noqa: E402
from bench_quant import SETTINGS, WINDOW, perplexity  # noqa: E402
from common import RESULTS, device_name, load_average, save_record  # noqa: E402
from offload.convert import convert  # noqa: E402
from offload.demo import corpus  # noqa: E402
from offload.generate import decode_one, prefill  # noqa: E402
from offload.models import open_checkpoint  # noqa: E402
from offload.runtime import resolve_model_path  # noqa: E402
from quant import sparse  # noqa: E402

DECODE_TOKENS = 256
SLOTS = 8  # of the demo's 32 experts: the device budget holds this many plain 4-bit blobs
# (up bits, chunk bits, targets): the up projection is a third of an expert and moves whole on every miss, so
# the lower its width the more of the budget the chunks get.
SPARSE = [(4, 4, (0.5, 0.7)), (2, 4, (0.5, 0.6, 0.7)), (3, 3, (0.5, 0.6, 0.7)), (2, 3, (0.6,))]
MIXTRAL = (4096, 14336)


def decode_bytes(folder: Path, vram: int, tokens: int) -> dict:
    """bytes_h2d per token over a teacher-forced decode of the first `tokens` held-out tokens, at `vram`."""
    with offload.load(folder, device="cpu", dtype="float32", context=tokens + 2, vram=vram) as rt:
        ids = [t for t in rt.tokenizer.encode(corpus("heldout")) if t != rt.tokenizer.bos_id][:tokens]
        prefill(rt.model, torch.tensor([rt.tokenizer.bos_id]))
        rt.store.reset_stats()
        for pos, token in enumerate(ids, start=1):
            decode_one(rt.model, token, pos)
        stats, store = rt.stats(), rt.store
        out = {"bytes_per_token": round(stats["bytes_h2d"] / len(ids)), "device_slots": stats["device_slots"],
               "hit_rate": round(stats["expert_hits"] / max(1, stats["expert_hits"] + stats["expert_misses"]), 4),
               "blob_bytes": stats["blob_bytes"]}
        if store.partial is not None:
            out["base_bytes"] = sparse.base_nbytes(store.layout)
            out["chunk_bytes"] = store.layout.extra["chunk_nbytes"]
    return out


def active_share(folder: Path, tokens: int) -> float:
    """The share of (token, neuron) pairs active over the same decode (every expert resident, counted at the
    forward: quant.sparse.active_neurons' mask)."""
    seen = [0, 0]
    active = sparse.active_neurons

    def counting(layout, views, x):
        v, mask, idx = active(layout, views, x)
        seen[0] += int(mask.sum())
        seen[1] += mask.numel()
        return v, mask, idx

    sparse.active_neurons = counting  # this process only, restored below
    try:
        with offload.load(folder, device="cpu", dtype="float32", context=tokens + 2) as rt:
            ids = [t for t in rt.tokenizer.encode(corpus("heldout")) if t != rt.tokenizer.bos_id][:tokens]
            prefill(rt.model, torch.tensor([rt.tokenizer.bos_id]))
            seen[:] = [0, 0]
            for pos, token in enumerate(ids, start=1):
                decode_one(rt.model, token, pos)
    finally:
        sparse.active_neurons = active
    return seen[0] / max(1, seen[1])


def mixtral_bytes() -> dict:
    """One Mixtral-shaped expert miss, from the layouts: plain widths, and sparse ones at 1 - TARGET active."""
    D, Fn = MIXTRAL
    plain = {f"{b}-bit g{g}": quant.expert_layout(D, Fn, b, g).nbytes for b, g in SETTINGS}
    four = plain["4-bit g64"]
    rows = {k: {"bytes_per_miss": v, "vs_4bit": round(v / four, 4)} for k, v in plain.items()}
    for up, cb, targets in SPARSE:
        layout = sparse.sparse_layout(D, Fn, up, 64, cb, 64)
        base, C = sparse.base_nbytes(layout), layout.extra["chunk_nbytes"]
        for t in targets:
            moved = base + round((1 - t) * Fn) * C
            rows[f"sparse up{up} chunks{cb} target {t}"] = {"bytes_per_miss": moved, "vs_4bit": round(moved / four, 4),
                                                            "base_bytes": base, "chunk_bytes": C}
    return {"shape": {"hidden": D, "ffn": Fn}, "rows": rows,
            "note": "computed from the blob layouts, assuming 1 - TARGET of the neurons active per token (the "
                    "calibration target; the demo's held-out share is measured above); no Mixtral weights run"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="where the record goes (default: "
                                                           "bench/results/sparse-<cpu|cuda>.json)")
    ap.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    args = ap.parse_args()
    torch.manual_seed(0)
    src = resolve_model_path("demo")
    cfg = open_checkpoint(src).config
    start = time.perf_counter()
    out = args.out or RESULTS / f"sparse-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    record = {
        "device": device_name("cpu"), "load_average": load_average(),
        "model": "offload/demo_model (trained demo: 4 layers, 8 experts top-2, D=192, F=320)",
        "eval": f'ppl: offload.demo.corpus("heldout"), windows of {WINDOW} tokens + bos, teacher-forced; bytes: '
                f"teacher-forced decode of its first {args.decode_tokens} tokens, prefetch off; "
                f"python {platform.python_version()}",
        "rows": {}, "mixtral_expert": mixtral_bytes(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        four = convert(src, tmp / "plain-4", 4, 64)
        with offload.load(four, device="cpu", dtype="float32", context=args.decode_tokens + 2) as rt:
            plan = rt.store.plan
        vram = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + SLOTS * plan.blob_bytes
        record["device_budget_bytes"] = vram
        record["device_budget"] = f"dense + KV cache + margin + {SLOTS} plain 4-bit blobs ({SLOTS} of 32 experts)"
        settings = [(f"plain {b}-bit g{g}", dict(bits=b, group_size=g)) for b, g in SETTINGS]
        settings += [(f"sparse up{up} chunks{cb} target {t}", dict(bits=up, group_size=64, sparse=t, chunk_bits=cb))
                     for up, cb, targets in SPARSE for t in targets]
        for name, options in settings:
            dst = convert(src, tmp / name.replace(" ", "_"), **options)
            row = {"ppl": round(perplexity(dst)["ppl"], 4), **decode_bytes(dst, vram, args.decode_tokens)}
            if "sparse" in options:
                row["target"] = options["sparse"]
                row["active_share_heldout"] = round(active_share(dst, args.decode_tokens), 4)
            shutil.rmtree(dst)
            record["rows"][name] = row
            print(f"{name}: ppl {row['ppl']}, {row['bytes_per_token']} B/token, {row['device_slots']} slots, "
                  f"hit {row['hit_rate']}" + (f", active {row['active_share_heldout']}" if "sparse" in options else ""),
                  flush=True)
            save_record(record, out)
        shutil.rmtree(four)
    rows = record["rows"]
    ref = rows["plain 4-bit g64"]
    for row in rows.values():
        row["ppl_vs_4bit"] = round(row["ppl"] / ref["ppl"], 4)
        row["bytes_vs_4bit"] = round(row["bytes_per_token"] / ref["bytes_per_token"], 4)
    plain = {k: v for k, v in rows.items() if k.startswith("plain")}
    sparse_rows = {k: v for k, v in rows.items() if k.startswith("sparse")}
    record["dominates"] = {
        p: [s for s, r in sparse_rows.items() if r["bytes_per_token"] <= pr["bytes_per_token"] and r["ppl"] <= pr["ppl"]]
        for p, pr in plain.items()}
    within = {s: r for s, r in sparse_rows.items() if r["ppl"] <= 1.05 * ref["ppl"]}
    best = min(within, key=lambda s: within[s]["bytes_per_token"]) if within else None
    record["acceptance"] = {
        "rule": "a sparse setting with ppl <= 1.05 x plain 4-bit's and bytes/token <= 0.5 x plain 4-bit's",
        "best_within_5pct": best,
        "bytes_cut_vs_4bit": round(ref["bytes_per_token"] / within[best]["bytes_per_token"], 3) if best else None,
        "ppl_vs_4bit": within[best]["ppl_vs_4bit"] if best else None,
        "met": bool(best and within[best]["bytes_per_token"] * 2 <= ref["bytes_per_token"]),
    }
    record["seconds"] = round(time.perf_counter() - start, 1)
    save_record(record, out)
    print(json.dumps({"dominates": record["dominates"], "acceptance": record["acceptance"]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
