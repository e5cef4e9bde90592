"""Byte budgets: parsing human sizes at the edge, and the plan of what lives where under --vram/--ram."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil

from .errors import UserError


def parse_bytes(value: str | int | float | None, flag: str) -> int | None:
    """'12GiB', '512MiB', '1.5GB' or a plain number of bytes -> int bytes; None stays None (= default)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    from accelerate.utils import convert_file_size_to_int

    try:
        return int(convert_file_size_to_int(text.replace(" ", "")))
    except ValueError:
        raise UserError(f"{flag} {value!r} is not a size (use e.g. 12GiB, 512MiB, 1.5GB or a number of bytes)") from None


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
