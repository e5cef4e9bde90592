"""Host memory page-locked to exactly the size asked for: the host tier of expert blobs (offload.store), scratch
blobs for bandwidth probes. Here in the lowest layer, beside the blobs it holds.

`torch.empty(..., pin_memory=True)` goes through torch's caching host allocator, which rounds every
allocation up to a power of two and keeps freed blocks locked for reuse: a 24 GiB host tier would lock
32 GiB, and a one-off scratch blob would stay locked for the life of the process. `empty` allocates
ordinary memory instead and page-locks that range in place with cudaHostRegister (portable, so every
device's context sees it as pinned, as torch's own checkpoint stager does). The lock is released when the
tensor is collected or `release`d: after its device has finished its queued copies, since a DMA may still
read it.

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


# The host tier is page-locked a piece at a time (whole rows, so every blob lies in one registered range and
# one DMA reads it), each piece reported to `progress`: locking tens of GB takes seconds.
PIECE_BYTES = 1 << 30
_locked: dict[int, weakref.finalize] = {}  # storage address -> the finalizer that unlocks it (`release`)


def empty(shape, pin: bool, device: torch.device | str | int | None = None, progress=None) -> torch.Tensor:
    """An uninitialized uint8 tensor of `shape` in host memory, page-locked when `pin` (needs CUDA).

    `device`: the one CUDA device that copies from it, synchronized before the memory is unlocked (None: the
    current one); `progress(done, total)`: rows locked so far, before the first piece and after each."""
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
    rows = t.reshape(t.shape[0] if t.dim() > 1 else 1, -1)  # a view: rows of the same memory
    step = max(1, PIECE_BYTES // rows.shape[1])
    cudart, pointers = _cudart(), []
    if progress:
        progress(0, rows.shape[0])
    for r in range(0, rows.shape[0], step):
        piece = rows[r:r + step]
        err = int(cudart.cudaHostRegister(piece.data_ptr(), piece.numel(), PORTABLE))
        if err:
            _clear_last_error()
            for ptr in pointers:  # the pieces locked before this one: nothing holds them any more
                cudart.cudaHostUnregister(ptr)
            raise UserError(f"could not page-lock {t.numel() / 2**30:.2f} GiB of host RAM for the GPU to copy "
                            f"from (cudaHostRegister returned CUDA error {err}); lower --ram, or where registering "
                            f"host memory is unsupported, set MOE_OFFLOAD_PINNED=torch")
        pointers.append(piece.data_ptr())
        if progress:
            progress(min(r + step, rows.shape[0]), rows.shape[0])
    # The finalizer holds the storage, so the memory outlives its lock; it runs when `t` is collected, or
    # at `release` (not at interpreter exit: the process's memory goes back to the OS then anyway).
    storage = t.untyped_storage()
    unlock = weakref.finalize(t, _unlock, storage, pointers, device)
    unlock.atexit = False
    _locked[storage.data_ptr()] = unlock
    return t


def release(t: torch.Tensor) -> None:
    """Unlock `t`'s memory now (after its device's queued copies), instead of when it is collected; its bytes
    go back to the system once the last reference to them is dropped. Nothing for memory never locked here."""
    unlock = _locked.get(t.untyped_storage().data_ptr())
    if unlock is not None:
        unlock()


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


def _unlock(storage: torch.UntypedStorage, pointers: list[int], device) -> None:
    """Wait until no copy reads the memory, then unregister every piece of it, whether or not the wait
    worked: a range left registered makes the next registration of those pages fail ("already registered").
    Only the device that copies from it is synchronized (synchronizing every visible GPU would create a
    context on idle ones and fail on GPUs in exclusive-process mode); none when CUDA never started in this
    process, when nothing can be queued."""
    _locked.pop(storage.data_ptr(), None)
    try:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize(device)
    finally:
        cudart = _cudart()
        for ptr in pointers:
            cudart.cudaHostUnregister(ptr)
