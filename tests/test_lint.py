"""The lint: the repository passes the pinned ruff with the configuration in pyproject.toml (pyflakes and
pycodestyle errors and warnings, 120 columns), so an unused import or a name used before it exists is caught
here rather than by a user."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    here = Path(sys.executable).parent / "ruff"  # the test extra installs it beside this interpreter
    found = str(here) if here.is_file() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: install the test extra (pip install -e '.[test]'), which pins it")
    return found


def test_the_repository_passes_the_pinned_lint():
    out = subprocess.run([_ruff(), "check", "--no-cache", "--output-format", "concise", str(ROOT)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, f"ruff check found problems (run `ruff check .`):\n{out.stdout}{out.stderr}"


def test_the_lint_catches_an_unused_import(tmp_path):
    """The configuration is live: the same command fails on a file with a pyflakes finding."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    out = subprocess.run([_ruff(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "F401" in out.stdout
