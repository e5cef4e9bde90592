"""Quantized experts: held-out perplexity, weight error and storage of our quantizer against HQQ.

What it measures, and against what (every figure also as a ratio against the fp32 baseline of this run):
  * the trained demo model (offload/demo_model), teacher-forced perplexity over the held-out text
    `offload.demo.corpus("heldout")`, in windows of WINDOW tokens each with bos prepended, through our
    runtime's forward (`offload.load(folder, device="cpu", dtype="float32")`, then
    `rt.model.forward(ids, 0, all_logits=True)`: the forward at position 0 overwrites the KV cache):
      - fp32: the original checkpoint (its bf16 weights computed in float32);
      - ours: `offload.convert.convert` at 8/4/3/2 bits (groups 64/64/64/16) into a temp folder;
      - HQQ: a temp Mixtral folder where every expert weight is HQQ's dequantized weight
        (tests/hqq_ref.py: hqq's Quantizer with its optimizer, fp16 scale and zero), float32 safetensors;
    note that our converted folders also store the dense (non-expert) weights in fp16, the HQQ folders
    keep them exact, so any dense rounding counts against ours;
  * storage per expert: our blob bytes (codes, fp16 scales and zeros, header) and bits/param, against
    HQQ counted as B bits per code + fp16 scale + fp16 zero per group (no header, ideal packing);
    ratios are against the fp32 expert (and bf16 as the checkpoint stores it);
  * how close each model's logits stay to fp32's over the same text: distance (Frobenius norm of the
    difference over that of fp32's logits centred per position) and how often the most likely next token is
    fp32's, ours vs HQQ;
  * relative Frobenius error of every expert matrix of the demo model (mean and max), ours vs HQQ;
  * `--dense-bits` 8 and 4 (attention projections quantized, group 64) on top of 4-bit experts: held-out
    perplexity against the same conversion with fp16 attention, the dense bytes on the device against
    fp16, and the attention matrices' relative error, ours vs HQQ at the same setting;
  * on a GPU only: time of one Mixtral-shaped expert (D=4096, F=14336) at batch 1 through the torch path
    (dequantize, then F.linear) and the fused Triton dequantize + GEMV kernels (when triton imports), and
    of one 4096 x 4096 attention projection through `quant.linear` both ways, each against an fp16 GEMV
    of the same shape (F.linear); on the CPU this part is skipped with a note.

    python bench/bench_quant.py            # writes bench/results/quant-<cpu|cuda>.json (or --out FILE)

Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import offload  # noqa: E402
import quant  # noqa: E402
from common import RESULTS, device_name, save_record  # noqa: E402
from hqq_ref import hqq_bits_per_param, hqq_dequantize, hqq_folder, relative_error  # noqa: E402
from offload.models import open_checkpoint  # noqa: E402
from offload.models.decoder import attention_shapes  # noqa: E402
from offload.models.mixtral import expert_names  # noqa: E402
from offload.convert import convert  # noqa: E402
from offload.formats.converted import DENSE_GROUP_SIZE, INFO_FILE, dense_format  # noqa: E402
from offload.store.memory import dense_bytes  # noqa: E402
from offload.demo import corpus  # noqa: E402
from offload.runtime import resolve_model_path  # noqa: E402

WINDOW = 256
SETTINGS = [(8, 64), (4, 64), (3, 64), (2, 16)]
NOTE = ("The demo model is small and memorizes its training text (see offload/demo_model/README.md: train "
        "perplexity far below held-out), so quantization noise can lower held-out perplexity slightly, as a "
        "regularizer would; compare ours vs HQQ at equal width rather than reading a ppl below fp32 as "
        "'better'. Our bits_per_param counts the whole blob (header and alignment per expert); per tensor "
        "(codes + fp16 scale + zero) it equals HQQ's B + 32/G.")


def perplexity(folder: Path, fp32: list | None = None) -> dict:
    """Held-out perplexity; with `fp32` (the list this fills on the fp32 run: that run's logits per window),
    also how close the logits are to fp32's: their distance (Frobenius norm of the difference over that of fp32's
    logits centred per position) and how often the most likely next token is fp32's."""
    rt = offload.load(folder, device="cpu", dtype="float32", context=WINDOW + 1)
    ids = rt.tokenizer.encode(corpus("heldout"))
    bos = rt.tokenizer.bos_id
    if ids and ids[0] == bos:
        ids = ids[1:]
    nll, count, diff2, spread2, same = 0.0, 0, 0.0, 0.0, 0
    start = time.perf_counter()
    for w, i in enumerate(range(0, len(ids) - 1, WINDOW)):
        chunk = ids[i:i + WINDOW]
        x = torch.tensor([bos] + chunk)
        logits = rt.model.forward(x, 0, all_logits=True)[:-1].float()  # position t predicts token t+1
        nll += float(F.cross_entropy(logits, x[1:], reduction="sum"))
        count += len(chunk)
        if fp32 is not None and w < len(fp32):
            ref = fp32[w]
            diff2 += float((logits - ref).square().sum())
            spread2 += float((ref - ref.mean(-1, keepdim=True)).square().sum())
            same += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        elif fp32 is not None:
            fp32.append(logits)
    out = {"ppl": math.exp(nll / count), "tokens": count, "seconds": round(time.perf_counter() - start, 2)}
    if spread2:
        out.update(logits_distance_vs_fp32=round(math.sqrt(diff2 / spread2), 5),
                   top1_same_as_fp32=round(same / count, 4))
    return out


