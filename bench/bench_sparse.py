"""Sparse experts (FloE) against plain quantization: held-out perplexity against bytes moved per token.

What it measures, and against what (every setting on the trained demo model, offload/demo_model, or with
--model runs/qwen3-demo the small fine-grained Qwen3-MoE of scripts/train_finegrained.py: the same corpus and
tokenizer; groups of 16 where its ffn of 80 takes no 64, a device budget of a quarter of its experts):
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
  * neuron predictors (offload/store/predictor.py, rank 32, trained by the same convert): bytes per token of the
    same decode with router-ahead prefetch 1, with the predictors (a guess copy brings its predicted chunks) and
    without them (the same folder less its predictor file: guess copies move bases only), and of what the
    guessed chunks became (used by the expert before its slot was refilled: hits; refilled unused: wasted);
    and the predictors' precision and recall on the held-out text (guessed neurons that were active, active
    ones that were guessed, over every token and routed expert of the predicted layers); and what chose the
    predictor (`predictor_choice`: rank 8-192 and the share of active pairs guessed, against the next expert's
    own up projection applied to the previous layer's input, on the float model's held-out text, 4-bit up);
  * a Mixtral-8x7B-shaped expert (D=4096, F=14336), from the layouts alone: bytes of one miss, plain at each
    width and sparse assuming the neurons active per token are 1 - TARGET (as calibrated), against plain 4-bit.
Which sparse settings dominate which plain ones (no more bytes and no higher perplexity) is computed and
stated; the acceptance check: the sparse settings within 4-bit's perplexity + 5%, and their bytes against 4-bit.

    python bench/bench_sparse.py            # writes bench/results/sparse-<cpu|cuda>.json (or --out FILE)
    python bench/bench_sparse.py --model runs/qwen3-demo   # writes bench/results/sparse-qwen3-demo-cpu.json

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
from offload import calibrate  # noqa: E402
from offload.calibrate import score_predictor  # noqa: E402
from offload.convert import convert  # noqa: E402
from offload.demo import corpus  # noqa: E402
from offload.generate import decode_one, prefill  # noqa: E402
from offload.models import open_checkpoint  # noqa: E402
from offload.runtime import resolve_model_path  # noqa: E402
from offload.store import predictor  # noqa: E402
from quant import sparse  # noqa: E402

DECODE_TOKENS = 256
SLOTS = 8  # of the demo's 32 experts: the device budget holds this many plain 4-bit blobs
# (up bits, chunk bits, targets): the up projection is a third of an expert and moves whole on every miss, so
# the lower its width the more of the budget the chunks get.
SPARSE = [(4, 4, (0.5, 0.7)), (2, 4, (0.5, 0.6, 0.7)), (3, 3, (0.5, 0.6, 0.7)), (2, 3, (0.6,))]
MIXTRAL = (4096, 14336)


def decode_bytes(folder: Path, vram: int, tokens: int, prefetch: int = 0) -> dict:
    """bytes_h2d per token over a teacher-forced decode of the first `tokens` held-out tokens, at `vram`."""
    with offload.load(folder, device="cpu", dtype="float32", context=tokens + 2, vram=vram, prefetch=prefetch) as rt:
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
        if prefetch:
            out.update({k: stats[k] for k in ("prefetch_issued", "prefetch_hits", "prefetch_wasted",
                                              "bytes_prefetch_wasted", "chunk_guesses", "chunk_guess_hits",
                                              "chunk_guess_wasted")})
            if stats["chunk_guesses"]:
                out["chunk_guess_precision"] = round(stats["chunk_guess_hits"] / stats["chunk_guesses"], 4)
    return out


def without_predictor(folder: Path, dst: Path) -> Path:
    """A copy of a sparse folder as `convert --predictor-rank 0` writes it: no predictor file, none in its record."""
    shutil.copytree(folder, dst)
    (dst / predictor.FILE).unlink()
    info = json.loads((dst / "moe_offload.json").read_text())
    info = {**info, "sparse": {**info["sparse"], "predictor_rank": 0}}
    del info["predictor"]
    (dst / "moe_offload.json").write_text(json.dumps(info))
    return dst


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


def predictor_choice(src: Path, target: float = 0.5) -> dict:
    """Precision/recall of predictor variants on the held-out text (the float model's inputs), 4-bit up projection:
    rank r fits (calibrate.fit_predictor) guessing `share` x as many pairs as are active, and the baseline that
    needs no bytes of its own, |w3 h_prev| > a threshold calibrated to as many guesses as active pairs."""
    import torch.nn.functional as F

    from offload.models import family

    train = calibrate.record(src, corpus("train"), "train")
    held = calibrate.record(src, corpus("heldout"), "heldout")
    ckpt = open_checkpoint(src)
    cfg, fam, layers = ckpt.config, family(ckpt.config), ckpt.config.moe_layers
    counts: dict[str, list[int]] = {}  # variant -> [guessed, active, both]

    def tally(name, guess, truth):
        c = counts.setdefault(name, [0, 0, 0])
        c[0] += int(guess.sum())
        c[1] += int(truth.sum())
        c[2] += int((guess & truth).sum())

    for prev, layer in zip(layers[:-1], layers[1:]):
        for e in range(cfg.num_local_experts):
            up = quant.quantize(ckpt.read(fam.expert_names(layer, e)[2], dtype=torch.float32), 4, 64)
            w3 = quant.dequantize(up)
            thr = calibrate.threshold(train.inputs(layer, e)[0], up, target)
            routed, fit = (held.routed[layer] == e).any(1), (train.routed[layer] == e).any(1)
            truth = F.linear(held.hidden[layer][routed], w3).abs() > thr
            for rank in (8, 16, 32, 64, 192):
                t, _ = calibrate.fit_predictor(train, (layer, e), prev, up, thr, rank)
                def est(h, t=t):  # |v_hat| [n, F]
                    return ((h @ t["proj"].float().T + t["bias"].float()) @ t["out"].float().T).abs()

                on_fit = est(train.hidden[prev][fit])
                active = int((F.linear(train.hidden[layer][fit], w3).abs() > thr).sum())
                for share in ((0.3, 0.5, 0.75, 1.0) if rank == 32 else (0.5, 1.0)):
                    k = on_fit.numel() - round(share * active)
                    cut = float(torch.kthvalue(on_fit.flatten(), max(1, k)).values)
                    tally(f"rank {rank} share {share}", est(held.hidden[prev][routed]) > cut, truth)
            own = F.linear(train.hidden[prev][fit], w3).abs()
            cut = float(torch.kthvalue(own.flatten(), max(1, own.numel() - active)).values)
            tally("own up projection on h_prev, share 1.0", F.linear(held.hidden[prev][routed], w3).abs() > cut, truth)
    ckpt.close()
    return {"target": target, "rows": {k: {"precision": round(c[2] / max(1, c[0]), 4),
                                           "recall": round(c[2] / max(1, c[1]), 4)} for k, c in counts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="where the record goes (default: "
                                                           "bench/results/sparse-[MODEL-]<cpu|cuda>.json)")
    ap.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    ap.add_argument("--model", default="demo", help="a folder trained on the demo corpus with its tokenizer: 'demo' "
                                                    "(default), or runs/qwen3-demo (scripts/train_finegrained.py)")
    args = ap.parse_args()
    torch.manual_seed(0)
    src = resolve_model_path(args.model)
    cfg = open_checkpoint(src).config
    # Groups of 64 where the expert dims allow (the demo's D 192, F 320), else the largest that divides both.
    D, F = cfg.hidden_size, cfg.intermediate_size
    group = next(g for g in (64, 32, 16) if D % g == 0 and F % g == 0)
    plain_settings = [(b, g if D % g == 0 and F % g == 0 else group) for b, g in SETTINGS]
    experts = cfg.experts_total
    slots = experts * SLOTS // 32  # the demo's 8 of 32: a quarter of the experts
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = "" if args.model == "demo" else f"{Path(args.model).name}-"
    out = args.out or RESULTS / f"sparse-{name}{device}.json"
    record = {
        "device": device_name("cpu"), "load_average": load_average(),
        "model": f"{args.model} ({cfg.model_type}: {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts "
                 f"top-{cfg.num_experts_per_tok}, D={D}, F={F})",
        "eval": f'ppl: offload.demo.corpus("heldout"), windows of {WINDOW} tokens + bos, teacher-forced; bytes: '
                f"teacher-forced decode of its first {args.decode_tokens} tokens, prefetch off; "
                f"python {platform.python_version()}",
        "rows": {}, "mixtral_expert": mixtral_bytes(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        four = convert(src, tmp / "plain-4", 4, dict(plain_settings)[4])
        with offload.load(four, device="cpu", dtype="float32", context=args.decode_tokens + 2) as rt:
            plan = rt.store.plan
        vram = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + slots * plan.blob_bytes
        record["device_budget_bytes"] = vram
        record["device_budget"] = (f"dense + KV cache + margin + {slots} plain 4-bit blobs ({slots} of {experts} "
                                   f"experts)")
        settings = [(f"plain {b}-bit g{g}", dict(bits=b, group_size=g)) for b, g in plain_settings]
        settings += [(f"sparse up{up} chunks{cb} target {t}", dict(bits=up, group_size=group, sparse=t, chunk_bits=cb))
                     for up, cb, targets in SPARSE for t in targets]
        for name, options in settings:
            dst = convert(src, tmp / name.replace(" ", "_"), **options)
            row = {"ppl": round(perplexity(dst)["ppl"], 4), **decode_bytes(dst, vram, args.decode_tokens)}
            row["prefetch_1"] = decode_bytes(dst, vram, args.decode_tokens, prefetch=1)
            if "sparse" in options:
                row["target"] = options["sparse"]
                row["active_share_heldout"] = round(active_share(dst, args.decode_tokens), 4)
                row["predictor"] = json.loads((dst / "moe_offload.json").read_text())["predictor"]
                scored = score_predictor(dst, corpus("heldout"), "heldout")
                row["predictor"]["heldout_text"] = {k: round(v, 4) if isinstance(v, float) else v
                                                    for k, v in scored.items()}
                plain_copy = without_predictor(dst, tmp / "no-predictor")
                row["prefetch_1_no_predictor"] = decode_bytes(plain_copy, vram, args.decode_tokens, prefetch=1)
                shutil.rmtree(plain_copy)
            shutil.rmtree(dst)
            record["rows"][name] = row
            print(f"{name}: ppl {row['ppl']}, {row['bytes_per_token']} B/token, {row['device_slots']} slots, "
                  f"hit {row['hit_rate']}, prefetch 1 {row['prefetch_1']['bytes_per_token']} B/token"
                  + (f", active {row['active_share_heldout']}, no predictor "
                     f"{row['prefetch_1_no_predictor']['bytes_per_token']} B/token, chunk guesses "
                     f"{row['prefetch_1'].get('chunk_guess_precision')} used, predictor precision "
                     f"{row['predictor']['heldout_text']['precision']} "
                     f"recall {row['predictor']['heldout_text']['recall']}"
                     if "sparse" in options else ""), flush=True)
            save_record(record, out)
        shutil.rmtree(four)
    rows = record["rows"]
    ref = rows[f"plain 4-bit g{dict(plain_settings)[4]}"]
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
    record["predictor"] = {
        "what": "prefetch 1 bytes/token with the neuron predictors over without them (1.0: no rise), the share of "
                "guessed chunks used before their slot was refilled, and precision/recall on the held-out text",
        "rows": {s: {"bytes_with_over_without": round(r["prefetch_1"]["bytes_per_token"]
                                                      / r["prefetch_1_no_predictor"]["bytes_per_token"], 4),
                     "prefetch_1_over_prefetch_off": round(r["prefetch_1"]["bytes_per_token"]
                                                           / r["bytes_per_token"], 4),
                     "chunk_guess_precision": r["prefetch_1"].get("chunk_guess_precision"),
                     "heldout_precision": r["predictor"]["heldout_text"]["precision"],
                     "heldout_recall": r["predictor"]["heldout_text"]["recall"]}
                 for s, r in sparse_rows.items()}}
    if args.model == "demo":  # what chose the predictors' rank and share: measured once, on the demo model
        record["predictor_choice"] = predictor_choice(src)
    record["seconds"] = round(time.perf_counter() - start, 1)
    save_record(record, out)
    print(json.dumps({"dominates": record["dominates"], "acceptance": record["acceptance"]}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
