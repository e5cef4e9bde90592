"""Where the training scripts write: a folder they may replace, and the mark that makes it theirs."""

from __future__ import annotations

import atexit
import shutil
import sys
from pathlib import Path

from quant import files

MARKER = ".trained-by-moe-offload"  # written into every folder a training script makes


def replaceable(out: Path, default: Path) -> Path:
    """`out`, resolved, if a training run may replace it: absent, the script's default folder, or one an
    earlier run marked. Anything else (a downloaded model, the user's notes) is refused in one line before
    minutes of training, since the run swaps its result in by deleting what is there."""
    out = out.resolve()
    if out.exists() and out != default.resolve() and not (out / MARKER).is_file():
        sys.exit(f"error: {out} exists and was not written by a training script (no {MARKER} in it); "
                 "pick a new folder or remove it yourself")
    return out


def work_folder(out: Path) -> Path:
    """quant.files.work_folder (as `lut build` writes into), removed when the script exits without swapping
    it in (an error, Ctrl-C)."""
    tmp = files.work_folder(out)
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # a no-op once swap_in has moved it
    return tmp


def swap_in(tmp: Path, out: Path) -> None:
    """Mark the finished folder `tmp` as a training script's and put it in place of `out` (quant.files.swap_in,
    as `lut build --force` does)."""
    (tmp / MARKER).write_text("written by a moe-offload training script; a rerun may replace this folder\n")
    files.swap_in(tmp, out)
