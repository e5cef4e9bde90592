"""Re-export of the project's user-facing error type (defined in `quant.errors`, the lowest layer)."""

from quant.errors import UserError

__all__ = ["UserError"]
