"""Train the small MoLE model shipped in lut/demo_model/, and the dense and top-2 MoE baselines it is
compared with (bench/bench_mole.py), on the demo model's corpus and tokenizer.

    python scripts/train_mole.py                  # all three, one after the other (times below)
    python scripts/train_mole.py --only mole      # just the shipped model

What it does, in order:
1. reads the demo tokenizer (offload/demo_model/tokenizer.json, 4096 tokens) and packs the "train" and
   "heldout" splits of `offload.demo.corpus` as `<s> topic </s>` streams, as scripts/train_demo.py does;
2. trains, with the same recipe (steps, batch, sequence length, AdamW with warmup and cosine decay, seed),
   three models of the same attention and the same multiply-adds per token (see lut/model.py):
     dense  one SiLU-gated FFN of 640 per layer
     moe    8 experts of 320, top-2 (the demo model's shape), load-balancing loss 0.01
     mole   a shared FFN of 640 on the hidden state + 4 experts of 320 on the token embedding, all four
            mixed by a softmax router (their outputs become table rows: `moe-offload lut build`)
   4 layers, hidden 192, 6 query / 2 key-value heads of 32, tied embeddings, 512 positions;
3. writes the MoLE checkpoint (bfloat16, config.json model_type "mole", the demo tokenizer files, a
   README with the numbers) to lut/demo_model/ and the baselines as Mixtral folders to runs/mole/{dense,moe}
   (not shipped); every folder is built beside its target and swapped in at the end;
4. reports held-out loss of each, measured on the bfloat16 weights as written, in runs/mole/train.json.

Same seed, thread count and library versions give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from outfolder import replaceable, swap_in, work_folder  # noqa: E402
from lut.config import MoLEConfig  # noqa: E402
from lut.model import MoLEForCausalLM, load_model, save_model, windowed_nll  # noqa: E402
from offload.demo import DEMO_DIR, documents  # noqa: E402

MOLE_DIR = REPO / "lut" / "demo_model"
RUNS = REPO / "runs" / "mole"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
PROMPTS = ("The for statement", "Exceptions are", "The import statement", "The assert statement")
KINDS = ("mole", "dense", "moe")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=KINDS, action="append", help="train only these (repeatable)")
    p.add_argument("--tokenizer-dir", type=Path, default=DEMO_DIR, help="folder with the demo tokenizer files")
    p.add_argument("--mole-out", type=Path, default=MOLE_DIR)
    p.add_argument("--runs", type=Path, default=RUNS, help="where the baselines and the report go")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux", type=float, default=0.01, help="MoE load-balancing loss coefficient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="1: on a shared 2-core machine, waits for the second core cost more than it gives")
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args()


def make_config(kind: str, vocab: int) -> MoLEConfig:
    common = dict(vocab_size=vocab, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, ffn=kind)
    if kind == "dense":
        return MoLEConfig(intermediate_size=640, num_local_experts=1, num_experts_per_tok=1, **common)
    if kind == "moe":
        return MoLEConfig(intermediate_size=320, num_local_experts=8, num_experts_per_tok=2, **common)
    return MoLEConfig(intermediate_size=320, shared_intermediate_size=640, num_local_experts=4,
                      num_experts_per_tok=4, **common)


def load_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        sys.exit(f"{path}: missing. The MoLE model uses the demo model's tokenizer: train the demo first "
                 f"(python scripts/train_demo.py) or pass --tokenizer-dir.")
    return Tokenizer.from_file(str(path))


def pack(tok, docs: list[str]) -> torch.Tensor:
    """One token stream: <s> doc </s> <s> doc </s> ..."""
    ids: list[int] = []
    for doc in docs:
        ids += [1] + tok.encode(doc, add_special_tokens=False).ids + [2]
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to 10%


def train(model: MoLEForCausalLM, stream: torch.Tensor, args, name: str) -> dict:
    gen = torch.Generator().manual_seed(args.seed)  # same batches for every model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    model.train()
    t0, smooth = time.time(), None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        starts = torch.randint(0, len(stream) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([stream[s:s + args.seq + 1] for s in starts])  # [B, seq+1]
        logits, aux = model(batch[:, :-1])
        lm_loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss = lm_loss + args.aux * aux  # aux is 0 for dense and MoLE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm = lm_loss.item()
        smooth = lm if smooth is None else 0.95 * smooth + 0.05 * lm
        if (step + 1) % args.log_every == 0 or step == 0:
            elapsed, aux_now = time.time() - t0, float(torch.as_tensor(aux).detach())  # detached: no warning
            print(f"{name:5s} step {step + 1:4d}/{args.steps}  lr {lr_at(step, args):.2e}  loss {lm:.3f} "
                  f"(avg {smooth:.3f})  aux {aux_now:.3f}  {(step + 1) * args.batch * args.seq / elapsed:,.0f} tok/s"
                  f"  {elapsed:4.0f}s", flush=True)
    return {"train_seconds": time.time() - t0, "last_train_loss_avg": smooth}


@torch.no_grad()
def greedy(model: MoLEForCausalLM, tok, prompt: str, n: int = 30) -> str:
    ids = [1] + tok.encode(prompt, add_special_tokens=False).ids
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == 2:
            break
    return tok.decode(ids[1:])


def write_readme(folder: Path, report: dict, args) -> None:
    r = report["mole"]
    c = r["params"]
    others = "\n".join(f"| {k} | {v['heldout_loss']:.3f} | {math.exp(v['heldout_loss']):.2f} | {v['params']['active_per_token']:,} "
                       f"| {v['params']['total']:,} |" for k, v in report.items() if k != "mole")
    gens = "\n".join(f"- `{p}` -> {json.dumps(t)}" for p, t in r["samples"].items())
    files = "\n".join(f"| {p.name} | {p.stat().st_size:,} |" for p in sorted(folder.iterdir()) if p.name != "README.md")
    text = f"""# The MoLE demo model

