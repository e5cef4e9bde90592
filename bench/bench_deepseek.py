"""DeepSeek-V2-Lite: decode on a slice of its real dimensions, where multi-head latent attention caches a
compressed latent per token and 6 of 64 small experts (plus 2 shared ones) run per layer.

What it measures, and against what (every figure is a ratio against a baseline measured in this run):
  * the slice: DeepSeek-V2-Lite's layer dimensions (D 2048, 16 heads, kv_lora_rank 512, qk_nope/rope/v head
    dims 128/64/128, no q_lora_rank, 64 routed experts of ffn 1408, top-6, 2 shared experts, YaRN as its
    config.json sets it), random bf16 weights, a few layers (--layers), every one of them sparse (the real
    model's one dense first layer would only add a fixed cost), Hub names; the vocabulary cut to the demo
    tokenizer's 4096;
  * contenders, loaded one at a time, warmed up, then --repeats greedy generations of --tokens tokens: (c)
    moe-offload with every expert resident, the baseline; (a) moe-offload with device slots for a quarter of
    the experts and router-ahead prefetch one layer; (b) transformers' DeepseekV2ForCausalLM on the same
    folder, no offloading. Time per decode step: the median step of each generation, median over the
    generations, by bench/common.step_clock (this process's CPU time on a CPU with one torch thread);
  * for (a): hit rate, bytes host->device per token, and the transfer bound (those bytes over this machine's
    measured copy bandwidth);
  * KV cache bytes per token per layer: moe-offload's latent cache (measured: the cache tensor over its
    positions and layers), transformers' cache after the same generation (measured from its tensors), and
    an expanded cache of per-head keys and values (16 heads x (128 + 64) key and 128 value dims, computed).

    python bench/bench_deepseek.py                       # CPU: 2 layers, float32 compute
    python bench/bench_deepseek.py --layers 4 --device cuda

Writes bench/results/deepseek-<cpu|gpu>.json. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import offload  # noqa: E402
from bench_finegrained import copy_rate  # noqa: E402
from common import RESULTS, device_name, load_average, save_record, step_clock, sync  # noqa: E402
from offload.demo import DEMO_DIR  # noqa: E402
from offload.models import expected_shapes, read_config  # noqa: E402

D, H, R, DN, DR, DV, E, F, K, SHARED, V = 2048, 16, 512, 128, 64, 128, 64, 1408, 6, 2, 4096
PROMPT = "The for statement is used to iterate over the elements of a sequence"


def slice_config(layers: int) -> dict:
    """DeepSeek-V2-Lite's config.json with `layers` layers, all sparse, and the demo tokenizer's vocabulary."""
    return {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "hidden_size": D,
            "intermediate_size": 10944, "moe_intermediate_size": F, "num_hidden_layers": layers,
            "num_attention_heads": H, "num_key_value_heads": H, "q_lora_rank": None, "kv_lora_rank": R,
            "qk_nope_head_dim": DN, "qk_rope_head_dim": DR, "v_head_dim": DV, "n_routed_experts": E,
            "num_experts_per_tok": K, "n_shared_experts": SHARED, "first_k_dense_replace": 0, "moe_layer_freq": 1,
            "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
            "routed_scaling_factor": 1.0, "scoring_func": "softmax", "vocab_size": V, "rms_norm_eps": 1e-6,
            "rope_theta": 10000, "max_position_embeddings": 163840, "tie_word_embeddings": False,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
            "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def write_slice(folder: Path, layers: int, seed: int = 0) -> None:
    """Every tensor the deepseek_v2 family expects for this config, random bf16 (norms 1), and the demo
    tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = slice_config(layers)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / name, folder / name)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(read_config(config, "slice")).items():
        if "norm" in name:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            # A wider router than the weights' scale: random routing would otherwise be near-uniform.
            scale = 0.5 if name.endswith("mlp.gate.weight") else 0.02
            tensors[name] = (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def median_step(tokens, clock) -> float:
    """The median time between consecutive tokens of a generation (its decode steps; the prefill excluded)."""
    times, last = [], None
    for _ in tokens:
        now = clock()
        if last is not None:
            times.append(now - last)
        last = now
    return statistics.median(times)


class Ours:
    def __init__(self, folder: Path, device: str, dtype: str, tokens: int, **options):
        self.rt = offload.load(folder, device=device, dtype=dtype, context=256, **options)
        self.ids, self.tokens, self.device = self.rt.encode(PROMPT), tokens, device
        self.clock = step_clock(device)[1]
        self.run()  # warm-up

    def run(self) -> float:
        step = median_step(self.rt.generate_ids(self.ids, self.tokens), self.clock)
        self.last = self.rt.stats()
        return step

    def kv_bytes_per_token_per_layer(self) -> float:
        cache = self.rt.model.cache
        return cache.nbytes / (cache.length * self.rt.model.cfg.num_hidden_layers)


class Reference:
    """transformers' DeepseekV2ForCausalLM on the same folder, no offloading, greedy, its own KV cache."""

    def __init__(self, folder: Path, device: str, dtype: torch.dtype, ids: list[int], tokens: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.ids, self.tokens, self.device = torch.tensor([ids], device=device), tokens, device
        self.clock = step_clock(device)[1]
        self.run()

    @torch.no_grad()
    def steps(self):
        out = self.model(self.ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        yield token
        for _ in range(self.tokens - 1):
            out = self.model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            sync(self.device)
            yield token
        self.past = past

    def run(self) -> float:
        return median_step(self.steps(), self.clock)

    def kv_bytes_per_token_per_layer(self) -> float:
        tensors = [t for layer in self.past.layers for t in (layer.keys, layer.values)]
        positions = tensors[0].shape[-2]
        return sum(t.numel() * t.element_size() for t in tensors) / (positions * len(self.past.layers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="compute dtype of every contender (default: float32 on a CPU, "
                                                   "bfloat16 on a GPU)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens per measured generation")
    ap.add_argument("--repeats", type=int, default=3, help="measured generations per contender (median reported)")
    ap.add_argument("--fraction", type=float, default=0.25, help="device slots for this fraction of the experts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a CPU: steps timed by CPU time)")
    ap.add_argument("--no-hf", action="store_true", help="skip (b), transformers")
    ap.add_argument("--work", type=Path, default=None, help="folder for the slice (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if dev.startswith("cuda") else "float32")
    out = args.out or RESULTS / f"deepseek-{'gpu' if dev.startswith('cuda') else 'cpu'}.json"
    work = Path(args.work or tempfile.mkdtemp(prefix="deepseek-"))
    folder = work / "deepseek-v2-lite-slice"
    itemsize = getattr(torch, args.dtype).itemsize
    record = {"benchmark": "deepseek", "device": device_name(dev), "torch": torch.__version__,
              "load_average_at_start": load_average(), "clock": step_clock(dev)[0], "dtype": args.dtype,
              "slice": {"model": "DeepSeek-V2-Lite layer dimensions, random weights, every layer sparse",
                        "layers": args.layers, "hidden": D, "heads": H, "kv_lora_rank": R,
                        "qk_nope_rope_v_head_dims": [DN, DR, DV], "experts": E, "expert_ffn": F, "top_k": K,
                        "shared_experts": SHARED, "vocab": V},
              "tokens": args.tokens, "repeats": args.repeats, "contenders": {},
              "kv_cache_bytes_per_token_per_layer": {
                  # keys [H, Dn + Dr] and values [H, Dv] per token and layer
                  "expanded (per-head keys and values, computed)": H * (DN + DR + DV) * itemsize}}
    try:
        if not (folder / "model.safetensors").is_file():
            print(f"writing the slice ({args.layers} layers) to {folder}")
            write_slice(folder, args.layers)
        experts = args.layers * E
        contenders = {"c: every expert resident": None, "a: a quarter of the experts on the device": args.fraction,
                      "b: transformers DeepseekV2ForCausalLM, no offloading": "reference"}
        if args.no_hf:
            contenders.popitem()
        base = None
        kv = record["kv_cache_bytes_per_token_per_layer"]
        for name, budget in contenders.items():
            print(f"loading {name}")
            if budget == "reference":
                with offload.load(folder, device=dev, dtype=args.dtype, context=256) as rt:
                    ids = rt.encode(PROMPT)
                runner = Reference(folder, dev, getattr(torch, args.dtype), ids, args.tokens)
            else:
                probe = offload.load(folder, device=dev, dtype=args.dtype, context=256, ram=f"{2 * K * 32}MiB")
                plan = probe.store.plan
                probe.close()
                slots = max(2 * K, int(experts * budget)) if budget else experts
                options = {"prefetch": 1,
                           "vram": plan.dense_bytes + plan.kv_bytes + plan.margin_bytes + slots * plan.blob_bytes}
                if not budget:  # every expert stays on the device after the warm-up: no host tier needed
                    options["ram"] = 2 * K * plan.blob_bytes
                runner = Ours(folder, dev, args.dtype, args.tokens, **options)
            times = [runner.run() for _ in range(args.repeats)]
            s_per_token = statistics.median(times)
            base = base or s_per_token
            row = {"s_per_token": s_per_token, "runs_s_per_token": times,
                   "vs_c_all_resident": round(s_per_token / base, 3)}
            if isinstance(runner, Ours):
                kv.setdefault("moe-offload latent cache (measured)", runner.kv_bytes_per_token_per_layer())
                s, blob = runner.last, runner.rt.store.layout.nbytes
                uses = s["expert_hits"] + s["expert_misses"]
                h2d = s["bytes_h2d"] / max(1, s["new_tokens"])
                bound = h2d / copy_rate(dev, blob)
                row.update({"device_slots": s["device_slots"], "host_slots": s["host_slots"], "blob_bytes": blob,
                            "hit_rate": round(s["expert_hits"] / uses, 4) if uses else None,
                            "bytes_h2d_per_token": h2d, "transfer_bound_s_per_token": bound,
                            "time_vs_transfer_bound": round(s_per_token / bound, 2) if bound else None})
                runner.rt.close()
            else:
                kv["transformers' cache (measured)"] = runner.kv_bytes_per_token_per_layer()
            del runner
            print(f"  {s_per_token * 1e3:.1f} ms/token")
            record["contenders"][name] = row
            save_record(record, out)
        ref = record["contenders"].get("b: transformers DeepseekV2ForCausalLM, no offloading")
        if ref:
            record["c_vs_b"] = round(base / ref["s_per_token"], 3)
        latent = kv.get("moe-offload latent cache (measured)")
        if latent:
            record["kv_expanded_vs_latent"] = round(kv["expanded (per-head keys and values, computed)"] / latent, 2)
        save_record(record, out)
        print(json.dumps({"contenders": {n: {k: v for k, v in row.items() if k in ("s_per_token", "vs_c_all_resident",
                                                                                   "hit_rate", "time_vs_transfer_bound")}
                                         for n, row in record["contenders"].items()},
                          "kv_cache_bytes_per_token_per_layer": kv}, indent=1))
        print(f"wrote {out}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
