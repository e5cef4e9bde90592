"""moe-offload: run Mixtral-class MoE models on one memory-constrained GPU by streaming experts.

    import offload
    rt = offload.load("path/to/Mixtral-8x7B", vram="12GiB")
    for piece in rt.generate("The capital of France is"):
        print(piece, end="")
    print(rt.stats())
"""

from .errors import UserError
from .runtime import Runtime, load

__all__ = ["load", "Runtime", "UserError"]
