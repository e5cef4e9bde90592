"""What the training scripts share beyond the corpus (offload.demo)."""

from __future__ import annotations

import sys
from pathlib import Path


def replaceable(out: Path) -> Path:
    """`out`, resolved, if a training run may replace it: absent, or a model folder (config.json) that an
    earlier run wrote. Anything else is refused in one line before minutes of training, since the run
    swaps its result in by deleting what is there."""
    out = out.resolve()
    if out.exists() and not (out / "config.json").is_file():
        sys.exit(f"error: {out} exists and is not a model folder (no config.json); "
                 "pick a new folder or remove it yourself")
    return out
