"""The command line: every level's --help teaches with an example; user errors are one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainers.cli import COMMANDS, build_parser, main


def _help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], *[[c] for c in COMMANDS],
                                  ["base", "import"], ["base", "list"], ["corpus", "synth"], ["corpus", "sources"]])
def test_every_help_has_an_example(argv, capsys):
    out = _help(argv, capsys)
    assert "example" in out and "whisper-experts" in out


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "trainers.cli", "--help"], capture_output=True, text=True, check=True)
    assert "quickstart" in out.stdout


def test_user_errors_are_one_line_with_exit_code_2(capsys, tmp_path):
    assert main(["base", "info", "whisper-nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown base 'whisper-nope'") and "Traceback" not in err
    assert main(["eval", "--data", str(tmp_path / "missing"), "--base", "whisper-nope"]) == 2
    assert "error:" in capsys.readouterr().err


def test_base_list_shows_bundled_names(capsys):
    assert main(["base", "list"]) == 0
    out = capsys.readouterr().out
    assert "whisper-base" in out and "whisper-tiny.en" in out


def test_parser_builds_all_commands():
    parser = build_parser()
    assert {a.dest for a in parser._actions} >= {"home", "debug", "command"}