def our_errors(src: Path, bits: int, group_size: int) -> list[float]:
    ckpt = open_checkpoint(src)
    cfg, out = ckpt.config, []
    for layer in range(cfg.num_hidden_layers):
        for e in range(cfg.num_local_experts):
            for name in expert_names(layer, e):
                w = ckpt.read(name, dtype=torch.float32)
                out.append(relative_error(w, quant.dequantize(quant.quantize(w, bits, group_size))))
    ckpt.close()
    return out


def gpu_timing() -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: the Mixtral-shaped expert timing runs on a GPU only"}
    D, Fd, dev = 4096, 14336, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    w1, w3 = (torch.randn(Fd, D, device=dev, generator=gen) * 0.02 for _ in range(2))
    w2 = torch.randn(D, Fd, device=dev, generator=gen) * 0.02
    x = torch.randn(1, D, device=dev, dtype=torch.float16)

    def clock(fn, reps=50):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps * 1e3  # microseconds

    h1, h2, h3 = w1.half(), w2.half(), w3.half()
    base = clock(lambda: F.linear(F.silu(F.linear(x, h1)) * F.linear(x, h3), h2))
    out = {"shape": {"hidden": D, "ffn": Fd, "batch": 1}, "fp16_gemv_us": round(base, 1), "widths": {}}
    fused = quant.kernels.fused_kernels() is not None
    if not fused:  # triton missing or broken: time the torch path only
        out["fused_note"] = "triton did not import: the torch path only"
    for bits, group in SETTINGS:
        layout = quant.expert_layout(D, Fd, bits, group)
        tensors = {}
        for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
            q = quant.quantize(w, bits, group)
            tensors.update({f"{name}.{part}": t.cpu() for part, t in q.parts.items()})
        blob = layout.pack(tensors).to(dev)
        views = layout.views(blob)
        row = {"expert_forward_us": round(clock(lambda: quant.expert_forward(layout, views, x, fused=False)), 1)}
        row["expert_forward_vs_fp16"] = round(row["expert_forward_us"] / base, 3)
        if fused:
            row["fused_us"] = round(clock(lambda: quant.expert_forward(layout, views, x, fused=True)), 1)
            row["fused_vs_fp16"] = round(row["fused_us"] / base, 3)
        out["widths"][f"{bits}-bit g{group}"] = row
    wq = torch.randn(D, D, device=dev, generator=gen) * 0.02
    hq = wq.half()
    base = clock(lambda: F.linear(x, hq))
    out["attention_projection"] = {"shape": [D, D], "fp16_gemv_us": round(base, 1)}
    for bits in (8, 4):
        q = quant.quantize(wq, bits, DENSE_GROUP_SIZE)
        row = {"torch_us": round(clock(lambda: quant.linear(x, q, fused=False)), 1)}
        row["torch_vs_fp16"] = round(row["torch_us"] / base, 3)
        if fused:
            row["fused_us"] = round(clock(lambda: quant.linear(x, q, fused=True)), 1)
            row["fused_vs_fp16"] = round(row["fused_us"] / base, 3)
        out["attention_projection"][f"{bits}-bit g{DENSE_GROUP_SIZE}"] = row
    return out


