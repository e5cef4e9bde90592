"""The layer contracts of pyproject.toml ([tool.importlinter]): imports go down the layers only, every
module of offload sits in a layer, and sibling modules import each other in no cycle. Checked by
import-linter on the source tree, and shown to catch an upward import added on purpose."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGES = ("cli", "offload", "lut", "quant")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's check of the tree at `root` against its pyproject.toml, in a fresh interpreter."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_the_layer_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_them(tmp_path):
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("demo_model", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "offload" / "models" / "norms.py", "a") as f:
        f.write("\nfrom offload.runtime import load  # noqa: E402  the models layer reaching up to the runtime\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "offload.models is not allowed to import offload.runtime" in result.stdout
    assert "offload.models.norms -> offload.runtime" in result.stdout
