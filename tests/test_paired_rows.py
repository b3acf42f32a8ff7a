"""benchmarks/paired_rows.py: any two stored rows of a WER table compared on the same utterances, as the tables
compare their own pairs, without decoding; unknown rows and odd argument counts are refused by name."""

from __future__ import annotations

import json

import pytest

from benchmarks.paired_rows import main
from inference.confidence import format_change
from inference.evaluation import paired_comparison


def _row(errors: list[int]) -> dict:
    return {"test": {"nl": {"utterances": [{"id": f"u{i}", "language": "nl", "word_errors": e, "words": 10}
                                           for i, e in enumerate(errors)]}}}


def test_prints_the_paired_change_of_b_against_a_and_refuses_unknown_rows(tmp_path, capsys):
    a, b = _row([5, 4, 6, 5, 7, 3, 5, 6]), _row([3, 3, 4, 4, 5, 2, 4, 4])
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"rows": {"a": a, "b": b}}))
    assert main([str(path), "--language", "nl", "a", "b"]) == 0
    want = format_change(paired_comparison(a["test"]["nl"], b["test"]["nl"])["nl"])
    assert capsys.readouterr().out == f"b against a: {want}\n" and want.startswith("-")  # b has fewer errors
    with pytest.raises(SystemExit):
        main([str(path), "--language", "nl", "a", "c"])
    assert "no row 'c'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(path), "--language", "nl", "a"])
    assert "in pairs" in capsys.readouterr().err


def test_a_row_of_another_table_on_the_same_clips(tmp_path, capsys):
    """OTHER.json:KEY names a row of another table; rows scored on different utterances are refused."""
    a, b = _row([5, 4, 6, 5, 7, 3, 5, 6]), _row([3, 3, 4, 4, 5, 2, 4, 4])
    here, other = tmp_path / "here.json", tmp_path / "other.json"
    here.write_text(json.dumps({"rows": {"b": b}}))
    other.write_text(json.dumps({"rows": {"a": a, "short": _row([5, 4])}}))
    assert main([str(here), "--language", "nl", f"{other}:a", "b"]) == 0
    want = format_change(paired_comparison(a["test"]["nl"], b["test"]["nl"])["nl"])
    assert capsys.readouterr().out == f"b against {other}:a: {want}\n"
    with pytest.raises(SystemExit):
        main([str(here), "--language", "nl", f"{other}:short", "b"])
    assert "different 'nl' utterances" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(here), "--language", "nl", f"{tmp_path / 'missing.json'}:a", "b"])
    assert "missing.json: not a results JSON" in capsys.readouterr().err


def test_a_row_of_a_one_language_fusion_table(tmp_path, capsys):
    """real_fusion.py's tables keep each row's scores at its top level and the language in ``target``: their rows
    pair with a row of a per-language table; asked for another language they have no counts, which is refused."""
    a, b = _row([5, 4, 6, 5, 7, 3, 5, 6]), _row([3, 3, 4, 4, 5, 2, 4, 4])
    here, fusion = tmp_path / "here.json", tmp_path / "fusion.json"
    here.write_text(json.dumps({"rows": {"b": b}}))
    fusion.write_text(json.dumps({"target": "nl", "rows": {"target-100": {"label": "the target", **a["test"]["nl"]}}}))
    assert main([str(here), "--language", "nl", f"{fusion}:target-100", "b"]) == 0
    want = format_change(paired_comparison(a["test"]["nl"], b["test"]["nl"])["nl"])
    assert capsys.readouterr().out == f"b against {fusion}:target-100: {want}\n"
    with pytest.raises(SystemExit):
        main([str(here), "--language", "cs", f"{fusion}:target-100", "b"])
    assert "no per-utterance counts for 'cs'" in capsys.readouterr().err


def test_rows_of_a_cut_student_table(tmp_path, capsys):
    """cut_student.py's tables keep each row's scores under its language at the row's top level (beside label and
    parameter count), the languages listed in ``languages``; their rows pair among themselves and with others."""
    a, b = _row([5, 4, 6, 5, 7, 3, 5, 6]), _row([3, 3, 4, 4, 5, 2, 4, 4])
    cut, other = tmp_path / "cut.json", tmp_path / "other.json"
    cut.write_text(json.dumps({"languages": ["nl"], "rows": {
        "base": {"label": "whisper-base", "params": 72_600_000, "nl": a["test"]["nl"]},
        "student_kd": {"label": "cut", "params": 64_200_000, "nl": b["test"]["nl"]}}}))
    other.write_text(json.dumps({"rows": {"b": b}}))
    assert main([str(cut), "--language", "nl", "base", "student_kd", "base", f"{other}:b"]) == 0
    want = format_change(paired_comparison(a["test"]["nl"], b["test"]["nl"])["nl"])
    assert capsys.readouterr().out == f"student_kd against base: {want}\n{other}:b against base: {want}\n"
