"""MoLE against its baselines: quality, table sizes, bytes moved per token and decode speed; plus the cost of
gathering one token's rows from a Mixtral-dimension table on disk and in RAM.

What it measures, and against what (ratios against baselines measured in this run):
  * the three small models trained by scripts/train_mole.py with the same recipe, attention and
    multiply-adds per token: dense (runs/mole/dense), top-2 MoE (runs/mole/moe), MoLE (lut/demo_model):
      - held-out perplexity (offload.demo.corpus("heldout"), 256-token windows): of each checkpoint, and of
        the MoLE table model built at 16/8/4 bits and run by the runtime (what the tables cost in quality);
      - table bytes on disk at each width, against the MoLE checkpoint's routed experts;
      - bytes moved host->device per decode token and decode tokens/s, all relative to the dense model:
        the table model with tables on disk and in RAM, the dense model, and the MoE under offloading
        with the same device budget as the table model (its dense part + KV + workspace; what is left
        holds expert slots), plus the MoE with every expert resident; all six are loaded and warmed up,
        then measured in interleaved rounds (median), so a busy machine slows them alike;
  * a Mixtral-dimension table slice (random values, vocab 32000, d 4096, a few layers and experts; fp16):
    per-token time to gather one token's record (every layer's rows) and have the rows ready on the
    compute device, from disk with a cold page cache, from the page cache, and from RAM; and the time to
    gather as many random records as add up to one token's rows in full Mixtral (32 layers x 8 experts
    x 4096 fp16 = 2 MiB), as GB/s against the sequential read of the same file (disk) and a memcpy (RAM).

    python scripts/train_mole.py        # once: the three models
    python bench/bench_mole.py          # writes bench/results/mole-<device>.json
    python bench/bench_mole.py --no-slice --tokens 32

On a CPU-only machine the "device" is the CPU: bytes_h2d are the copies into the compute buffers a GPU would
get over PCIe, and speeds are only comparable as ratios. Decode and the slice run on --decode-threads (1):
batch-1 decode of a model this small gains nothing from a second thread, and on a shared CPU each parallel
op waits for a core. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import offload  # noqa: E402
from common import PROMPT, RESULTS, device_name, save_record, sync  # noqa: E402
from lut import DEMO_DIR  # noqa: E402
from lut.build import TABLE_FILE, build_tables  # noqa: E402
from lut.model import load_model, windowed_nll  # noqa: E402
from lut.serve import TableStore  # noqa: E402
from lut.tables import TableLayout  # noqa: E402
from offload.demo import documents  # noqa: E402

RUNS = REPO / "runs" / "mole"
WINDOW = 256




def heldout_stream(tokenizer_dir: Path) -> torch.Tensor:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids: list[int] = []
    for doc in documents("heldout"):
        ids += [1] + tok.encode(doc, add_special_tokens=False).ids + [2]
    return torch.tensor(ids)


@torch.no_grad()
def nll_of_checkpoint(folder: Path, stream: torch.Tensor) -> float:
    """Mean next-token NLL (nats) of a checkpoint, by its own full-sequence forward (lut/model.py)."""
    return windowed_nll(load_model(folder, torch.float32, model_types=("mole", "mixtral")), stream, WINDOW)


@torch.no_grad()
def nll_of_runtime(folder: Path, stream: torch.Tensor, device: str) -> float:
    """The same through offload's runtime (for the table models: rows gathered from the tables)."""
    rt = offload.load(folder, device=device, dtype="float32", context=WINDOW)
    total, count = 0.0, 0
    for start in range(0, len(stream) - 1, WINDOW):
        w = stream[start:start + WINDOW + 1].to(rt.model.device)
        logits = rt.model.forward(w[:-1], 0, all_logits=True)  # restarts the KV cache at position 0
        total += F.cross_entropy(logits, w[1:], reduction="sum").item()
        count += len(w) - 1
    return total / count


