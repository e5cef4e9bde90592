"""Train a small fine-grained MoE for the cache and prefetch benchmarks: a Qwen3-MoE (`model_type`
"qwen3_moe", Hugging Face layout and names) with 32 experts per layer and top-4 routing, on the demo
model's corpus and tokenizer, so that its routing has a trained model's locality (random routers have none).

    python scripts/train_finegrained.py                 # writes runs/qwen3-demo (not shipped; ~15 min)
    python scripts/train_finegrained.py --steps 200     # a quicker, weaker one

The recipe is the demo model's (scripts/train_demo.py: the same packed `<s> topic </s>` stream of the
"train" split, AdamW with warmup and cosine decay, dropout 0.1 while training, load-balancing loss 0.01,
seed 0, one thread) with Qwen3-MoE's architecture: 4 layers, hidden 192, 6 query / 2 key-value heads of 32
with q/k norms, 32 experts of ffn 80, top-4 with renormalized weights, tied embeddings: its experts are 4x
smaller than the demo model's (ffn 80 against 320) and a token uses 4 of 32 per layer instead of 2 of 8.
The folder is built beside its target and swapped in at the end.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from outfolder import replaceable, swap_in, work_folder  # noqa: E402
from train_demo import add_dropout, evaluate, pack, routing_stats, train, write_routing_prior  # noqa: E402
from offload.demo import DEMO_DIR, documents  # noqa: E402

OUT = REPO / "runs" / "qwen3-demo"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help="model folder to (re)write")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=60, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-ffn", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200)
    return p.parse_args()


def make_config(args, vocab_size: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=320, moe_intermediate_size=args.expert_ffn,
        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        output_router_logits=True, router_aux_loss_coef=0.01, bos_token_id=1, eos_token_id=2, pad_token_id=None)


def param_counts(model) -> dict[str, int]:
    """Parameters: total (the tied head once), routed experts, dense, one expert, active per token."""
    cfg = model.config
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    one = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return {"total": total, "expert": expert, "dense": total - expert, "one_expert": one,
            "active_per_token": total - expert + cfg.num_hidden_layers * cfg.num_experts_per_tok * one}


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, Qwen3MoeForCausalLM

    t_start = time.time()
    out = replaceable(args.out, OUT)
    tmp = work_folder(out)
    tok = Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / name, tmp / name)
    train_stream, heldout_stream = pack(tok, documents("train")), pack(tok, documents("heldout"))

    model = Qwen3MoeForCausalLM(make_config(args, tok.get_vocab_size()))
    model.config._experts_implementation = "grouped_mm"  # as train_demo: one grouped kernel, same math
    params = param_counts(model)
    add_dropout(model, args.dropout)
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()), flush=True)
    result = train(model, train_stream, heldout_stream, args)
    print(f"trained {args.steps} steps in {result['train_seconds']:.0f}s", flush=True)

    model.config._experts_implementation = None
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
    write_routing_prior(tmp)
    model = Qwen3MoeForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    heldout_loss = evaluate(model, heldout_stream, args.seq)
    stats = routing_stats(model, heldout_stream, args.seq)
    report = {"command": " ".join(["python scripts/train_finegrained.py"] + sys.argv[1:]), "params": params,
              "train_seconds": result["train_seconds"], "heldout_loss": heldout_loss,
              "heldout_ppl": math.exp(heldout_loss), "routing": stats}
    (tmp / "train.json").write_text(json.dumps(report, indent=1) + "\n")
    (tmp / "README.md").write_text(
        f"# A small fine-grained MoE (Qwen3-MoE architecture)\n\nMade by `{report['command']}`: "
        f"{args.experts} experts of ffn {args.expert_ffn} per layer, top-{args.top_k}, on the demo model's corpus "
        f"and tokenizer; {args.steps} steps in {result['train_seconds']:.0f} s. Held-out loss {heldout_loss:.3f} "
        f"(perplexity {math.exp(heldout_loss):.1f}). Routing statistics per layer: train.json.\n")
    swap_in(tmp, out)
    print(f"held-out loss {heldout_loss:.3f} (ppl {math.exp(heldout_loss):.1f}); wrote {out} "
          f"in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
