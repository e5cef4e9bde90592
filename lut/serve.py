"""The table store: serves a MoLE table model's feed-forward layers to the runtime, tables never on the GPU.

Where a token's bytes come from and go, for one forward step with token ids [T]:

    layer 0's ffn call  -> the step begins: its distinct ids U are looked up in the table, ONE contiguous
                           record per id holding the rows of every layer ([L, N, D], lut/tables.py):
                             tables="disk": one pread per id from tables.bin (page cache / disk)
                             tables="ram":  the whole table read once into host RAM, gathered from there
                           the records go to a (pinned) staging buffer, then one copy to the compute
                           device (on its own CUDA stream, started before layer 0's shared FFN runs,
                           which it overlaps), where they are dequantized to [U, L, N, D]
    layer i's ffn call  -> shared FFN(h) + softmax(router(h)) . rows[:, i]     (all N experts, no top-k)

A step too big for `step_bytes` (a long prefill at Mixtral's 2 MB per record) gathers per layer instead:
one contiguous chunk of `chunk_nbytes` per id and layer. Decode steps are one token, one record: the
record is fetched as soon as the sampled token reaches the model, i.e. at the first layer's ffn call, the
first point the token ids cross this seam.

Nothing of the tables stays on the device between steps: `table_bytes_device` is 0 by construction, and
the step's rows buffer is dropped at its last layer. `bytes_disk` counts bytes read from the table file
(by pread; the OS page cache may serve some of them), `bytes_h2d` the bytes copied to the compute
device (on a CPU-only machine: into the compute buffers, the copy a GPU would get over PCIe).

Disk mode reads with pread rather than through a memory map: a tables.bin that shrinks while it is served
(overwritten in place by a rebuild) is then a short read and a one-line error, where a map would kill the
process with SIGBUS.

Dimension legend: T tokens in the step, U distinct token ids, L layers, N experts, D hidden, R record bytes.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import numpy as np
import torch

from quant.blob import is_count
from quant.errors import UserError
from quant.files import pread_exactly
from quant.units import parse_bytes

from .config import TABLE_MODEL_TYPE, MoLEConfig
from .tables import TableLayout

TABLE_MODES = ("disk", "ram")


def open_tables(ckpt) -> tuple[MoLEConfig, Path, TableLayout]:
    """A table folder's config, table file and its layout (header only), checked against each other."""
    cfg = MoLEConfig.from_dict(ckpt.raw_config, source=str(Path(ckpt.path) / "config.json"),
                               model_types=(TABLE_MODEL_TYPE,))
    name, bits = cfg.tables["file"], cfg.tables.get("bits")
    if Path(name).name != name or name in ("", ".", ".."):
        raise UserError(f"{ckpt.path}/config.json: field 'tables.file' must be a file name in the folder, got {name!r}")
    path = Path(ckpt.path) / name
    layout = TableLayout.open(path)
    layout.check_dims(cfg.vocab_size, cfg.num_hidden_layers, cfg.num_local_experts, cfg.hidden_size, str(path))
    if bits is not None and not (is_count(bits) and bits == layout.bits):
        raise UserError(f"{ckpt.path}/config.json: field 'tables.bits' is {json.dumps(bits)} but "
                        f"{path.name} holds {layout.bits}-bit rows")
    return cfg, path, layout


def describe_tables(ckpt) -> dict:
    """What `moe-offload inspect` shows for a table folder: shapes, the table's size and where its bytes go."""
    cfg, path, layout = open_tables(ckpt)
    return {
        "path": str(ckpt.path),
        "kind": "Mixture of Lookup Experts tables (moe-offload lut build)",
        "layers": cfg.num_hidden_layers,
        "table_experts_per_layer": cfg.num_local_experts,
        "hidden_size": cfg.hidden_size,
        "shared_intermediate_size": cfg.shared_intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "row_format": f"{layout.bits}-bit" + (f" (group {layout.group_size})" if layout.bits < 16 else ""),
        "table_file": path.name,
        "bytes_tables": layout.data_nbytes,
        "bytes_per_token_record": layout.record_nbytes,
        # Everything in model.safetensors lives on the device: attention, norms, embeddings, shared FFN, routers.
        "bytes_dense_gpu": ckpt.file_bytes(),
        "bytes_tables_on_gpu": 0,  # a step's rows only, dropped after its last layer
        "bytes_h2d_per_decode_token": layout.record_nbytes,
    }


class _Step:
    """The rows of one forward step: ids, where each position's id sits among the distinct ids, and (when
    the whole step fits `step_bytes`) every layer's decoded rows [U, L, N, D] on the device."""

    def __init__(self, ids: torch.Tensor, uniq: torch.Tensor, inverse: torch.Tensor):
        self.ids, self.uniq, self.inverse = ids, uniq, inverse
        self.chunks: torch.Tensor | None = None  # uint8 [U, L, chunk] on the device, copy maybe in flight
        self.event = None                        # CUDA event: that copy is done
        self.rows: torch.Tensor | None = None    # [U, L, N, D] decoded, after the first wait
        self.in_order = False                    # ids are distinct and sorted: rows need no reordering


