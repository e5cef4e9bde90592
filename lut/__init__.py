"""Mixture of Lookup Experts (Jie et al., ICML 2025): the MoLE model, its training, re-parameterization of
its experts into per-token tables, and the table store the runtime serves them from.

    lut/config.py  MoLEConfig: config.json of a MoLE checkpoint ("mole") or table folder ("mole_tables")
    lut/model.py   the MoLE model (and the dense / top-2 MoE baselines), checkpoint names, save/load
    lut/tables.py  the table file: one contiguous record of rows per token id, self-describing header
    lut/build.py   `moe-offload lut build`: every expert on every token id -> the table folder
    lut/serve.py   TableStore: the runtime's feed-forward layers for a table folder, rows from disk or RAM

Imports nothing from `offload`; the runtime reaches the tables through `lut.serve.TableStore`.
"""

from pathlib import Path

# config.json model_type of a re-parameterized (table) folder, which `offload.load` serves through lut.
TABLE_MODEL_TYPES = ("mole_tables",)

# The small trained MoLE checkpoint shipped with the package (scripts/train_mole.py writes it).
DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
