"""`moe-offload convert`: rewrite a Mixtral folder with quantized expert blobs, layer by layer, atomically.

The output folder holds what `generate` runs directly:

    config.json, tokenizer files      copied from the source
    model.safetensors                 every dense tensor (attention, norms, routers, embeddings, lm_head), fp16;
                                      with --dense-bits 8|4 each attention projection W is stored quantized
                                      instead, as W.q (uint8 codes), W.scale and W.zero (fp16), group 64
    experts.bin                       a file header, then one quantized blob per expert at a fixed stride, in
                                      (layer, expert) order: one pread moves one whole expert
    moe_offload.json                  how it was made (source, its fingerprint, bits, group sizes, dense bits),
                                      written last

experts.bin: bytes [0, 4096) hold MAGIC, a version and a JSON index (layers, experts, stride, blob bytes);
blob (l, e) starts at 4096 + (l * E + e) * stride and begins with its own BlobLayout header.

Atomicity: everything is written into DST.partial/ and renamed to DST only when complete, so an interrupted
conversion leaves no folder `generate` accepts. DST.partial/ carries a marker file from the moment it is
created; a rerun discards a stale DST.partial/ only when it holds that marker (a folder of the user's that
happens to have the name, the source model included, is never removed) and starts again.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from quant.blob import is_count
from quant.errors import writing
from quant.files import copy_input, save_tensors

from .checkpoint import Checkpoint, attention_shapes, dense_shapes, expert_names
from .errors import UserError

INFO_FILE = "moe_offload.json"
EXPERTS_FILE = "experts.bin"
FORMAT = "moe-offload-quantized-experts"
MAGIC = b"MOEXPRTS"
FILE_VERSION = 1
FILE_HEADER = 4096
STRIDE_ALIGN = 4096  # blobs on page boundaries: aligned reads, O_DIRECT-friendly
BITS = (8, 4, 3, 2)
DENSE_BITS = (16, 8, 4)
# Attention projections are quantized in groups of 64 whatever the experts use: every Mixtral-class
# attention dimension is a multiple of 64, and 64 keeps fp16 scale + zero at 0.5 bits per weight.
DENSE_GROUP_SIZE = 64
PARTIAL_MARKER = ".moe-offload-partial"  # in DST.partial/ from its mkdir on: proof that convert made the folder
COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
          "special_tokens_map.json", "tokenizer.model")


def fingerprint(ckpt: Checkpoint) -> dict:
    """Enough to tell whether a destination was converted from this very source (names, sizes, mtimes)."""
    files = sorted({loc.file for loc in ckpt.locations.values()})
    return {"path": str(ckpt.path.resolve()),
            "files": {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files}}


def read_info(folder: Path) -> dict | None:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{path}: not a moe-offload conversion record")
    # The fields the reader acts on, each what this build writes and reads.
    for field, allowed in (("version", (FILE_VERSION,)), ("bits", BITS), ("dense_bits", DENSE_BITS),
                           ("experts_file", (EXPERTS_FILE,))):
        value = info.get(field, 16 if field == "dense_bits" else None)
        if isinstance(value, bool) or value not in allowed:
            raise UserError(f"{path}: field '{field}' is {json.dumps(value)}; this build reads "
                            f"{' or '.join(json.dumps(a) for a in allowed)}")
    sizes = ("group_size", "dense_group_size") if info.get("dense_bits", 16) != 16 else ("group_size",)
    for field in sizes:
        if not is_count(info.get(field)) or not info[field]:
            raise UserError(f"{path}: field '{field}' must be a positive integer, got {json.dumps(info.get(field))}")
    return info


def dense_format(info: dict | None) -> tuple[int, int] | None:
    """(bits, group size) of the attention projections of a converted folder; None when they are plain fp16."""
    if not info or info.get("dense_bits", 16) == 16:
        return None
    return int(info["dense_bits"]), int(info["dense_group_size"])


def stored_dense_shapes(cfg, fmt: tuple[int, int] | None) -> dict[str, tuple[int, ...]]:
    """`dense_shapes(cfg)` as a folder stores them: with a dense format, each attention projection W as
    W.q, W.scale and W.zero (quant.quantized_shapes)."""
    import quant

    shapes = dense_shapes(cfg)
    if fmt is None:
        return shapes
    for name, shape in attention_shapes(cfg).items():
        del shapes[name]
        shapes.update({f"{name}.{part}": s for part, (s, _) in quant.quantized_shapes(shape, *fmt).items()})
    return shapes


def read_quantized(ckpt: Checkpoint, name: str, fmt: tuple[int, int], device) -> "quant.QuantizedTensor":
    """The quantized weight `name` of a converted folder (stored as name.q/.scale/.zero), on `device`."""
    import quant

    shape = attention_shapes(ckpt.config)[name]
    parts = {}
    for part, (_, dtype) in quant.quantized_shapes(shape, *fmt).items():
        loc = ckpt.locations[f"{name}.{part}"]
        if loc.dtype != dtype:
            raise UserError(f"{loc.file}: tensor {name}.{part} is {loc.dtype}, a {fmt[0]}-bit weight stores {dtype}")
        parts[part] = ckpt.read(f"{name}.{part}", device=device)
    return quant.QuantizedTensor(parts["q"], parts["scale"], parts["zero"], shape, *fmt)


def write_experts_header(f, layers: int, experts: int, stride: int, blob_bytes: int) -> None:
    body = json.dumps({"layers": layers, "experts": experts, "stride": stride, "blob_bytes": blob_bytes}).encode()
    raw = MAGIC + struct.pack("<II", FILE_VERSION, len(body)) + body
    f.write(raw + b"\x00" * (FILE_HEADER - len(raw)))


def read_experts_header(path: Path) -> dict:
    """Check experts.bin's header and size; the index dict."""
    try:
        with open(path, "rb") as f:
            raw = f.read(FILE_HEADER)
        size = path.stat().st_size
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) < 16 or raw[:8] != MAGIC:
        raise UserError(f"{path}: not a moe-offload experts file (bad magic)")
    version, n = struct.unpack_from("<II", raw, 8)
    if version != FILE_VERSION:
        raise UserError(f"{path}: experts file version {version} is not supported (this build reads {FILE_VERSION})")
    try:
        index = json.loads(raw[16:16 + n])
    except ValueError as exc:
        raise UserError(f"{path}: corrupt experts header ({exc})") from None
    for key in ("layers", "experts", "stride", "blob_bytes"):
        value = index.get(key) if isinstance(index, dict) else None
        if not is_count(value):
            raise UserError(f"{path}: corrupt experts header ('{key}' must be a non-negative integer, got {value!r})")
    need = FILE_HEADER + index["layers"] * index["experts"] * index["stride"]
    if size != need:
        raise UserError(f"{path}: is {size} bytes, its header implies {need} (truncated or corrupt)")
    return index


