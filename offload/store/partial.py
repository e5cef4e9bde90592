"""Partial copies of sparse experts (quant/sparse.py): which neuron chunks each device slot holds, and the
copies that bring the missing ones.

# F ffn (neurons), C bytes per chunk, n neurons in one copy, S device slots
A sparse blob is a base (header, threshold, up projection) then F chunks of C bytes, neuron i's gate row and
down column in chunk i. A device slot is laid out as the whole blob, but holds the base and only the chunks
that some use needed or a neuron predictor guessed (offload/store/predictor.py): `held[slot]` says which, and
`guessed[slot]` which of those a guess brought and no use has needed yet (used later: a guess hit; gone with
the slot's next fill: wasted). A copy into a slot is

    base (a fresh slot only)   host slot bytes [0, base) -> device slot bytes [0, base), one copy
    chunks idx [n]             host chunks[idx] gathered into a pinned staging buffer (one index_select),
                               one host->device copy of n*C bytes into a device staging buffer, then placed
                               into the slot's chunk rows idx (one index_copy_ on the device)

and returns the bytes it moved, which the store counts as bytes_h2d. On a CPU "device" pool the same code runs
with no staging on the device (the gathered rows are placed from the host staging buffer directly).

Streams (CUDA): every copy runs on the caller's current stream (the store's copy or guess stream, after it
waited on the slot's events); each stream has its own staging pair, so the two never share a buffer. The
pinned staging buffer is rewritten by the CPU, which must first wait for the previous copy out of it: an
event recorded after that copy (`staged`) is synchronized before the gather (a guess's chunks are skipped
instead while it is busy: `staging_free`, so a guess never blocks the host). The device staging buffer is
only touched by kernels of its own stream, in order. Every staging buffer is allocated with the store, inside
the device budget (`staging_nbytes`, which the memory plan counts).
"""

from __future__ import annotations

import torch

from quant import pinned, sparse
from quant.blob import BlobLayout


def staging_streams(cuda: bool, device_slots: int) -> int:
    """How many staging pairs a sparse store has: one per CUDA copy stream (copies needed now, guesses), one on a
    CPU slot pool, none without device slots (--cpu-experts all)."""
    return 0 if not device_slots else 2 if cuda else 1


def staging_nbytes(layout: BlobLayout, cuda: bool) -> int:
    """Device bytes the staging pairs of a store with device slots take (the memory plan's `staging_bytes`):
    rows [F, C] per pair, on the GPU (its host rows are pinned RAM), or a CPU slot pool's gathered rows (its
    "device" is host memory); 0 for blobs that are not sparse (whole copies stage nothing)."""
    if layout.kind != sparse.KIND:
        return 0
    F, C = layout.record("chunks").shape
    return staging_streams(cuda, 1) * F * C


class _Staging:
    """One stream's staging pair: pinned host rows [F, C], and on a GPU device rows [F, C] (sized for a whole
    expert's chunks, so no copy is ever split), with the event of the last copy out of the host rows."""

    def __init__(self, rows: int, C: int, cuda: bool, device: torch.device):
        self.host = pinned.empty((rows, C), pin=cuda, device=device if cuda else None)
        self.dev = torch.empty((rows, C), dtype=torch.uint8, device=device) if cuda else None
        self.staged = None  # CUDA event: the last host -> device copy out of `host` is done


