"""Mixture of Lookup Experts (Jie et al., ICML 2025): the MoLE model, its training, re-parameterization of
its experts into per-token tables, and the table store the runtime serves them from.

Imports nothing from `offload`; the runtime reaches the tables through `lut.serve.TableStore`.
"""

# config.json model_type of a re-parameterized (table) folder, which `offload.load` serves through lut.
TABLE_MODEL_TYPES = ("mole_tables",)
