"""How the command line reports a problem: one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys

import typer


def user_errors(fn):
    """Turn the project's UserError, and running out of GPU memory, into one line on stderr and exit code 2
    (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from quant.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"moe-offload: error: {exc}", err=True)
            raise typer.Exit(2)
        except Exception as exc:
            torch = sys.modules.get("torch")
            if torch is None or not isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            # Another process took GPU memory after the budget was planned, or the workspace estimate was low.
            what = ". ".join(str(exc).split(". ")[:2]).splitlines()[0] if str(exc) else "CUDA out of memory"
            typer.echo(f"moe-offload: error: {what}; lower --vram or --context", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("moe-offload: interrupted", err=True)
            raise typer.Exit(130)

    return wrapper