def decode_rounds(contenders: dict[str, tuple[Path, dict]], device: str, tokens: int, repeats: int) -> dict:
    """Decode speed and bytes per decode token of each contender. All are loaded and warmed up first, then
    measured in `repeats` interleaved rounds (one generation each per round), so that load from other
    processes on a shared machine falls on every contender alike; the median of the rounds is reported.
    Bytes per decode token: a generation's bytes minus those of a prefill-only run just before it."""
    runtimes = {}
    for name, (folder, options) in contenders.items():
        rt = runtimes[name] = offload.load(folder, device=device, context=512, **options)
        list(rt.generate_ids(rt.encode(PROMPT), max_new_tokens=4))
    speeds: dict[str, list[float]] = {name: [] for name in contenders}
    moved: dict[str, tuple[dict, dict]] = {}
    for _ in range(repeats):
        for name, rt in runtimes.items():
            ids = rt.encode(PROMPT)
            list(rt.generate_ids(ids, max_new_tokens=1))
            prefill = rt.stats()
            sync(device)
            list(rt.generate_ids(ids, max_new_tokens=tokens + 1))
            sync(device)
            speeds[name].append(rt.stats()["tokens_per_s"])
            moved[name] = (prefill, rt.stats())
    out = {}
    for name, (prefill, s) in moved.items():
        n = max(1, s["new_tokens"] - 1)  # decode steps: every new token after the first, which prefill gives
        r = out[name] = {"tokens_per_s": statistics.median(speeds[name]), "decode_tokens": n,
                         "bytes_h2d_per_token": round((s["bytes_h2d"] - prefill["bytes_h2d"]) / n),
                         "bytes_disk_per_token": round((s["bytes_disk"] - prefill["bytes_disk"]) / n),
                         "peak_vram_bytes": s["peak_vram_bytes"]}
        if "expert_hits" in s:
            r.update({"device_slots": s["device_slots"], "vram_budget": s["vram_budget"],
                      "hit_rate": round(s["expert_hits"] / max(1, s["expert_hits"] + s["expert_misses"]), 4)})
    return out