class TableStore:
    """Owns the table of a "mole_tables" folder; the model's MoLE blocks (offload.models.mole.TableMoLE)
    ask it for each step's rows (`begin`, then `rows` per layer)."""

    def __init__(self, ckpt, device: torch.device, dtype: torch.dtype, ram=None, tables: str | None = None,
                 vram=None, step_bytes: int = 64 << 20):
        """`ram`: host budget for the tables (bytes or '2GiB'); `tables`: "disk" (read per step) or "ram"
        (default: "ram" when a `ram` budget is given and the tables fit it, else "disk"). `vram`: what the
        device holds is the dense part, the KV cache and one step's rows (offload.runtime checks that they
        fit)."""
        self.ckpt, self.device, self.dtype = ckpt, torch.device(device), dtype
        self.cuda = self.device.type == "cuda"
        self.cfg, self.path, self.layout = open_tables(ckpt)
        self.ram_budget, self.vram_budget = parse_bytes(ram, "--ram"), parse_bytes(vram, "--vram")
        for flag, budget in (("--ram", self.ram_budget), ("--vram", self.vram_budget)):
            if budget is not None and budget <= 0:
                raise UserError(f"{flag} must be positive, got {budget}")
        self.step_bytes = step_bytes
        data = self.layout.data_nbytes
        if tables is None:
            tables = "ram" if self.ram_budget is not None and data <= self.ram_budget else "disk"
        if tables not in TABLE_MODES:
            raise UserError(f"tables must be 'disk' or 'ram', got {tables!r}")
        if tables == "ram" and self.ram_budget is not None and data > self.ram_budget:
            raise UserError(f"--ram {self.ram_budget:,} bytes cannot hold the tables ({data:,} bytes of "
                            f"{self.path.name}); raise --ram or serve them from disk")
        self.mode = tables
        self.fd: int | None = None     # "disk": tables.bin, read with one pread per id
        self.table: torch.Tensor | None = None  # "ram": uint8 [V, R], every record resident in host RAM
        if tables == "ram":
            self.table = self._load_table()
            self.table_np = self.table.numpy()  # the same bytes, for the single-threaded gather in _fetch
        else:
            self.fd = self._open_fd()
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
        self.step: _Step | None = None
        self.reset_stats()

    def _load_table(self) -> torch.Tensor:
        V, R = self.layout.vocab, self.layout.record_nbytes
        # Ordinary (pageable) memory: _fetch gathers each step's records from it into a pinned staging buffer,
        # and only that buffer is DMA'd; page-locking the whole table would take RAM from the OS for nothing.
        host = torch.empty((V, R), dtype=torch.uint8)
        fd = self._open_fd(random_access=False)
        try:
            pread_exactly(fd, memoryview(host.numpy()).cast("B"), self.layout.data_offset, self.path, "the tables")
        finally:
            os.close(fd)
        return host

    def _open_fd(self, random_access: bool = True) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot open ({exc.strerror})") from None
        if random_access and hasattr(os, "posix_fadvise"):
            # Rows are read by token id: read-ahead would fetch neighbours no step asked for.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def close(self) -> None:
        """Close tables.bin (disk mode); the runtime calls this on every store it is done with."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # ---- the runtime's seam ---------------------------------------------------------------------

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """None beyond the model's dense tensors: the rows are in the table file, checked by `open_tables`."""
        return {}

    # ---- rows of a step ------------------------------------------------------------------------

    def begin(self, layer: int, token_ids: torch.Tensor) -> None:
        """At layer 0 (or whenever the ids change) start fetching the step's rows."""
        if layer != 0 and self.step is not None and self.step.ids is token_ids:
            return
        ids = token_ids.to("cpu")  # decode: one id, the token just sampled (a tiny sync on CUDA)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        step = self.step = _Step(token_ids, uniq, inverse.to(self.device))
        step.in_order = uniq.numel() == ids.numel() and bool(torch.equal(uniq, ids))  # decode: always
        self.stats_["table_tokens"] += ids.numel()
        self.stats_["table_steps"] += 1
        if uniq.numel() * self.layout.record_nbytes <= self.step_bytes:
            # Every layer's rows for these ids: one contiguous record per id.
            step.chunks, step.event = self._fetch(uniq)

    def rows(self, layer: int) -> torch.Tensor:
        """This layer's rows for the step's tokens: [T, N, D] on the device, in the compute dtype."""
        step = self.step
        if layer == self.cfg.num_hidden_layers - 1:
            self.step = None  # the last layer: the step's buffers go when this call returns
        if step.chunks is None:  # a step too big to hold all layers: gather this layer's chunk per id
            chunks, event = self._fetch(step.uniq, layer)
            self._wait(event)
            rows = self.layout.decode(chunks, self.dtype)[:, 0]
            return rows if step.in_order else rows.index_select(0, step.inverse)
        if step.rows is None:
            self._wait(step.event)
            step.rows = self.layout.decode(step.chunks, self.dtype)  # [U, L, N, D]
            self.peak_step_bytes = max(self.peak_step_bytes, step.rows.numel() * step.rows.element_size())
        # index_select, not rows[inverse, layer]: advanced indexing of a few thousand values can cost
        # milliseconds on a busy CPU (it wakes the thread pool); index_select stays in microseconds.
        rows = step.rows[:, layer]
        return rows if step.in_order else rows.index_select(0, step.inverse)

    def _fetch(self, uniq: torch.Tensor, layer: int | None = None):
        """Records (all layers) or one layer's chunk of each id in `uniq` -> uint8 [U, L or 1, chunk] on the
        device, and the CUDA event of its copy (None on CPU)."""
        lay = self.layout
        U = uniq.numel()
        if layer is None:
            span = (0, lay.record_nbytes)
        else:
            span = (layer * lay.chunk_nbytes, (layer + 1) * lay.chunk_nbytes)
        n = span[1] - span[0]
        if self.mode == "disk":
            self.stats_["bytes_disk"] += U * n
        self.stats_["bytes_h2d"] += U * n
        # Host side: gather into a staging buffer, pinned with CUDA so the copy below is a real async DMA.
        # A fresh pinned tensor from torch's caching host allocator is not handed out again until the copy
        # that reads it has completed (the allocator records the copy's event), so no step overwrites rows
        # still in flight.
        staging = torch.empty((U, n), dtype=torch.uint8, pin_memory=self.cuda)
        if self.mode == "disk":
            self._read(uniq, span, staging)
        else:
            # numpy's take is a plain single-threaded copy: the gather is bound by memory, and torch's parallel
            # copy would wait for a pool thread, which on a busy CPU costs more than the copy itself.
            np.take(self.table_np[:, span[0]:span[1]], uniq.numpy(), axis=0, out=staging.numpy())
        staging = staging.view(U, -1, lay.chunk_nbytes)
        if not self.cuda:
            return staging, None
        compute = torch.cuda.current_stream(self.device)
        # `dev` is allocated on the copy stream, so the allocator only hands it memory that is free in that
        # stream's order: the copy need not wait for the compute stream (it overlaps the attention still
        # running there). record_stream(compute): when `dev` is freed, its memory is not reused before the
        # compute stream's reads of it (the dequantize in `rows`) have run.
        with torch.cuda.stream(self.copy_stream):
            dev = torch.empty(staging.shape, dtype=torch.uint8, device=self.device)
            dev.copy_(staging, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        dev.record_stream(compute)
        return dev, event

    def _read(self, uniq: torch.Tensor, span: tuple[int, int], staging: torch.Tensor) -> None:
        """One pread per id of bytes [span) of its record, straight into its row of `staging` [U, span]."""
        R, base, n = self.layout.record_nbytes, self.layout.data_offset, span[1] - span[0]
        view = memoryview(staging.numpy()).cast("B")
        for k, i in enumerate(uniq.tolist()):
            pread_exactly(self.fd, view[k * n:(k + 1) * n], base + i * R + span[0], self.path, f"token id {i}")

    def _wait(self, event) -> None:
        if event is not None:
            # Compute waits for this copy only (not the whole copy stream, not the host).
            torch.cuda.current_stream(self.device).wait_event(event)

    # ---- stats ---------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self.stats_ = {"bytes_h2d": 0, "bytes_disk": 0, "table_tokens": 0, "table_steps": 0}
        self.peak_step_bytes = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def dense_bytes(self) -> int:
        """Bytes of every tensor of the folder at the compute dtype: what the device holds besides KV and rows."""
        return sum(loc.nbytes // loc.dtype.itemsize * self.dtype.itemsize for loc in self.ckpt.locations.values())

    def stats(self) -> dict:
        s = dict(self.stats_)
        tokens = max(1, s["table_tokens"])
        s.update({
            "tables": self.mode, "table_bits": self.layout.bits, "record_nbytes": self.layout.record_nbytes,
            "table_bytes_device": 0,  # tables never live on the device; only a step's rows pass through
            "table_bytes_host": self.table.numel() if self.mode == "ram" else 0,
            "table_bytes_file": self.layout.file_nbytes,
            "bytes_h2d_per_token": s["bytes_h2d"] / tokens, "bytes_disk_per_token": s["bytes_disk"] / tokens,
            "peak_step_rows_bytes": self.peak_step_bytes, "dense_bytes": self.dense_bytes(),
            "peak_vram_bytes": int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else self.dense_bytes() + self.peak_step_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device": str(self.device), "ram_budget": self.ram_budget, "vram_budget": self.vram_budget,
        })
        return s
