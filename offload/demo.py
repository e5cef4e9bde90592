"""The demo model shipped in `offload/demo_model/` and the text it was trained on.

The text is `pydoc_data.topics.topics`, the Python reference-manual topics (~465K characters of
English) that every CPython install carries. The split is fixed: topics sorted by key, and every
10th one, starting with the first (sorted index i with i % 10 == 0), is held out and was never
trained on. On Python 3.11 that is 8 of 79 topics, ~32K characters. The topics differ between
Python versions, so a perplexity is only comparable with others taken on the same interpreter.
`scripts/train_demo.py` builds the model folder from the "train" split.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parent / "demo_model"

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 10


def documents(split: str) -> list[str]:
    """The split's topics, one string each, in sorted-key order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from pydoc_data.topics import topics  # imported here: the dict is ~0.5 MB of text

    keys = sorted(topics)
    held = split == "heldout"
    return [topics[k] for i, k in enumerate(keys) if (i % HELDOUT_EVERY == 0) == held]


def corpus(split: str) -> str:
    """The split's text: its topics joined by blank lines ("train" or "heldout")."""
    return "\n\n".join(documents(split))