def small_models(args, tmp: Path) -> dict:
    folders = {"dense": args.dense, "moe": args.moe, "mole": args.mole}
    missing = [str(f) for f in folders.values() if not (f / "model.safetensors").is_file()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run python scripts/train_mole.py first")
    stream = heldout_stream(args.mole)
    record: dict = {"heldout_tokens": len(stream) - 1, "window": WINDOW}

    tables = {}
    for bits in (16, 8, 4):
        summary = build_tables(args.mole, tmp / f"tables{bits}", bits=bits)
        tables[bits] = tmp / f"tables{bits}"
        record[f"table_bytes_{bits}bit"] = summary["table_nbytes"]
        record[f"record_bytes_{bits}bit"] = summary["record_nbytes"]
    mole = load_model(args.mole)
    record["mole_routed_expert_params"] = mole.param_counts()["experts_routed"]
    record["table_bytes_16bit_vs_routed_experts_bf16"] = round(
        record["table_bytes_16bit"] / (2 * record["mole_routed_expert_params"]), 3)

    print("held-out perplexity ...", flush=True)
    ppl = {k: math.exp(nll_of_checkpoint(f, stream)) for k, f in folders.items()}
    for bits, folder in tables.items():
        ppl[f"mole_tables_{bits}bit"] = math.exp(nll_of_runtime(folder, stream, args.device))
    record["heldout_perplexity"] = {k: round(v, 3) for k, v in ppl.items()}
    record["heldout_perplexity_vs_dense"] = {k: round(v / ppl["dense"], 4) for k, v in ppl.items()}
    record["active_params_per_token"] = {
        k: load_model(f, model_types=("mole", "mixtral")).param_counts()["active_per_token"] for k, f in folders.items()}

    print("decode ...", flush=True)
    # Batch-1 decode of models this small is a chain of tiny kernels: a second thread adds only thread-pool
    # wake-ups (on a busy CPU, a wait for a core per parallel op), so decode runs single-threaded.
    torch.set_num_threads(args.decode_threads)
    table_rt = offload.load(tables[16], device=args.device, context=512)
    st = table_rt.store
    # The table model's device footprint: every dense tensor + KV cache + the workspace the expert store
    # reserves; the MoE gets exactly this as --vram, and what its own dense part leaves holds expert slots.
    moe_plan = offload.load(folders["moe"], device=args.device, context=512).store.plan
    budget = st.dense_bytes() + moe_plan.kv_bytes + moe_plan.margin_bytes
    runs = decode_rounds({
        "dense": (folders["dense"], {}),
        "mole_tables_disk": (tables[16], {"tables": "disk"}),
        "mole_tables_ram": (tables[16], {"tables": "ram"}),
        "mole_tables_4bit_disk": (tables[4], {"tables": "disk"}),
        "moe_offloaded_same_budget": (folders["moe"], {"vram": budget}),
        "moe_all_resident": (folders["moe"], {}),
    }, args.device, args.tokens, args.repeats)
    base = runs["dense"]["tokens_per_s"]
    for r in runs.values():
        r["tokens_per_s_vs_dense"] = round(r["tokens_per_s"] / base, 3) if base else None
    record["device_budget_bytes"] = budget
    record["decode"] = runs
    return record


# ---- the Mixtral-dimension slice ---------------------------------------------------------------------

def write_random_table(folder: Path, vocab: int, layers: int, experts: int, hidden: int) -> TableLayout:
    """A table folder's config.json and tables.bin with random fp16 rows (no dense part: only rows are timed)."""
    folder.mkdir(parents=True, exist_ok=True)
    layout = TableLayout.make(vocab, layers, experts, hidden, 16)
    g = torch.Generator().manual_seed(0)
    with open(folder / TABLE_FILE, "wb") as f:
        f.write(layout.header())
        block = max(1, (64 << 20) // layout.record_nbytes)
        for start in range(0, vocab, block):
            n = min(block, vocab - start)
            f.write(torch.randn(n * layout.record_nbytes // 2, generator=g).half().numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())  # clean pages: the cold-cache measurement can then evict them
    config = {"model_type": "mole_tables", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
              "shared_intermediate_size": 14336, "num_local_experts": experts, "num_experts_per_tok": experts,
              "tables": {"file": TABLE_FILE, "bits": 16}}
    (folder / "config.json").write_text(json.dumps(config))
    return layout


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def time_gathers(store: TableStore, steps: list[list[int]], device: str) -> float:
    """Seconds per step to have the rows of every layer for the step's ids on the compute device."""
    L = store.layout.layers
    sync(device)
    t0 = time.perf_counter()
    for ids in steps:
        store.begin(0, torch.tensor(ids))
        for layer in range(L):
            store.rows(layer)
        sync(device)
    return (time.perf_counter() - t0) / len(steps)


def sequential_read(path: Path, nbytes: int) -> float:
    """Cold sequential read bandwidth of the file's first `nbytes` (bytes/s): the disk's own baseline."""
    drop_cache(path)
    buf = bytearray(8 << 20)
    t0 = time.perf_counter()
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < nbytes:
            n = f.readinto(buf)
            if not n:
                break
            done += n
    return done / (time.perf_counter() - t0)


def memcpy_bandwidth(nbytes: int = 256 << 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    return 3 * nbytes / (time.perf_counter() - t0)


def mixtral_slice(args, tmp: Path) -> dict:
    folder = tmp / "slice"
    L, N, D, V = args.slice_layers, args.slice_experts, 4096, 32000
    print(f"slice: writing a {V} x {L} x {N} x {D} fp16 table ...", flush=True)
    layout = write_random_table(folder, V, L, N, D)
    path = folder / TABLE_FILE
    ckpt = SimpleNamespace(raw_config=json.loads((folder / "config.json").read_text()), path=folder, locations={})
    R = layout.record_nbytes
    out = {"vocab": V, "layers": L, "experts": N, "hidden": D, "bits": 16, "record_bytes": R,
           "table_bytes": layout.file_nbytes, "tokens_timed": args.slice_tokens}

    full = 32 * 8 * D * 2  # Mixtral: 32 layers x 8 experts x 4096 fp16 values per token
    per_full = max(1, full // R)  # ids whose records add up to one full-Mixtral token's rows
    order = torch.randperm(V, generator=torch.Generator().manual_seed(1)).tolist()
    n = args.slice_tokens
    singles = [[i] for i in order[:n]]                                   # decode: one id per step
    # sorted, as one record's bytes would arrive: the time is the gather's, not a reordering's
    bulks = [sorted(order[n + k * per_full: n + (k + 1) * per_full]) for k in range(max(1, n // per_full))]
    out["full_mixtral_rows_bytes_per_token"] = full
    out["ids_per_full_mixtral_step"] = per_full

    def measure(store: TableStore) -> dict:
        one = time_gathers(store, singles, args.device)
        bulk = time_gathers(store, bulks, args.device)
        return {"ms_per_token": round(one * 1e3, 4), "gather_GBps": round(R / one / 1e9, 3),
                "ms_per_full_mixtral_token_rows": round(bulk * 1e3, 3),
                "full_mixtral_GBps": round(per_full * R / bulk / 1e9, 3)}

    drop_cache(path)
    disk = TableStore(ckpt, torch.device(args.device), torch.float16, tables="disk")
    out["disk_cold"] = measure(disk)  # once: the first touch of these ids is the only cold one
    t0 = time.perf_counter()
    ram = TableStore(ckpt, torch.device(args.device), torch.float16, tables="ram")
    load_s = time.perf_counter() - t0
    # Page cache and RAM: interleaved rounds, the median of each figure (a shared machine is noisy).
    rounds = [(measure(disk), measure(ram)) for _ in range(args.repeats)]
    for i, name in enumerate(("disk_page_cache", "ram")):
        out[name] = {k: statistics.median(r[i][k] for r in rounds) for k in rounds[0][i]}
    seq_bw = sequential_read(path, min(layout.file_nbytes, 1 << 30))
    mem_bw = memcpy_bandwidth()
    out["disk_cold"]["full_mixtral_vs_sequential_read"] = round(out["disk_cold"]["full_mixtral_GBps"] * 1e9 / seq_bw, 3)
    for name in ("disk_page_cache", "ram"):
        out[name]["full_mixtral_vs_memcpy"] = round(out[name]["full_mixtral_GBps"] * 1e9 / mem_bw, 3)
    out["ram_load_seconds"] = round(load_s, 2)
    out["sequential_read_GBps"] = round(seq_bw / 1e9, 3)
    out["memcpy_GBps"] = round(mem_bw / 1e9, 3)
    out["full_mixtral_rows_vs_one_fp16_expert"] = round(full / (3 * 4096 * 14336 * 2), 5)
    out["cold_is_cold"] = "page cache dropped with POSIX_FADV_DONTNEED; a virtual disk may still be cached by its host"
    del disk, ram
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--mole", type=Path, default=DEMO_DIR, help="MoLE checkpoint (default: the shipped one)")
    p.add_argument("--dense", type=Path, default=RUNS / "dense", help="dense baseline (scripts/train_mole.py)")
    p.add_argument("--moe", type=Path, default=RUNS / "moe", help="top-2 MoE baseline (scripts/train_mole.py)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per measured generation")
    p.add_argument("--repeats", type=int, default=7, help="interleaved measured rounds (median reported)")
    p.add_argument("--threads", type=int, default=1, help="threads for the perplexity passes")
    p.add_argument("--decode-threads", type=int, default=1, help="threads for decode and the table slice")
    p.add_argument("--no-slice", action="store_true")
    p.add_argument("--slice-layers", type=int, default=2)
    p.add_argument("--slice-experts", type=int, default=4)
    p.add_argument("--slice-tokens", type=int, default=200)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    record = {"benchmark": "bench/bench_mole.py", "device": device_name(args.device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").is_dir() else None) as tmp:
        record["small_models"] = small_models(args, Path(tmp))
        if not args.no_slice:
            torch.set_num_threads(args.decode_threads)
            record["mixtral_slice"] = mixtral_slice(args, Path(tmp))
    out = args.out or RESULTS / f"mole-{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    save_record(record, out)
    print(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
