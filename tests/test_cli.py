"""The command line: every level's --help teaches with an example; user errors are one clear line."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from trainers.cli import build_parser, main


def _help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _command_paths(parser, prefix=()):
    """Every command path of the parser tree: (), ("base",), ("base", "import"), ..."""
    yield list(prefix)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*prefix, name))


@pytest.mark.parametrize("argv", list(_command_paths(build_parser())), ids=lambda a: " ".join(a) or "top")
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


def test_corpus_synth_then_eval_writes_the_json_report(tiny_whisper_dir, tmp_path, capsys):
    import json

    data = tmp_path / "corpus"
    assert main(["corpus", "synth", "--languages", "de,uk", "--per-language", "5", "--out", str(data), "--quiet"]) == 0
    out = tmp_path / "reports" / "eval.json"
    assert main(["eval", "--base", str(tiny_whisper_dir), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "| language | n | WER %" in printed and "max_new_tokens=8 (explicit)" in printed
    report = json.loads(out.read_text())
    for lang in ("de", "uk"):
        assert set(report["languages"][lang]) >= {"wer", "cer", "wer_raw", "cer_raw", "n", "rtf"}
    assert report["meta"]["split"] == "test" and report["meta"]["base_fingerprint"]
    # An unknown forced language is refused with the list of known ones.
    assert main(["eval", "--base", str(tiny_whisper_dir), "--data", str(data), "--language", "xx"]) == 2
    assert "unknown language 'xx'" in capsys.readouterr().err


def test_eval_refuses_an_unwritable_report_path_before_decoding(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["eval", "--data", str(tmp_path), "--out", str(blocker / "sub" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the evaluation report" in err and "--out" in err


def test_train_names_a_dangling_runs_link_before_any_work(tmp_path, capsys, monkeypatch):
    # seen on a fresh machine: a checkout's runs/ was a link to a directory that machine lacked
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").symlink_to(tmp_path / "elsewhere" / "runs")
    assert main(["train", "--data", str(tmp_path / "no-corpus"), "--language", "nl", "--name", "nl-x"]) == 2
    err = capsys.readouterr().err
    assert "runs is a symbolic link to" in err and "does not exist" in err and "--run-dir" in err


def test_train_store_and_evaluate_an_expert_from_the_command_line(tiny_whisper_dir, tmp_path, capsys, monkeypatch):
    import json

    from tests.tiny import make_tiny_whisper

    monkeypatch.setenv("WHISPER_EXPERTS_HOME", str(tmp_path / "home"))
    data = tmp_path / "corpus"
    assert main(["corpus", "synth", "--languages", "uk", "--per-language", "8", "--out", str(data), "--quiet"]) == 0
    assert main(["train", "--base", str(tiny_whisper_dir), "--data", str(data), "--language", "uk", "--name",
                 "uk-tiny", "--rank", "2", "--epochs", "1", "--batch-size", "4", "--run-dir", str(tmp_path / "run"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "stored uk-tiny@1 in the registry" in out and "| uk |" in out
    assert main(["registry", "list", "--language", "uk"]) == 0
    assert "uk-tiny@1" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert main(["eval", "--base", str(tiny_whisper_dir), "--data", str(data), "--expert", "uk-tiny@latest",
                 "--max-new-tokens", "4", "--out", str(report)]) == 0
    meta = json.loads(report.read_text())["meta"]
    assert meta["expert"]["ref"] == "uk-tiny@1" and meta["expert"]["languages"] == ["uk"]
    # The same expert on another base (different weights, same tokenizer) is refused, naming both bases.
    other = make_tiny_whisper(tmp_path / "other-tiny", seed=7)
    capsys.readouterr()
    assert main(["eval", "--base", str(other), "--data", str(data), "--expert", "uk-tiny@latest"]) == 2
    err = capsys.readouterr().err
    assert "was trained on base" in err and "--force" in err
