"""Byte budgets: the plan of what lives where under --vram/--ram (sizes are parsed by quant.units)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil

import quant
from quant.errors import UserError

from ..models import family
from ..models.config import ModelConfig


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def default_ram_budget() -> int:
    """What the machine can spare for pinned experts: 80% of the memory available now."""
    return int(psutil.virtual_memory().available * 0.8)


@dataclass(frozen=True)
class MemoryPlan:
    """How the device budget splits: dense weights + KV cache + workspace margin + expert slots."""

    device: str
    vram_budget: int
    ram_budget: int
    dense_bytes: int
    kv_bytes: int
    margin_bytes: int
    blob_bytes: int
    experts_total: int
    experts_per_token: int
    device_slots: int
    host_slots: int

    @property
    def expert_pool_bytes(self) -> int:
        return self.device_slots * self.blob_bytes

    def as_dict(self) -> dict:
        return asdict(self) | {"expert_pool_bytes": self.expert_pool_bytes}

    @classmethod
    def make(cls, device: str, vram: int | None, ram: int | None, dense_bytes: int, kv_bytes: int,
             margin_bytes: int, blob_bytes: int, experts_total: int, experts_per_token: int,
             free_device_bytes: int | None) -> "MemoryPlan":
        """Check the budgets and size both expert pools; raise UserError with the numbers when they cannot work."""
        fixed = dense_bytes + kv_bytes + margin_bytes
        if vram is None:
            # Default: what the device has free (CUDA), or room for every expert (CPU slot pool).
            vram = free_device_bytes if free_device_bytes is not None else fixed + experts_total * blob_bytes
        if vram < fixed + blob_bytes:
            raise UserError(f"--vram {human(vram)} cannot hold the dense part ({human(dense_bytes)}) + KV cache "
                            f"({human(kv_bytes)}) + workspace ({human(margin_bytes)}) + one expert ({human(blob_bytes)}): "
                            f"need at least {human(fixed + blob_bytes)}")
        device_slots = min(experts_total, (vram - fixed) // blob_bytes)
        if ram is None:
            ram = default_ram_budget()
        if ram <= 0:
            raise UserError(f"--ram must be positive, got {ram}")
        least = max(2, experts_per_token)
        if ram < least * blob_bytes:
            raise UserError(f"--ram {human(ram)} cannot hold {least} experts ({human(least * blob_bytes)}), the least "
                            f"the host tier needs to stream one layer's experts from disk")
        host_slots = min(experts_total, ram // blob_bytes)
        return cls(device, vram, ram, dense_bytes, kv_bytes, margin_bytes, blob_bytes, experts_total,
                   experts_per_token, int(device_slots), int(host_slots))


def device_bytes_free(device) -> int:
    """What a CUDA device can still give this process: free on the device, plus what torch's caching
    allocator holds reserved but unused (a runtime loaded before this one and dropped leaves its blocks)."""
    import torch

    reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + reserved_unused


# ---- what the device tier must hold besides experts (one definition, used by the store and by `inspect`) ----

def dense_bytes(cfg: ModelConfig, itemsize: int, dense_format: tuple[int, int] | None = None) -> int:
    """Every weight that is not a routed expert (embeddings, attention, norms, routers, lm_head, a family's
    shared parts), at `itemsize`; with a dense format (bits, group size), the attention projections as
    quantized bytes."""
    fam = family(cfg)
    quantized = fam.attention_shapes(cfg) if dense_format else {}
    total = 0
    for name, shape in fam.dense_shapes(cfg).items():
        if name in quantized:
            total += quant.quantized_nbytes(shape, *dense_format)
        else:
            n = 1
            for s in shape:
                n *= s
            total += n * itemsize
    return total


def kv_bytes(cfg: ModelConfig, context: int, itemsize: int) -> int:
    """The preallocated KV cache: keys and values [L, K, S, Hd]."""
    S = min(context, cfg.max_position_embeddings)
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * S * cfg.head_dim * itemsize


def check_table_vram(store, context: int) -> None:
    """A MoLE table folder's --vram must hold what its device always holds: the dense part (every tensor of
    the folder), the KV cache, and a decode step's table rows [L, N, D]. A prompt's rows (up to the table
    store's `step_bytes` of records per step) come on top during prefill."""
    if store.vram_budget is None:
        return
    cfg, size = store.cfg, store.dtype.itemsize
    parts = {"the dense part": store.dense_bytes(), "KV cache": kv_bytes(cfg, context, size),
             "one token's table rows": cfg.num_hidden_layers * cfg.num_local_experts * cfg.hidden_size * size}
    need = sum(parts.values())
    if store.vram_budget < need:
        raise UserError(f"--vram {human(store.vram_budget)} cannot hold "
                        + " + ".join(f"{k} ({human(v)})" for k, v in parts.items()) + f": need at least {human(need)}")


def workspace_bytes(cfg: ModelConfig, context: int, itemsize: int, cuda: bool) -> int:
    """Workspace for a full-context prefill: the experts' [T, F] intermediates and the attention scores
    [H, T, T], plus the CUDA allocator's slack."""
    T = min(context, cfg.max_position_embeddings)
    act = (3 * T * cfg.intermediate_size + cfg.num_attention_heads * T * T + 4 * T * cfg.hidden_size) * itemsize
    return act + (256 << 20 if cuda else 0)


def plan_memory(cfg: ModelConfig, itemsize: int, device: str, vram: int | None, ram: int | None, context: int,
                blob_bytes: int, free_device_bytes: int | None = None, dense: int = 0,
                dense_format: tuple[int, int] | None = None) -> MemoryPlan:
    """The MemoryPlan of a model under these budgets, from its config alone (no weights are read)."""
    cuda = device.startswith("cuda")
    return MemoryPlan.make(
        device=device, vram=vram, ram=ram, dense_bytes=dense or dense_bytes(cfg, itemsize, dense_format),
        kv_bytes=kv_bytes(cfg, context, itemsize), margin_bytes=workspace_bytes(cfg, context, itemsize, cuda),
        blob_bytes=blob_bytes, experts_total=cfg.experts_total,
        experts_per_token=cfg.num_experts_per_tok, free_device_bytes=free_device_bytes)


def expected_traffic(plan: MemoryPlan, layers: int, hit_rate: float, bandwidth: float) -> dict:
    """Bytes an average decode step moves when a fraction `hit_rate` of expert uses hit the device slots.

    Misses copy one blob host->device each. A miss that is not in the host tier is first read from disk;
    with accesses spread evenly over the experts, that is a fraction 1 - host_slots / experts_total of them
    (0 when every expert fits in RAM)."""
    uses = layers * plan.experts_per_token
    misses = uses * (1 - hit_rate)
    h2d = misses * plan.blob_bytes
    disk = h2d * (1 - plan.host_slots / plan.experts_total)
    return {"hit_rate": hit_rate, "expert_uses_per_token": uses, "misses_per_token": misses,
            "bytes_h2d_per_token": int(h2d), "bytes_disk_per_token": int(disk), "bandwidth_bytes_per_s": bandwidth,
            "transfer_bound_s_per_token": h2d / bandwidth}
