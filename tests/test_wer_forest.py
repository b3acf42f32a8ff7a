"""benchmarks/wer_forest.py: rows of several stored WER tables with their intervals and paired changes against
one reference, as a markdown table and a PNG; rows scored on other clips than the reference are refused."""

from __future__ import annotations

import json

import pytest

from benchmarks.paired_rows import Rows
from benchmarks.wer_forest import forest, main, verdict
from inference.confidence import format_change
from inference.evaluation import paired_comparison


def _row(label: str, errors: list[int], ids=None) -> dict:
    ids = ids or [f"u{i}" for i in range(len(errors))]
    utts = [{"id": i, "language": "nl", "word_errors": e, "words": 10} for i, e in zip(ids, errors)]
    wer = sum(errors) / (10 * len(errors))
    return {"label": label, "test": {"nl": {"wer": wer, "wer_ci95": [wer - 0.05, wer + 0.05], "utterances": utts}}}


def test_each_row_against_the_reference_in_order_and_a_png(tmp_path, capsys):
    base, good = _row("base", [6, 5, 7, 6, 8, 5, 6, 7]), _row("expert", [3, 2, 4, 3, 4, 2, 3, 3])
    same = _row("twin", [6, 5, 7, 6, 8, 5, 6, 7])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": {"base": base, "twin": same}}))
    b.write_text(json.dumps({"rows": {"expert": good, "other": _row("x", [1, 2], ids=["v0", "v1"])}}))
    points = forest(Rows(None, "nl"), [f"{b}:expert", f"{a}:twin", f"{a}:base"], ["E", None, None], f"{a}:base")
    assert [p["label"] for p in points] == ["E", "twin", "base"]
    assert points[0]["change"] == paired_comparison(base["test"]["nl"], good["test"]["nl"])["nl"]
    assert [verdict(p["change"]) for p in points] == ["better", "level", "reference"]
    assert points[1]["change"]["difference"] == 0

    png = tmp_path / "f.png"
    assert main([f"{a}:base=whisper-base", f"{b}:expert=E", "--language", "nl", "--against", f"{a}:base",
                 "--out", str(png)]) == 0
    out = capsys.readouterr().out
    want = format_change(points[0]["change"])
    assert f"| E | 30.0 [25.0, 35.0] | {want} |" in out and "| whisper-base | 62.5 [57.5, 67.5] | – |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(SystemExit):
        main([f"{b}:other", "--language", "nl", "--against", f"{a}:base"])
    assert "different 'nl' utterances" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([f"{a}:nope", "--language", "nl", "--against", f"{a}:base"])
    assert "has no row 'nope'" in capsys.readouterr().err


def test_verdict_reads_the_paired_interval():
    assert verdict({"ci95": [0.01, 0.03]}) == "worse"
    assert verdict({"ci95": [-0.03, -0.001]}) == "better"
    assert verdict({"ci95": [-0.03, 0.0]}) == "level"
