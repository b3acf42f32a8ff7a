"""Every example script runs (smoke test on the tiny Whisper)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_base_example(tiny_whisper_dir, tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, str(ROOT / "examples" / "evaluate_base.py"), "--base", str(tiny_whisper_dir),
                    "--languages", "de,uk", "--per-language", "4", "--out", str(out)], check=True, cwd=tmp_path,
                   capture_output=True)
    report = json.loads((out / "report.json").read_text())
    assert set(report["languages"]) == {"de", "uk"}


def test_every_example_config_is_headed_by_the_command_that_runs_it():
    configs = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# whisper-experts ") and f"examples/{path.name}" in first, path.name