A small Mixture-of-Lookup-Experts model (model_type `mole`, format in `lut/model.py` and `lut/config.py`)
trained from scratch on the demo model's corpus (`offload.demo.corpus("train")`, the Python
reference-manual topics) with the demo tokenizer (copied here). It is the input of
`moe-offload lut build lut/demo_model DST`, whose output folder `moe-offload generate DST ...` serves with
the expert tables on disk or in RAM. The tables are not shipped (fp16 they are
vocab 4096 x 4 layers x 4 experts x 192 x 2 bytes = 25 MB): build them, a few seconds.

Made by `python scripts/train_mole.py` (Python {sys.version.split()[0]}, torch {torch.__version__},
{args.threads} CPU threads, seed {args.seed}): {args.steps} steps of {args.batch} x {args.seq} tokens, AdamW
(peak lr {args.lr}, {args.warmup} warmup steps, cosine to 10%, weight decay {args.weight_decay});
{r["train_seconds"]:.0f} s of training. The dense and top-2 MoE baselines were trained by the same command
with the same recipe and batches (runs/mole/, not shipped).

## Shape
4 layers, hidden 192, 6 query / 2 key-value heads of 32, tied embeddings, vocab 4096, 512 positions.
Each layer: a shared SiLU-gated FFN of 640 on the hidden state, and 4 routed experts (FFN 320) on the
layer's RMSNorm of the token's embedding, mixed by a softmax over all 4 (no top-k).

| parameters | count |
|---|---|
| total | {c["total"]:,} |
| routed experts (become tables) | {c["experts_routed"]:,} |
| active per token (multiply-adds: attention, shared FFN, router, lm_head) | {c["active_per_token"]:,} |
| table values looked up per token (4 layers x 4 experts x 192) | {c["table_values_per_token"]:,} |

## Quality
Held-out loss (nats per token, {args.seq}-token windows, on the bfloat16 weights run in float32):

| model | held-out loss | perplexity | active params per token | total params |
|---|---|---|---|---|
| mole (this) | {r["heldout_loss"]:.3f} | {math.exp(r["heldout_loss"]):.2f} | {c["active_per_token"]:,} | {c["total"]:,} |
{others}

Greedy continuations (`<s>` prepended):

{gens}

## Files
| file | bytes |
|---|---|
{files}
"""
    (folder / "README.md").write_text(text)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    kinds = args.only or list(KINDS)
    defaults = {"mole": (args.mole_out, MOLE_DIR), "dense": (args.runs / "dense", RUNS / "dense"),
                "moe": (args.runs / "moe", RUNS / "moe")}
    outs = {kind: replaceable(*defaults[kind]) for kind in kinds}
    tok = load_tokenizer(args.tokenizer_dir)
    train_stream, heldout_stream = pack(tok, documents("train")), pack(tok, documents("heldout"))
    print(f"train {len(train_stream):,} tokens, held-out {len(heldout_stream):,} tokens", flush=True)
    args.runs.mkdir(parents=True, exist_ok=True)
    report_path = args.runs / "train.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}

    for kind in kinds:
        torch.manual_seed(args.seed)
        model = MoLEForCausalLM(make_config(kind, tok.get_vocab_size())).init_weights(args.seed)
        result = train(model, train_stream, args, kind)
        out = outs[kind]
        tmp = work_folder(out)
        save_model(model, tmp, torch.bfloat16)
        for name in TOKENIZER_FILES:
            if (args.tokenizer_dir / name).is_file():
                shutil.copy2(args.tokenizer_dir / name, tmp / name)
        # Measured on what was written, read back as a user would.
        model = load_model(tmp, torch.float32, model_types=("mole", "mixtral"))
        report[kind] = {
            **result, "params": model.param_counts(),
            "heldout_loss": windowed_nll(model, heldout_stream, args.seq),
            "train_loss": windowed_nll(model, train_stream[: len(heldout_stream)], args.seq),
            "samples": {p: greedy(model, tok, p) for p in PROMPTS},
            "recipe": {k: getattr(args, k) for k in ("steps", "batch", "seq", "lr", "warmup", "weight_decay", "aux",
                                                     "seed", "threads")},
            "torch": torch.__version__,
        }
        print(f"{kind}: held-out loss {report[kind]['heldout_loss']:.3f} "
              f"(ppl {math.exp(report[kind]['heldout_loss']):.2f}), {result['train_seconds']:.0f}s", flush=True)
        if kind == "mole":
            write_readme(tmp, report, args)
        swap_in(tmp, out)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    if "mole" in report:  # refresh the README's comparison table with whatever baselines exist now
        write_readme(args.mole_out, report, args)


if __name__ == "__main__":
    main()
