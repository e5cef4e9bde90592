"""Host memory page-locked to exactly the size asked for: the host tier of expert blobs (offload.store), scratch
blobs for bandwidth probes. Here in the lowest layer, beside the blobs it holds.

`torch.empty(..., pin_memory=True)` goes through torch's caching host allocator, which rounds every
allocation up to a power of two and keeps freed blocks locked for reuse: a 24 GiB host tier would lock
32 GiB, and a one-off scratch blob would stay locked for the life of the process. `empty` allocates
ordinary memory instead and page-locks that range in place with cudaHostRegister (portable, so every
device's context sees it as pinned, as torch's own checkpoint stager does). The lock is released when the
tensor is collected: after every device has finished its queued copies, since a DMA may still read it.

Where cudaHostRegister is not supported (some sandboxed GPU runtimes), MOE_OFFLOAD_PINNED=torch makes
`empty` use torch's pinned allocator instead, rounding and all.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from pathlib import Path

import torch

from .errors import UserError

PORTABLE = 1  # cudaHostRegisterPortable


def _cudart():
    return torch.cuda.cudart()


def empty(shape, pin: bool) -> torch.Tensor:
    """An uninitialized uint8 tensor of `shape` in host memory, page-locked when `pin` (needs CUDA)."""
    if pin:  # the setting matters only when pinning: a CPU run never reads it
        how = os.environ.get("MOE_OFFLOAD_PINNED", "register")
        if how not in ("register", "torch"):
            raise UserError(f"MOE_OFFLOAD_PINNED must be 'register' (the default) or 'torch', got {how!r}")
        if how == "torch":
            try:
                return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as exc:
                raise UserError(f"could not pin host RAM through torch's allocator, which rounds each block up to "
                                f"a power of two ({str(exc).splitlines()[0]}); lower --ram") from None
    t = torch.empty(shape, dtype=torch.uint8)
    if not pin or t.numel() == 0:
        return t
    cudart = _cudart()
    err = int(cudart.cudaHostRegister(t.data_ptr(), t.numel(), PORTABLE))
    if err:
        _clear_last_error()
        raise UserError(f"could not page-lock {t.numel() / 2**30:.2f} GiB of host RAM for the GPU to copy from "
                        f"(cudaHostRegister returned CUDA error {err}); lower --ram, or where registering host "
                        f"memory is unsupported, set MOE_OFFLOAD_PINNED=torch")
    # The finalizer holds the storage, so the memory outlives its lock; it runs when `t` is collected
    # (not at interpreter exit: the process's memory goes back to the OS then anyway).
    weakref.finalize(t, _unlock, t.untyped_storage()).atexit = False
    return t


def _clear_last_error() -> None:
    """Torch's binding returns cudaHostRegister's error but leaves it recorded as this thread's last CUDA
    error, which torch's check after its next kernel launch would raise as that kernel's own (a caller who
    catches the UserError and goes on would meet it far from here). Read it off through the libcudart this
    process has loaded (torch's CUDA wheels link it dynamically); best effort: none found, nothing done."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return
    # A maps line: address, perms, offset, dev, inode, then the path (which may hold spaces).
    paths = {fields[5] for line in maps.splitlines() if "/libcudart.so" in line
             and len(fields := line.split(None, 5)) == 6}
    for path in sorted(paths):
        try:
            ctypes.CDLL(path).cudaGetLastError()  # the library already loaded: dlopen hands back the same one
        except (OSError, AttributeError):
            pass


def _unlock(storage: torch.UntypedStorage) -> None:
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)
    _cudart().cudaHostUnregister(storage.data_ptr())
