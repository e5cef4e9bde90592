"""The profile layer: a tool over the runtime that times one generation token by token and writes what
it found. Imports the runtime and the layers below it; nothing imports it but the command line.

    profiler.py  Profiler: the store's timing points, per token, into time shares and trace spans
    record.py    the profile.json record, its verdict and the terminal summary; the H2D bandwidth probe
    schema.py    profile.json's schema (schema.json) and its check
    trace.py     trace.json for chrome://tracing / Perfetto
    plots.py     the PNG plots
    run.py       `moe-offload profile`: load, run, write every file at once
"""

from .profiler import TIME_PARTS, Profiler
from .record import summary_rows, verdict
from .run import ARTIFACTS, DEFAULT_PROMPT, Profile, profile, profile_runtime

__all__ = ["ARTIFACTS", "DEFAULT_PROMPT", "TIME_PARTS", "Profile", "Profiler", "profile", "profile_runtime",
           "summary_rows", "verdict"]
