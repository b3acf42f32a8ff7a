"""What a stock machine needs: dependencies declared (not borrowed from the machine), a `--help` that imports
no torch, example configs that travel with the wheel, files written with the mode the umask gives."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_torch_is_a_range_and_what_the_cli_imports_is_declared():
    deps = PYPROJECT["project"]["dependencies"]
    torch = next(d for d in deps if d.startswith("torch"))
    assert "==" not in torch and ">=" in torch  # a user's CUDA torch is never replaced by a pin
    # LightningCLI needs jsonargparse; audio needs PyAV and soxr: none of them may come from the machine
    assert {"jsonargparse", "av", "soxr", "lightning", "peft", "transformers"} <= _requirement_names(deps)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"user", "bundled", "test", "test-weights", "export", "all"} <= set(extras)
    assert "ctranslate2" in _requirement_names(extras["export"])


def test_every_example_ships_in_the_wheel():
    patterns = PYPROJECT["tool"]["setuptools"]["data-files"]["share/whisper-experts/examples"]
    shipped = {p.name for pattern in patterns for p in ROOT.glob(pattern)}
    assert shipped == {p.name for p in (ROOT / "examples").iterdir() if p.is_file()}


def test_example_configs_resolve_outside_a_clone(tmp_path, monkeypatch):
    from trainers.cli import common

    installed = tmp_path / "share" / "whisper-experts" / "examples"
    installed.mkdir(parents=True)
    (installed / "train_lora_uk.yaml").write_text("rank: 4\n")
    monkeypatch.setattr(common, "INSTALLED_EXAMPLES", installed)
    monkeypatch.chdir(tmp_path)  # no examples/ here
    assert common.resolve_config("examples/train_lora_uk.yaml") == str(installed / "train_lora_uk.yaml")
    assert common.resolve_config_args(["fit", "--config", "examples/train_lora_uk.yaml", "--model.rank", "8"])[2] \
        == str(installed / "train_lora_uk.yaml")
    assert common.resolve_config("examples/missing.yaml") == "examples/missing.yaml"  # left for the error


@pytest.mark.parametrize("command", ["", "train", "eval", "corpus fetch", "registry export", "pack create",
                                     "transcribe", "distill", "fuse", "base export", "router", "quickstart"])
def test_help_imports_neither_torch_nor_transformers(command):
    code = ("import sys\nfrom trainers.cli import main\n"
            f"try:\n    main({(command.split() + ['--help'])!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'lightning', 'peft') if m in sys.modules]\n"
            "sys.exit(f'imported {heavy}' if heavy else 0)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-500:]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    from registry.atomic import atomic_write_bytes, new_staging_dir

    old = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "object.safetensors", b"x")
        staging = new_staging_dir(tmp_path / "base")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert staging.stat().st_mode & 0o777 == mode | ((mode & 0o444) >> 2)  # directories also get x where r
