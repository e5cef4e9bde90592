"""Partial copies of sparse experts (quant/sparse.py): which neuron chunks each device slot holds, and the
copies that bring the missing ones.

# F ffn (neurons), C bytes per chunk, n neurons in one copy, S device slots
A sparse blob is a base (header, threshold, up projection) then F chunks of C bytes, neuron i's gate row and
down column in chunk i. A device slot is laid out as the whole blob, but holds the base and only the chunks
that some use needed (or a predictor guessed): `held[slot]` says which. A copy into a slot is

    base (a fresh slot only)   host slot bytes [0, base) -> device slot bytes [0, base), one copy
    chunks idx [n]             host chunks[idx] gathered into a pinned staging buffer (one index_select),
                               one host->device copy of n*C bytes into a device staging buffer, then placed
                               into the slot's chunk rows idx (one index_copy_ on the device)

and returns the bytes it moved, which the store counts as bytes_h2d. On a CPU "device" pool the same code runs
with no staging on the device (the gathered rows are placed from the host staging buffer directly).

Streams (CUDA): every copy runs on the caller's current stream (the store's copy or guess stream, after it
waited on the slot's events); each stream has its own staging pair, so the two never share a buffer. The
pinned staging buffer is rewritten by the CPU, which must first wait for the previous copy out of it: an
event recorded after that copy (`staged`) is synchronized before the gather. The device staging buffer is
only touched by kernels of its own stream, in order.
"""

from __future__ import annotations

import torch

from quant import pinned, sparse
from quant.blob import BlobLayout


class _Staging:
    """One stream's staging pair: pinned host rows [F, C], and on a GPU device rows [F, C] (sized for a whole
    expert's chunks, so no copy is ever split), with the event of the last copy out of the host rows."""

    def __init__(self, rows: int, C: int, cuda: bool, device: torch.device):
        self.host = pinned.empty((rows, C), pin=cuda, device=device if cuda else None)
        self.dev = torch.empty((rows, C), dtype=torch.uint8, device=device) if cuda else None
        self.staged = None  # CUDA event: the last host -> device copy out of `host` is done


class PartialSlots:
    """The chunk bookkeeping of a sparse store's device slots, and its partial copies."""

    def __init__(self, layout: BlobLayout, dev: torch.Tensor, host: torch.Tensor, cuda: bool, device: torch.device):
        rec = layout.record("chunks")
        self.layout, self.dev, self.host, self.cuda, self.device = layout, dev, host, cuda, device
        self.base = sparse.base_nbytes(layout)
        self.chunk_offset, (self.F, self.C) = rec.offset, rec.shape
        self.held = torch.zeros(dev.shape[0], self.F, dtype=torch.bool)  # [S, F], host-side: slot s holds chunk i
        self.staging: dict[object, _Staging] = {}

    def _chunks(self, row: torch.Tensor) -> torch.Tensor:
        """The chunk rows [F, C] of one blob buffer (a host or device slot)."""
        return row[self.chunk_offset:self.chunk_offset + self.F * self.C].view(self.F, self.C)

    def _staging(self) -> _Staging:
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        if stream not in self.staging:
            self.staging[stream] = _Staging(self.F, self.C, self.cuda, self.device)
        return self.staging[stream]

    def fill(self, slot: int, host: int) -> int:
        """Device slot `slot` now holds another expert, from host slot `host`: copy its base, no chunk yet (its
        first use finds which it needs). Returns the bytes moved. On a GPU the caller has made the current stream
        wait until nothing reads or writes the slot, and records the slot's ready event afterwards."""
        self.held[slot] = False
        self.dev[slot, :self.base].copy_(self.host[host, :self.base], non_blocking=True)
        return self.base

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

    def chunks(self, slot: int, idx: torch.Tensor) -> torch.Tensor:
        """The chunk rows [n, C] of neurons idx (on the slot's device) from device slot `slot`."""
        return self._chunks(self.dev[slot]).index_select(0, idx)
