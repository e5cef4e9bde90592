"""Fine-grained experts: decode on a Qwen3-30B-A3B-shaped slice, where 8 of 128 small experts per layer make
per-expert overheads (Python calls, host syncs, copy launches, small reads) matter as they never do for
Mixtral's 352 MB experts.

What it measures, and against what (every figure is a ratio against a baseline measured in this run):
  * the slice: Qwen3-30B-A3B's real layer dimensions (D 2048, 128 experts of ffn 768, top-8, 32 query and
    4 key-value heads of 128, q/k norms), random bf16 weights, a few layers (--layers), Hub names; the
    vocabulary is cut to the demo tokenizer's 4096, since a head of 151,936 rows would dominate a slice of
    two layers where the real model spreads its time over 48;
  * contenders, each loaded (one at a time: a copy of the slice is GBs), warmed up, then decoded --tokens
    greedy tokens --repeats times (median): (c) moe-offload with every expert resident; (a) moe-offload with device slots for a quarter
    of the experts, router-ahead prefetch one layer; (c4) and (a4) the same with 4-bit experts
    (`convert --bits 4 --group-size 64`); (b) transformers' Qwen3MoeForCausalLM on the same folder
    without offloading, the reference implementation;
  * for each moe-offload contender: hit rate, bytes host->device per token and the transfer bound (those
    bytes over this machine's measured copy bandwidth: pinned host->device on a GPU, memcpy on a CPU);
    expert calls per token and, from one profiled run (offload.profile), how decode time splits into
    dense work, expert compute, copy waits and the rest, and the time per expert call.

    python bench/bench_finegrained.py                        # CPU: 2 layers, float32 compute
    python bench/bench_finegrained.py --layers 4 --device cuda

Writes bench/results/finegrained-<device>.json. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import offload  # noqa: E402
from common import RESULTS, device_name, save_record, sync  # noqa: E402
from offload.convert import convert  # noqa: E402
from offload.demo import DEMO_DIR  # noqa: E402
from offload.profile import profile_runtime  # noqa: E402
from offload.store.timing import copy_bandwidth  # noqa: E402
from quant import pinned  # noqa: E402

D, F, E, K, H, KV, HD, V = 2048, 768, 128, 8, 32, 4, 128, 4096
PROMPT = "The for statement is used to iterate over the elements of a sequence"


def write_slice(folder: Path, layers: int, seed: int = 0) -> None:
    """Qwen3-30B-A3B's layer dimensions, random bf16 weights, `layers` layers, Hub names; the demo tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": D,
              "intermediate_size": 6144, "moe_intermediate_size": F, "num_hidden_layers": layers,
              "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": HD, "num_experts": E,
              "num_experts_per_tok": K, "norm_topk_prob": True, "vocab_size": V, "rms_norm_eps": 1e-6,
              "rope_theta": 1e6, "max_position_embeddings": 40960, "tie_word_embeddings": False,
              "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
              "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / name, folder / name)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rnd(V, D), "model.norm.weight": ones(D), "lm_head.weight": rnd(V, D)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors.update({f"{p}.input_layernorm.weight": ones(D), f"{p}.post_attention_layernorm.weight": ones(D),
                        f"{p}.self_attn.q_proj.weight": rnd(H * HD, D), f"{p}.self_attn.k_proj.weight": rnd(KV * HD, D),
                        f"{p}.self_attn.v_proj.weight": rnd(KV * HD, D), f"{p}.self_attn.o_proj.weight": rnd(D, H * HD),
                        f"{p}.self_attn.q_norm.weight": ones(HD), f"{p}.self_attn.k_norm.weight": ones(HD),
                        # A wider router than the weights' scale: random routing would otherwise be near-uniform.
                        f"{p}.mlp.gate.weight": rnd(E, D, scale=0.5)})
        for e in range(E):
            q = f"{p}.mlp.experts.{e}"
            tensors.update({f"{q}.gate_proj.weight": rnd(F, D), f"{q}.up_proj.weight": rnd(F, D),
                            f"{q}.down_proj.weight": rnd(D, F)})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


