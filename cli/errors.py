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
            what = out_of_device_memory(exc)
            if what is None:
                raise
            # Another process took GPU memory after the budget was planned, or the workspace estimate was low.
            typer.echo(f"moe-offload: error: {what}; lower --vram or --context", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("moe-offload: interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


# How the GPU running out of memory reads where torch's caching allocator is not the one that failed: the
# driver (a kernel's launch, a context, a cudaMalloc outside the allocator), cuBLAS creating a handle or
# its workspace, cuDNN, and torch's driver-API calls (expandable segments). torch raises these as a plain
# RuntimeError (torch.AcceleratorError in newer versions, a subclass), not torch.cuda.OutOfMemoryError.
# cuBLAS's handle creation reports a failed allocation as NOT_INITIALIZED; Triton's launcher as its own error.
OUT_OF_MEMORY = ("CUDA error: out of memory", "CUDA driver error: out of memory", "cudaErrorMemoryAllocation",
                 "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA_ERROR_OUT_OF_MEMORY",
                 "CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate", "Triton Error [CUDA]: out of memory")


def out_of_device_memory(exc: BaseException) -> str | None:
    """The first line of `exc`'s message when it says the GPU ran out of memory (the allocator's own
    OutOfMemoryError, or one of the driver-level messages above); None for any other error."""
    torch = sys.modules.get("torch")
    text = str(exc)
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        # "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...": its first two sentences.
        return ". ".join(text.split(". ")[:2]).splitlines()[0] if text else "CUDA out of memory"
    if isinstance(exc, RuntimeError) and any(marker in text for marker in OUT_OF_MEMORY):
        # The marker's line; torch appends hints ("CUDA kernel errors might be asynchronously reported ...").
        return next(line.strip() for line in text.splitlines() if any(m in line for m in OUT_OF_MEMORY))
    return None
