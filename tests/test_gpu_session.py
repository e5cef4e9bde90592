"""bench/gpu_session.sh and bench/gpu_first.py, the first GPU call's script, run on a CPU: its steps in the
issue's order within the call's time, a clean skip without CUDA, and the Python stages' logic over a small
model on the CPU (what a GPU call must not be the first to find broken)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_first  # noqa: E402  (bench/gpu_first.py, a program)

ORDER = ["env", "pytest-gpu", "slice", "profile", "h2d", "compare", "gemv"]  # what the first call answers, in order


def session(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu_session.sh", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=env)


def steps(stdout: str) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^  (\S+)\s+~\s*(\d+) s ", stdout, re.M)]


def test_the_first_call_lists_its_steps_in_order_within_six_minutes():
    result = session("first", "--dry-run")
    assert result.returncode == 0, result.stderr
    listed = steps(result.stdout)
    assert [name for name, _ in listed] == ORDER
    assert sum(seconds for _, seconds in listed) <= 360
    # A stage of gpu_first.py is expected to take what gpu_first.py says it takes.
    for name, seconds in listed:
        if name in gpu_first.STAGES:
            assert seconds == gpu_first.STAGES[name][1], name
    assert "pytest -m gpu" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip on a machine without CUDA")
def test_without_cuda_the_session_skips_cleanly_and_says_what_it_would_run():
    for what in ("first", "checks", "compare"):
        result = session(what)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("no CUDA device: skipped") and steps(result.stdout)
    result = subprocess.run([sys.executable, "bench/gpu_first.py"], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0 and "skipped: no CUDA device" in result.stdout


def test_bad_arguments_are_one_line_and_exit_2():
    result = session("sometimes")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "usage:" in result.stderr
    for args in (["--stage", "nope"], ["--device", "cpu"]):
        result = subprocess.run([sys.executable, "bench/gpu_first.py", *args], capture_output=True, text=True,
                                cwd=REPO, timeout=300)
        assert result.returncode == 2 and "error:" in result.stderr


def test_the_stages_run_over_a_small_model_on_the_cpu(tiny_checkpoint, tmp_path):
    """What can run on a CPU runs: the 4-bit conversion, the profiles (their record's fields), (a) against
    accelerate; the GPU-only stages say they were skipped. Every stage lands in the one record."""
    out = tmp_path / "results" / "first-gpu.json"
    result = subprocess.run([sys.executable, "bench/gpu_first.py", "--device", "cpu", "--model", str(tiny_checkpoint),
                             "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["torch"] == torch.__version__ and "triton" in record and record["device"].startswith("CPU")
    stages = record["stages"]
    assert list(stages) == list(gpu_first.STAGES)
    assert not any("error" in s for s in stages.values()), stages
    assert {k for k, s in stages.items() if "skipped" in s} == {"env", "h2d", "gemv"}
    for name in ("bf16", "q4"):
        p = stages["profile"][name]
        assert p["tokens_per_s"] > 0 and 0 < p["peak_vram_vs_budget"] <= 1
        assert (tmp_path / "results" / f"profile-{name}" / "trace.json").is_file()
    assert stages["compare"]["a_vs_b"] > 0