class Ours:
    """A loaded moe-offload runtime and its greedy decode of the prompt."""

    def __init__(self, folder: Path, device: str, dtype: str, tokens: int, **options):
        self.rt = offload.load(folder, device=device, dtype=dtype, context=256, **options)
        self.ids, self.tokens, self.device = self.rt.encode(PROMPT), tokens, device
        self.run()  # warm-up: the caches hold what a running generation would have in them

    def run(self) -> float:
        """Seconds per decode token of one greedy generation (prefill excluded)."""
        list(self.rt.generate_ids(self.ids, self.tokens))
        s = self.rt.stats()
        self.last = s
        return s["decode_s"] / max(1, s["new_tokens"] - 1)


class Reference:
    """transformers' own implementation on the same folder, no offloading, the same dtype and greedy tokens."""

    def __init__(self, folder: Path, device: str, dtype: torch.dtype, ids: list[int], tokens: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.ids, self.tokens, self.device = torch.tensor([ids], device=device), tokens, device
        self.run()

    @torch.no_grad()
    def run(self) -> float:
        out = self.model(self.ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(self.tokens - 1):
            out = self.model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(self.device)
        return (time.perf_counter() - t0) / (self.tokens - 1)


def copy_rate(device: str, blob: int) -> float:
    """Bytes/s of copying one expert blob to the compute device: pinned H2D on a GPU, memcpy from cold RAM
    on a CPU (what the store's copy is there)."""
    if device.startswith("cuda"):
        src = pinned.empty(blob, pin=True).fill_(1)
        return copy_bandwidth(src, torch.empty(blob, dtype=torch.uint8, device=device))
    src = torch.ones((max(1, (256 << 20) // blob), blob), dtype=torch.uint8)
    return copy_bandwidth(src, torch.empty(blob, dtype=torch.uint8))


def breakdown(runner: Ours) -> dict:
    """One profiled generation: decode time shares and time per expert call."""
    prof = profile_runtime(runner.rt, runner.ids, runner.tokens, prompt=PROMPT)
    t = prof.record["totals"]
    decode = [r for r in prof.record["per_token"][1:] if r["token"] is not None]
    calls = sum(r["expert_hits"] + r["expert_misses"] for r in decode)
    parts = t["decode_time_s"]
    total = sum(parts.values()) or 1.0
    return {"decode_time_shares": {k: round(v / total, 4) for k, v in parts.items()},
            "expert_calls_per_token": calls / max(1, len(decode)),
            "expert_s_per_call": parts["expert_s"] / max(1, calls),
            "copy_wait_s_per_token": parts["copy_wait_s"] / max(1, len(decode)),
            "verdict": prof.record["verdict"]["text"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="compute dtype of every contender (default: float32 on a CPU, "
                                                   "whose bfloat16 matmuls are slow, bfloat16 on a GPU)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens per measured generation")
    ap.add_argument("--repeats", type=int, default=3, help="measured generations per contender (median reported)")
    ap.add_argument("--fraction", type=float, default=0.25, help="device slots for this fraction of the experts")
    ap.add_argument("--no-hf", action="store_true", help="skip (b), transformers")
    ap.add_argument("--work", type=Path, default=None, help="folder for the slice (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = args.device
    args.dtype = args.dtype or ("bfloat16" if dev.startswith("cuda") else "float32")
    out = args.out or RESULTS / f"finegrained-{'gpu' if dev.startswith('cuda') else 'cpu'}.json"
    work = Path(args.work or tempfile.mkdtemp(prefix="finegrained-"))
    folder, q4 = work / "qwen3-slice", work / "qwen3-slice-q4"
    record = {"benchmark": "finegrained", "device": device_name(dev), "torch": torch.__version__,
              "load_average_at_start": os.getloadavg(),  # a busy machine slows every contender, unevenly
              "dtype": args.dtype, "slice": {"model": "Qwen3-30B-A3B layer dimensions, random weights",
                                             "layers": args.layers, "hidden": D, "experts": E, "expert_ffn": F,
                                             "top_k": K, "vocab": V},
              "tokens": args.tokens, "repeats": args.repeats, "contenders": {}}
    try:
        if not (folder / "model.safetensors").is_file():
            print(f"writing the slice ({args.layers} layers) to {folder}")
            write_slice(folder, args.layers)
        if not q4.is_dir():
            print("converting its experts to 4 bits")
            convert(folder, q4, bits=4, group_size=64)
        experts = args.layers * E
        contenders = {"c: every expert resident": (folder, None),
                      "a: a quarter of the experts on the device": (folder, args.fraction),
                      "c4: 4-bit, every expert resident": (q4, None),
                      "a4: 4-bit, a quarter on the device": (q4, args.fraction),
                      "b: transformers Qwen3MoeForCausalLM, no offloading": (folder, "reference")}
        if args.no_hf:
            contenders.popitem()
        base = None
        # One contender loaded at a time (a slice of real dimensions in float32 is GBs per copy), each warmed
        # up, then measured --repeats times back to back (median).
        for name, (path, budget) in contenders.items():
            print(f"loading {name}")
            if budget == "reference":
                ids = offload.load(folder, device=dev, dtype=args.dtype, context=256).encode(PROMPT)
                runner = Reference(folder, dev, getattr(torch, args.dtype), ids, args.tokens)
            else:
                options = {"prefetch": 1}
                probe = offload.load(path, device=dev, dtype=args.dtype, context=256, ram=f"{2 * K * 32}MiB")
                plan = probe.store.plan
                probe.close()
                slots = max(2 * K, int(experts * budget)) if budget else experts
                options["vram"] = plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + slots * plan.blob_bytes
                if not budget:  # every expert stays on the device after the warm-up: no host tier needed
                    options["ram"] = 2 * K * plan.blob_bytes
                runner = Ours(path, dev, args.dtype, args.tokens, **options)
            times = [runner.run() for _ in range(args.repeats)]
            s_per_token = statistics.median(times)
            base = base or s_per_token
            row = {"s_per_token": s_per_token, "runs_s_per_token": times, "vs_c_all_resident": round(s_per_token / base, 3)}
            if isinstance(runner, Ours):
                s, blob = runner.last, runner.rt.store.layout.nbytes
                uses = s["expert_hits"] + s["expert_misses"]
                h2d = s["bytes_h2d"] / max(1, s["new_tokens"])
                bound = h2d / copy_rate(dev, blob)
                row.update({"device_slots": s["device_slots"], "host_slots": s["host_slots"], "blob_bytes": blob,
                            "hit_rate": round(s["expert_hits"] / uses, 4) if uses else None,
                            "bytes_h2d_per_token": h2d, "transfer_bound_s_per_token": bound,
                            "time_vs_transfer_bound": round(s_per_token / bound, 2) if bound else None,
                            **breakdown(runner)})
                runner.rt.close()
            del runner
            print(f"  {s_per_token * 1e3:.1f} ms/token")
            record["contenders"][name] = row
            save_record(record, out)
        ref = record["contenders"].get("b: transformers Qwen3MoeForCausalLM, no offloading")
        if ref:
            record["c_vs_b"] = round(base / ref["s_per_token"], 3)
        save_record(record, out)
        print(json.dumps({n: {k: v for k, v in row.items() if k in ("s_per_token", "vs_c_all_resident", "hit_rate",
                                                                      "time_vs_transfer_bound", "expert_s_per_call")}
                          for n, row in record["contenders"].items()}, indent=1))
        print(f"wrote {out}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