def convert(src: str | os.PathLike, dst: str | os.PathLike, bits: int, group_size: int = 64,
            dense_bits: int = 16, workers: int | None = None, progress=None) -> Path:
    """Convert the Mixtral folder `src` into a quantized folder `dst`; returns dst. `progress(done, total)`."""
    if bits not in BITS:
        raise UserError(f"--bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if dense_bits not in DENSE_BITS:
        raise UserError(f"--dense-bits must be one of {', '.join(map(str, DENSE_BITS))}, got {dense_bits}")
    if read_info(Path(src)) is not None:
        raise UserError(f"{src}: is already a quantized conversion ({INFO_FILE}); convert the original float "
                        f"folder instead")
    ckpt = Checkpoint(src)
    ckpt.validate()
    if not (ckpt.path / "tokenizer.json").is_file():  # the output could not generate without it
        raise UserError(f"{ckpt.path / 'tokenizer.json'}: missing (the model folder needs its tokenizer.json)")
    cfg = ckpt.config
    for dim, name in ((cfg.hidden_size, "hidden_size"), (cfg.intermediate_size, "intermediate_size")):
        if group_size <= 0 or dim % group_size:
            raise UserError(f"--group-size {group_size} does not divide the rows of the experts ({name} = {dim})")
    dense_fmt = None if dense_bits == 16 else (dense_bits, DENSE_GROUP_SIZE)
    if dense_fmt:
        for name, (_, cols) in attention_shapes(cfg).items():
            if cols % DENSE_GROUP_SIZE:
                raise UserError(f"--dense-bits {dense_bits}: the attention projections' rows ({cols}, in {name}) are "
                                f"not a multiple of the dense group size {DENSE_GROUP_SIZE}; use --dense-bits 16")
    dst = Path(dst)
    settings = {"bits": bits, "group_size": group_size, "dense_bits": dense_bits}
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
                        f"dense {info.get('dense_bits', 16)} bits); "
                        f"remove it or choose another destination")
    partial = dst.with_name(dst.name + ".partial")
    with writing(partial):
        _start_partial(partial, ckpt.path)
        try:
            for name in COPIED:
                if (ckpt.path / name).is_file():
                    copy_input(ckpt.path / name, partial / name)
            _write_output(ckpt, partial, bits, group_size, dense_fmt, settings, workers, progress)
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
    from .inspect import open_checked
    from .tokenizer import Tokenizer

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
                  settings: dict, workers: int | None, progress) -> None:
    """Write model.safetensors, experts.bin and, last, moe_offload.json into `partial`."""
    import quant

    cfg = ckpt.config
    dense = {}
    attention = attention_shapes(cfg)
    for name in dense_shapes(cfg):
        if dense_fmt and name in attention:
            q = quant.quantize(ckpt.read(name, dtype=torch.float32), *dense_fmt)
            dense.update({f"{name}.{part}": t for part, t in q.parts.items()})
        else:
            dense[name] = ckpt.read(name, dtype=torch.float16)
    for i in range(cfg.num_hidden_layers):
        name = f"model.layers.{i}.block_sparse_moe.gate.weight"
        dense[name] = ckpt.read(name, dtype=torch.float16)
    save_tensors(dense, partial / "model.safetensors")
    del dense

    layout = quant.expert_layout(cfg.hidden_size, cfg.intermediate_size, bits, group_size)
    stride = (layout.nbytes + STRIDE_ALIGN - 1) // STRIDE_ALIGN * STRIDE_ALIGN
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    workers = workers or max(1, min(E, os.cpu_count() or 1))

    def one(key):
        w1, w2, w3 = (ckpt.read(n, dtype=torch.float32) for n in expert_names(*key))
        return key, quant.pack_expert(w1, w2, w3, bits, group_size)

    start = time.perf_counter()
    with open(partial / EXPERTS_FILE, "wb") as f, ThreadPoolExecutor(workers) as pool:
        write_experts_header(f, L, E, stride, layout.nbytes)
        f.truncate(FILE_HEADER + L * E * stride)
        done = 0
        for layer in range(L):  # one layer in flight at a time: memory stays bounded by E experts
            for (l, e), blob in pool.map(one, [(layer, e) for e in range(E)]):
                f.seek(FILE_HEADER + (l * E + e) * stride)
                f.write(blob.numpy().tobytes())
                done += 1
                if progress:
                    progress(done, L * E)
        f.flush()
        os.fsync(f.fileno())
    info = {"format": FORMAT, "version": FILE_VERSION, **settings,
            **({"dense_group_size": DENSE_GROUP_SIZE, "dense_quantized": "attention projections q, k, v, o"}
               if dense_fmt else {}),
            "source": fingerprint(ckpt),
            "blob_bytes": layout.nbytes, "experts_file": EXPERTS_FILE,
            "bits_per_param": round(8 * layout.nbytes / cfg.expert_params, 4),
            "seconds": round(time.perf_counter() - start, 2)}
    (partial / INFO_FILE).write_text(json.dumps(info, indent=1))
