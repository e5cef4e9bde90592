"""What every benchmark shares: where records go, the prompt, naming the device, syncing around timings."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The for statement is used to iterate over the elements of a sequence"


def device_name(device: str) -> str:
    """The device a record was measured on, as the record names it."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (None where the OS has none): a record says how busy the
    machine was, since other work on it slows every contender, if not evenly."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def step_clock(device: str) -> tuple[str, Callable[[], float]]:
    """The clock decode steps are timed with, and its name. On a CPU running torch on one thread: this process's
    CPU time, which counts the work a step did and not the time the OS gave the core to other processes (on a
    shared machine that moves wall-clock speeds 3x between runs of one setting). Otherwise the wall clock: a
    GPU's work is not the host's CPU time, and several CPU threads' times add up."""
    if not device.startswith("cuda") and torch.get_num_threads() == 1:
        return "process CPU time (one torch thread)", time.process_time
    return "wall clock", time.perf_counter


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer around it measures the work and not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def save_record(record: dict, out: Path) -> None:
    """Write the record whole or not at all (a temporary file, then a rename): a benchmark saves after each
    part it measures, so one stopped part-way (a deadline, Ctrl-C) keeps the last complete record."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(part, out)
