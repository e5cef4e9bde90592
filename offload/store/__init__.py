"""The store layer: every routed expert across three tiers (disk, pinned host RAM, device slots), behind
the models layer's ExpertProvider seam. Imports quant, offload.formats and offload.models; never the
runtime or the tools.

    store.py    ExpertStore: the tiers, the hit / copy / CPU plan of each expert use, prefetch, stats
    cache.py    SlotTable: which expert sits in which slot, and the eviction policy
    memory.py   MemoryPlan: what the --vram and --ram budgets hold
    reader.py   the disk reader thread
    sources.py  where experts come from on disk and how a blob is computed
    partial.py  sparse experts: which neuron chunks each device slot holds, and the partial copies
    predictor.py  sparse experts: the neuron predictors that pick a guess copy's chunks
    timing.py   the timing helpers the store and the profiler share
"""

from .store import ExpertStore, Stats, check_options

__all__ = ["ExpertStore", "Stats", "check_options"]
