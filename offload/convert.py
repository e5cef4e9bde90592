"""`moe-offload convert`: rewrite a model folder with quantized expert blobs, layer by layer, atomically.

The output folder is the converted-folder format of offload/formats/converted.py.

Atomicity: everything is written into DST.partial/ and renamed to DST only when complete, so an interrupted
conversion leaves no folder `generate` accepts. DST.partial/ carries a marker file from the moment it is
created; a rerun discards a stale DST.partial/ only when it holds that marker (a folder of the user's that
happens to have the name, the source model included, is never removed) and starts again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import quant
from quant import mxfp4, sparse as sparse_blob
from quant.errors import UserError, writing
from quant.files import copy_input, save_tensors

from . import calibrate
from .formats.checkpoint import Checkpoint
from .formats.converted import (BITS, COPIED, DENSE_BITS, DENSE_GROUP_SIZE, EXPERTS_FILE, FILE_HEADER, FILE_VERSION,
                                FORMAT, INFO_FILE, PARTIAL_MARKER, STRIDE_ALIGN, read_info, write_experts_header)
from .models import EXPERT_MODEL_TYPES, expected_shapes, family, open_checkpoint
from .runtime import open_checked
from .store import predictor
from .store.sources import converted_layout
from .tokenizer import Tokenizer

# Families whose routed experts `--sparse` refuses, besides those stored fused (gpt-oss): MoLE's experts read the
# token embedding and become lookup tables.
SPARSE_REFUSED = ("mole",)


def fingerprint(ckpt: Checkpoint) -> dict:
    """Enough to tell whether a destination was converted from this very source (names, sizes, mtimes)."""
    files = sorted({loc.file for loc in ckpt.locations.values()})
    return {"path": str(ckpt.path.resolve()),
            "files": {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files}}


def convert(src: str | os.PathLike, dst: str | os.PathLike, bits: int, group_size: int = 64,
            dense_bits: int = 16, workers: int | None = None, progress=None, sparse: float | None = None,
            chunk_bits: int | None = None, calibration: str | None = None,
            calibration_tokens: int = calibrate.MAX_TOKENS, predictor_rank: int | None = None) -> Path:
    """Convert the model folder `src` into a quantized folder `dst`; returns dst. `progress(done, total)`.

    `sparse`: write sparse blobs (quant/sparse.py) instead, TARGET the fraction of neurons dropped on the
    `calibration` text (a UTF-8 file; None: the demo model's training corpus), the up projection at `bits`,
    the neuron chunks at `chunk_bits` (default `bits`; 16 keeps them float16), and neuron predictors of rank
    `predictor_rank` (offload/store/predictor.py; default DEFAULT_RANK, 0 for none) that let router-ahead prefetch
    copy a guessed expert's likely neurons early."""
    if bits not in BITS:
        raise UserError(f"--bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if sparse is not None:
        if isinstance(sparse, bool) or not isinstance(sparse, (int, float)) or not 0 <= sparse < 1:
            raise UserError(f"--sparse must be a fraction of neurons to drop in [0, 1), got {sparse}")
        if bits == "mxfp4":
            raise UserError("--sparse keeps the up projection group-wise quantized: use --bits 8, 4, 3 or 2")
        chunk_bits = bits if chunk_bits is None else chunk_bits
        if chunk_bits not in sparse_blob.CHUNK_BITS:
            raise UserError(f"--chunk-bits must be one of {', '.join(map(str, sparse_blob.CHUNK_BITS))}, "
                            f"got {chunk_bits}")
        predictor_rank = predictor.DEFAULT_RANK if predictor_rank is None else predictor_rank
        if isinstance(predictor_rank, bool) or not isinstance(predictor_rank, int) or predictor_rank < 0:
            raise UserError(f"--predictor-rank must be 0 (no neuron predictor) or a positive rank, "
                            f"got {predictor_rank}")
    elif chunk_bits is not None or calibration is not None or predictor_rank is not None:
        raise UserError("--chunk-bits, --calibration and --predictor-rank apply to sparse experts only: add --sparse "
                        "TARGET")
    if bits == "mxfp4":
        group_size = mxfp4.BLOCK  # one power-of-two scale per 32 values, by the format
    if dense_bits not in DENSE_BITS:
        raise UserError(f"--dense-bits must be one of {', '.join(map(str, DENSE_BITS))}, got {dense_bits}")
    if read_info(Path(src)) is not None:
        raise UserError(f"{src}: is already a quantized conversion ({INFO_FILE}); convert the original float "
                        f"folder instead")
    ckpt = open_checkpoint(src, EXPERT_MODEL_TYPES)
    ckpt.validate(expected_shapes(ckpt.config))
    if not (ckpt.path / "tokenizer.json").is_file():  # the output could not generate without it
        raise UserError(f"{ckpt.path / 'tokenizer.json'}: missing (the model folder needs its tokenizer.json)")
    cfg = ckpt.config
    fused = hasattr(family(cfg), "expert_tensors")  # gpt-oss: experts stored fused per layer, with biases
    if fused and getattr(cfg, "mxfp4", False):
        raise UserError(f"{ckpt.path}: its experts already ship in MXFP4; generate runs them as they are")
    if sparse is not None and (fused or cfg.model_type in SPARSE_REFUSED):
        why = ("its experts are fused per layer with biases and a clamped SwiGLU, no separate gate projection"
               if fused else "its experts read the token embedding and become lookup tables")
        raise UserError(f"--sparse: {cfg.model_type} experts cannot be sparsified ({why}); sparse experts need "
                        f"gated SwiGLU experts (w1 gate, w3 up, w2 down)")
    if fused and bits != "mxfp4":
        raise UserError(f"--bits {bits}: {cfg.model_type} experts (biased, clamped SwiGLU) convert to --bits mxfp4 only")
    for dim, name in ((cfg.hidden_size, "hidden_size"), (cfg.intermediate_size, "intermediate_size")):
        if group_size <= 0 or dim % group_size:
            raise UserError(f"--group-size {group_size} does not divide the rows of the experts ({name} = {dim})")
    dense_fmt = None if dense_bits == 16 else (dense_bits, DENSE_GROUP_SIZE)
    if dense_fmt:
        for name, (_, cols) in family(cfg).attention_shapes(cfg).items():
            if cols % DENSE_GROUP_SIZE:
                raise UserError(f"--dense-bits {dense_bits}: the attention projections' rows ({cols}, in {name}) are "
                                f"not a multiple of the dense group size {DENSE_GROUP_SIZE}; use --dense-bits 16")
    dst = Path(dst)
    calib_text, calib_name = calibrate.calibration_text(calibration) if sparse is not None else (None, None)
    settings = {"bits": bits, "group_size": group_size, "dense_bits": dense_bits,
                "sparse": None if sparse is None else {"target": float(sparse), "chunk_bits": chunk_bits,
                                                      "calibration": calib_name, "predictor_rank": predictor_rank}}
    if dst.resolve() == ckpt.path.resolve():
        raise UserError(f"{dst}: the destination is the source folder")
    if dst.exists() or dst.is_symlink():
        info = read_info(dst) if dst.is_dir() else None
        if info is None or info.get("source") != fingerprint(ckpt):
            raise UserError(f"{dst}: exists and is not an earlier conversion of {ckpt.path}; choose another destination")
        if {k: info.get(k) for k in settings} == settings:
            check_finished(dst, ckpt.path, info)
            return dst  # already converted with these settings
        raise UserError(f"{dst}: holds a conversion with other settings ({info['bits']} bits, group {info['group_size']}, "
                        f"dense {info.get('dense_bits', 16)} bits, sparse {json.dumps(info.get('sparse'))}); "
                        f"remove it or choose another destination")
    partial = dst.with_name(dst.name + ".partial")
    with writing(partial):
        _start_partial(partial, ckpt.path)
        try:
            for name in COPIED:
                if (ckpt.path / name).is_file():
                    copy_input(ckpt.path / name, partial / name)
            calib = None
            if sparse is not None:
                calib = calibrate.record(ckpt.path, calib_text, calib_name, calibration_tokens,
                                         progress=(lambda d, t: progress(d, t + cfg.experts_total))
                                         if progress else None)
            _write_output(ckpt, partial, bits, group_size, dense_fmt, settings, workers, progress, calib)
        except Exception:
            # A full disk, an unreadable source tensor: rerunning starts over anyway, so give the space back
            # now. (Ctrl-C keeps DST.partial, marked as unfinished, for the rerun to clear.)
            shutil.rmtree(partial, ignore_errors=True)
            raise
        (partial / PARTIAL_MARKER).unlink()  # DST is a finished conversion, not a partial one
        os.rename(partial, dst)
    return dst


def check_finished(dst: Path, src: Path, info: dict) -> None:
    """A rerun onto an earlier conversion does nothing, unless a file of it was lost or cut short since: then
    say so (what `generate` would refuse), rather than report a conversion that cannot run."""
    try:
        done, _, _ = open_checked(dst)  # experts.bin's header, size and layout; every tensor's shape
        try:
            Tokenizer(dst, done.config.bos_token_id, done.config.eos_token_id)
        finally:
            done.close()
    except UserError as exc:
        raise UserError(f"{dst}: an earlier conversion of {src} that is damaged ({exc}); remove it and convert "
                        f"again") from None


def _start_partial(partial: Path, src: Path) -> None:
    """Create DST.partial/ with its marker. An existing one is removed only when it is a real folder holding the
    marker (an interrupted conversion); anything else by that name is the user's, and is left alone."""
    if src.resolve().is_relative_to(partial.resolve()):
        raise UserError(f"{partial}: is or holds the source folder {src}, and convert writes its output there; "
                        f"rename the source or choose another destination")
    if partial.exists() or partial.is_symlink():
        if partial.is_symlink() or not partial.is_dir() or not (partial / PARTIAL_MARKER).is_file():
            raise UserError(f"{partial}: exists and was not made by moe-offload convert; remove or rename it")
        shutil.rmtree(partial)  # a stale interrupted conversion: start again
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text(json.dumps({"source": str(src.resolve())}) + "\n")


def _write_output(ckpt: Checkpoint, partial: Path, bits: int, group_size: int, dense_fmt: tuple[int, int] | None,
                  settings: dict, workers: int | None, progress, calib: calibrate.Calibration | None = None) -> None:
    """Write model.safetensors, experts.bin and, last, moe_offload.json into `partial`."""
    cfg, fam = ckpt.config, family(ckpt.config)
    dense = {}
    attention = fam.attention_shapes(cfg)
    for name in fam.dense_shapes(cfg):
        if dense_fmt and name in attention:
            q = quant.quantize(ckpt.read(name, dtype=torch.float32), *dense_fmt)
            dense.update({f"{name}.{part}": t for part, t in q.parts.items()})
        else:
            dense[name] = ckpt.read(name, dtype=torch.float16)
    save_tensors(dense, partial / "model.safetensors")
    del dense

    layout = converted_layout(cfg, bits, group_size, settings["sparse"])
    stride = (layout.nbytes + STRIDE_ALIGN - 1) // STRIDE_ALIGN * STRIDE_ALIGN
    # Blobs of the layers with experts, in layer order (formats/converted.py): a dense layer has none.
    layers, E = cfg.moe_layers, cfg.num_local_experts
    L = len(layers)
    workers = workers or max(1, min(E, os.cpu_count() or 1))

    fallback: list[list[int]] = []
    # Neuron predictors (sparse, rank > 0): each MoE layer's experts from the previous MoE layer's input.
    rank = settings["sparse"].get("predictor_rank", 0) if calib is not None else 0
    sources = dict(zip(layers[1:], layers[:-1])) if rank else {}
    predictors: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    scores: dict[tuple[int, int], dict[str, int]] = {}  # per expert: its predictor on held-out calibration tokens

    def one(key):
        if calib is not None:
            w1, w2, w3 = (ckpt.read(n, dtype=torch.float32) for n in fam.expert_names(*key))
            up = quant.quantize(w3, bits, group_size)
            x, wide = calib.inputs(*key)
            if wide:
                fallback.append(list(key))
            thr = calibrate.threshold(x, up, settings["sparse"]["target"])
            if key[0] in sources:
                predictors[key], scores[key] = calibrate.fit_predictor(calib, key, sources[key[0]], up, thr, rank)
            return key, sparse_blob.pack_sparse(w1, w2, up, thr, layout)
        if bits != "mxfp4":
            w1, w2, w3 = (ckpt.read(n, dtype=torch.float32) for n in fam.expert_names(*key))
            return key, quant.pack_expert(w1, w2, w3, bits, group_size)
        if not hasattr(fam, "expert_tensors"):
            return key, mxfp4.pack_expert(dict(zip(("w1", "w2", "w3"), (ckpt.read(n, dtype=torch.float32)
                                                                          for n in fam.expert_names(*key)))), layout)
        # Expert e's slice of each fused tensor; MXFP4 rows are output features, so the weights turn over.
        weights = {}
        for rec, (name, shape) in fam.expert_tensors(cfg, key[0]).items():
            loc = ckpt.locations[name]
            raw = ckpt.read_slice_into(name, key[1], torch.empty(loc.nbytes // loc.shape[0], dtype=torch.uint8))
            w = raw.view(loc.dtype).view(shape).float()
            weights[rec] = w if rec.endswith(".bias") else w.T
        return key, mxfp4.pack_expert(weights, layout)

    start = time.perf_counter()
    base = calib.windows if calib else 0  # calibration windows, counted first
    with open(partial / EXPERTS_FILE, "wb") as f, ThreadPoolExecutor(workers) as pool:
        write_experts_header(f, L, E, stride, layout.nbytes)
        f.truncate(FILE_HEADER + L * E * stride)
        done = 0
        for i, layer in enumerate(layers):  # one layer in flight at a time: memory stays bounded by E experts
            for (_, e), blob in pool.map(one, [(layer, e) for e in range(E)]):
                f.seek(FILE_HEADER + (i * E + e) * stride)
                f.write(blob.numpy().tobytes())
                done += 1
                if progress:
                    progress(base + done, base + L * E)
        f.flush()
        os.fsync(f.fileno())
    score = {k: sum(s[k] for s in scores.values()) for k in ("guessed", "active", "both")}
    if sources:
        predictor.save(partial / predictor.FILE,
                       {layer: {name: torch.stack([predictors[(layer, e)][name] for e in range(E)])
                                for name in predictors[(layer, 0)]} for layer in sources},
                       sources, cfg.hidden_size, cfg.intermediate_size, rank, E)
    info = {"format": FORMAT, "version": FILE_VERSION, **settings,
            **({"dense_group_size": DENSE_GROUP_SIZE, "dense_quantized": "attention projections q, k, v, o"}
               if dense_fmt else {}),
            "source": fingerprint(ckpt),
            **({"sparse_calibration": {"tokens": calib.tokens, "min_routed_tokens": calibrate.MIN_ROUTED,
                                       "calibrated_on_whole_layer": sorted(fallback)}} if calib else {}),
            **({"predictor": {"file": predictor.FILE, "rank": rank, "reads": "the previous MoE layer's input",
                              "heldout_calibration_tokens": calib.tokens // calibrate.HOLDOUT,
                              "heldout_precision": round(score["both"] / max(1, score["guessed"]), 4),
                              "heldout_recall": round(score["both"] / max(1, score["active"]), 4)}}
               if sources else {}),
            "blob_bytes": layout.nbytes, "experts_file": EXPERTS_FILE,
            "bits_per_param": round(8 * layout.nbytes / cfg.expert_params, 4),
            "seconds": round(time.perf_counter() - start, 2)}
    (partial / INFO_FILE).write_text(json.dumps(info, indent=1))
