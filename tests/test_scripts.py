"""The training scripts that made the shipped models still train: a few steps each, into a temporary folder."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import offload
from conftest import run_cli

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
FEW_STEPS = ("--steps", "4", "--warmup", "1", "--batch", "2", "--seq", "64", "--log-every", "1")


def script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_train_mole_lowers_the_loss_and_writes_a_checkpoint_lut_build_serves(tmp_path):
    result = script("train_mole.py", "--only", "mole", *FEW_STEPS, "--mole-out", tmp_path / "mole",
                    "--runs", tmp_path / "runs")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "runs" / "train.json").read_text())["mole"]
    # Untrained, the model guesses about uniformly over the 4096 tokens (loss ln 4096 = 8.32); four steps
    # of gradient descent move it clearly below that.
    assert report["heldout_loss"] < math.log(4096) - 0.3
    built = run_cli("lut", "build", tmp_path / "mole", tmp_path / "tables")
    assert built.returncode == 0, built.stderr
    with offload.load(tmp_path / "tables", device="cpu") as rt:
        assert len(list(rt.generate_ids(rt.encode("The for statement"), 4))) == 4


def test_train_demo_writes_a_mixtral_folder_the_runtime_generates_with(tmp_path):
    result = script("train_demo.py", "--out", tmp_path / "demo", *FEW_STEPS, "--eval-every", "0")
    assert result.returncode == 0, result.stderr
    with offload.load(tmp_path / "demo", device="cpu") as rt:
        assert len(list(rt.generate_ids(rt.encode("The for statement"), 4))) == 4


def test_train_finegrained_writes_a_qwen3_moe_folder_the_runtime_generates_with(tmp_path):
    result = script("train_finegrained.py", "--out", tmp_path / "q", *FEW_STEPS, "--eval-every", "0")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "q" / "train.json").read_text())
    assert report["params"]["one_expert"] == 3 * 192 * 80 and report["heldout_loss"] < math.log(4096)
    with offload.load(tmp_path / "q", device="cpu") as rt:
        assert rt.config.model_type == "qwen3_moe" and rt.config.num_local_experts == 32
        assert len(list(rt.generate_ids(rt.encode("The for statement"), 4))) == 4


def test_an_out_folder_no_training_run_wrote_is_refused_before_training_and_kept(tmp_path):
    notes, model = tmp_path / "notes", tmp_path / "downloaded-model"
    for folder, name in ((notes, "keep.txt"), (model, "config.json")):  # the user's files, a model from the Hub
        folder.mkdir()
        (folder / name).write_text("mine")
    for folder in (notes, model):
        for name, flag in (("train_demo.py", "--out"), ("train_mole.py", "--mole-out")):
            result = script(name, flag, folder, "--steps", "1")
            assert result.returncode != 0 and "was not written by a training script" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
            assert [p.read_text() for p in folder.iterdir()] == ["mine"]


def test_a_folder_a_run_wrote_is_marked_and_a_rerun_replaces_it(tmp_path):
    args = ("--only", "mole", "--steps", "1", "--warmup", "1", "--batch", "1", "--seq", "16",
            "--mole-out", tmp_path / "mole", "--runs", tmp_path / "runs")
    (tmp_path / "mole.tmp").mkdir()  # the user's, with the name the scripts once wrote into (and first cleared)
    (tmp_path / "mole.tmp" / "keep.txt").write_text("mine")
    assert script("train_mole.py", *args).returncode == 0
    assert (tmp_path / "mole" / ".trained-by-moe-offload").is_file()
    result = script("train_mole.py", *args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mole.tmp" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mole", "mole.tmp", "runs"]  # no work folder left


def test_a_run_that_fails_removes_its_work_folder(tmp_path):
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); from outfolder import work_folder; "
            "(work_folder(Path(sys.argv[2])) / 'half.safetensors').write_bytes(b'x'); raise SystemExit('boom')")
    result = subprocess.run([sys.executable, "-c", code, SCRIPTS, tmp_path / "out"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "boom" in result.stderr
    assert list(tmp_path.iterdir()) == []