class PartialSlots:
    """The chunk bookkeeping of a sparse store's device slots, and its partial copies."""

    def __init__(self, layout: BlobLayout, dev: torch.Tensor, host: torch.Tensor, cuda: bool, device: torch.device,
                 streams: list | None = None):
        """`streams`: the CUDA streams copies run on, each with its staging pair from now on ([None] on a CPU pool;
        none without device slots)."""
        rec = layout.record("chunks")
        self.layout, self.dev, self.host, self.cuda, self.device = layout, dev, host, cuda, device
        self.base = sparse.base_nbytes(layout)
        self.chunk_offset, (self.F, self.C) = rec.offset, rec.shape
        self.held = torch.zeros(dev.shape[0], self.F, dtype=torch.bool)  # [S, F], host-side: slot s holds chunk i
        self.guessed = torch.zeros_like(self.held)  # [S, F]: brought by a guess, not needed by a use since
        self.staging = {stream: _Staging(self.F, self.C, cuda, device) for stream in streams or []}

    def device_tensors(self) -> list[torch.Tensor]:
        """The staging buffers the device tier holds (`staging_nbytes`): device rows, or a CPU pool's host rows."""
        return [st.dev if self.cuda else st.host for st in self.staging.values()]

    def held_bytes(self, slot: int) -> int:
        """Bytes slot `slot` received since its fill: its base and the chunks it holds."""
        return self.base + int(self.held[slot].sum()) * self.C

    def _chunks(self, row: torch.Tensor) -> torch.Tensor:
        """The chunk rows [F, C] of one blob buffer (a host or device slot)."""
        return row[self.chunk_offset:self.chunk_offset + self.F * self.C].view(self.F, self.C)

    def _staging(self) -> _Staging:
        return self.staging[torch.cuda.current_stream(self.device) if self.cuda else None]

    def staging_free(self) -> bool:
        """Whether a copy on the current stream can gather without waiting for its previous copy."""
        st = self._staging()
        return st.staged is None or st.staged.query()

    def fill(self, slot: int, host: int) -> tuple[int, int]:
        """Device slot `slot` now holds another expert, from host slot `host`: copy its base, no chunk yet (its
        first use finds which it needs). Returns the bytes moved and how many chunks a guess had brought that
        no use needed (wasted). On a GPU the caller has made the current stream wait until nothing reads or writes
        the slot, and records the slot's ready event afterwards."""
        wasted = int(self.guessed[slot].sum())
        self.held[slot] = self.guessed[slot] = False
        self.dev[slot, :self.base].copy_(self.host[host, :self.base], non_blocking=True)
        return self.base, wasted

    def use(self, slot: int, idx: torch.Tensor) -> int:
        """A use of slot `slot` needs the neurons idx [n] (held): how many of them a guess brought unused so far."""
        hits = int(self.guessed[slot, idx].sum())
        self.guessed[slot, idx] = False
        return hits

    def guess_chunks(self, slot: int, host: int, idx: torch.Tensor) -> int:
        """Copy the chunks of the guessed neurons idx [n] (on the host) that slot `slot` lacks, as `copy_chunks`,
        and mark them guessed. Returns the bytes moved."""
        missing = self.missing(slot, idx)
        moved = self.copy_chunks(slot, host, missing)
        self.guessed[slot, missing] = True
        return moved

    def missing(self, slot: int, idx: torch.Tensor) -> torch.Tensor:
        """The neurons of idx [n] (ascending, on the host) whose chunks slot `slot` does not hold."""
        return idx[~self.held[slot, idx]]

    def copy_chunks(self, slot: int, host: int, idx: torch.Tensor) -> int:
        """Copy the chunks idx [n] (on the host, not held yet) of host slot `host` into device slot `slot`: one
        gather, one copy, one placement. Returns the bytes moved."""
        n = idx.numel()
        if n == 0:
            return 0
        st = self._staging()
        if st.staged is not None:
            st.staged.synchronize()  # the previous copy out of the pinned rows has read them
        rows = st.host[:n]
        torch.index_select(self._chunks(self.host[host]), 0, idx, out=rows)      # [n, C]
        if self.cuda:
            st.dev[:n].copy_(rows, non_blocking=True)
            st.staged = torch.cuda.Event()
            st.staged.record()
            self._chunks(self.dev[slot]).index_copy_(0, idx.to(self.device, non_blocking=True), st.dev[:n])
        else:
            self._chunks(self.dev[slot]).index_copy_(0, idx, rows)
        self.held[slot, idx] = True
        return n * self.C

    def rows(self, slot: int) -> torch.Tensor:
        """Device slot `slot`'s chunk rows [F, C] (a view; only the held ones hold weights)."""
        return self._chunks(self.dev[slot])