def dense_rows(src: Path, tmp: Path, baseline_ppl: float) -> dict:
    """4-bit experts with the attention projections at 16, 8 and 4 bits: perplexity and device bytes."""
    ckpt = open_checkpoint(src)
    cfg = ckpt.config
    mats = [ckpt.read(name, dtype=torch.float32) for name in attention_shapes(cfg)]
    ckpt.close()
    rows, ref = {}, None
    for bits in (16, 8, 4):
        dst = convert(src, tmp / f"dense-{bits}", 4, 64, dense_bits=bits)
        fmt = dense_format(json.loads((dst / INFO_FILE).read_text()))
        ppl = perplexity(dst)["ppl"]
        shutil.rmtree(dst)
        ref = ref or ppl
        held = dense_bytes(cfg, 2, fmt)
        row = {"ppl": round(ppl, 4), "ppl_vs_dense16": round(ppl / ref, 4), "ppl_vs_fp32": round(ppl / baseline_ppl, 4),
               "dense_bytes_fp16_compute": held, "dense_bytes_vs_fp16": round(held / dense_bytes(cfg, 2), 4)}
        if fmt:
            ours = [relative_error(w, quant.dequantize(quant.quantize(w, *fmt))) for w in mats]
            hqq = [relative_error(w, hqq_dequantize(w, *fmt)) for w in mats]
            row["attention_rel_error_mean"] = {"ours": round(sum(ours) / len(ours), 5), "hqq": round(sum(hqq) / len(hqq), 5)}
        rows[f"dense {bits}-bit"] = row
        print(f"4-bit experts, dense {bits}-bit: ppl {ppl:.4f}, device dense bytes {held} "
              f"({row['dense_bytes_vs_fp16']}x fp16) {row.get('attention_rel_error_mean', '')}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="where the record goes (default: bench/results/quant-<cpu|cuda>.json)")
    args = ap.parse_args()
    torch.manual_seed(0)
    src = resolve_model_path("demo")
    cfg = open_checkpoint(src).config
    params = cfg.expert_params
    fp32_bytes, bf16_bytes = 4 * params, 2 * params
    start = time.perf_counter()
    fp32_logits: list = []
    base = perplexity(src, fp32_logits)
    print(f"fp32: ppl {base['ppl']:.4f} over {base['tokens']} tokens", flush=True)
    result = {
        "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "model": "offload/demo_model (trained demo: 4 layers, 8 experts, D=192, F=320)",
        "eval": f'offload.demo.corpus("heldout"), windows of {WINDOW} tokens + bos, teacher-forced, '
                f"python {platform.python_version()}",
        "expert_params": params,
        "fp32": {"ppl": round(base["ppl"], 4), "tokens": base["tokens"], "expert_bytes": fp32_bytes,
                 "bf16_expert_bytes": bf16_bytes},
        "note": NOTE,
        "widths": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for bits, group in SETTINGS:
            key = f"{bits}-bit g{group}"
            dst = convert(src, tmp / f"ours-{bits}", bits, group)
            info = json.loads((dst / INFO_FILE).read_text())
            blob = quant.expert_layout(cfg.hidden_size, cfg.intermediate_size, bits, group).nbytes
            ours = perplexity(dst, fp32_logits)
            shutil.rmtree(dst)
            hqq_err: list[float] = []
            hdst = hqq_folder(src, tmp / f"hqq-{bits}", bits, group, hqq_err)
            hqq = perplexity(hdst, fp32_logits)
            shutil.rmtree(hdst)
            our_err = our_errors(src, bits, group)
            hqq_bytes = params * hqq_bits_per_param(bits, group) / 8
            row = {
                "ours": {"ppl": round(ours["ppl"], 4), "ppl_vs_fp32": round(ours["ppl"] / base["ppl"], 4),
                         "logits_distance_vs_fp32": ours["logits_distance_vs_fp32"],
                         "top1_same_as_fp32": ours["top1_same_as_fp32"],
                         "blob_bytes": blob, "bytes_vs_fp32": round(blob / fp32_bytes, 4),
                         "bits_per_param": round(8 * blob / params, 4),
                         "weight_rel_error_mean": round(sum(our_err) / len(our_err), 5),
                         "weight_rel_error_max": round(max(our_err), 5)},
                "hqq": {"ppl": round(hqq["ppl"], 4), "ppl_vs_fp32": round(hqq["ppl"] / base["ppl"], 4),
                        "logits_distance_vs_fp32": hqq["logits_distance_vs_fp32"],
                        "top1_same_as_fp32": hqq["top1_same_as_fp32"],
                        "bytes": round(hqq_bytes), "bytes_vs_fp32": round(hqq_bytes / fp32_bytes, 4),
                        "bits_per_param": hqq_bits_per_param(bits, group),
                        "weight_rel_error_mean": round(sum(hqq_err) / len(hqq_err), 5),
                        "weight_rel_error_max": round(max(hqq_err), 5)},
            }
            assert info["blob_bytes"] == blob, (info["blob_bytes"], blob)
            row["ours_ppl_vs_hqq"] = round(ours["ppl"] / hqq["ppl"], 4)
            row["ours_logits_distance_vs_hqq"] = round(ours["logits_distance_vs_fp32"] / hqq["logits_distance_vs_fp32"], 4)
            result["widths"][key] = row
            print(f"{key}: ours ppl {ours['ppl']:.4f} ({row['ours']['bits_per_param']} b/p, err "
                  f"{row['ours']['weight_rel_error_mean']}) | HQQ ppl {hqq['ppl']:.4f} "
                  f"({row['hqq']['bits_per_param']} b/p, err {row['hqq']['weight_rel_error_mean']})", flush=True)
        result["dense_bits"] = dense_rows(src, tmp, base["ppl"])
    result["gpu_expert_timing"] = gpu_timing()
    result["seconds"] = round(time.perf_counter() - start, 1)
    out = args.out or RESULTS / f"quant-{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    save_record(result, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
