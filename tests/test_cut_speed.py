"""benchmarks/cut_speed.py: decoding time of a cut student against output length, on a tiny real-shaped Whisper;
the timings themselves are never asserted on, only their shape and the arithmetic made of them."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.cut_speed import cuts, fit_line, generate_seconds, main, measure, parse_ints, plot, table


def test_parse_ints_refuses_unclear_lists():
    assert parse_ints("16,1", "--batch-sizes") == [1, 16]
    for bad in ("0,4", "a", "", "4,4"):
        with pytest.raises(SystemExit, match="--tokens"):
            parse_ints(bad, "--tokens")


def test_fit_line_recovers_fixed_and_per_token_cost():
    fixed, per = fit_line([8, 48, 96], [1.0 + 0.02 * n for n in (8, 48, 96)])
    assert fixed == pytest.approx(1.0) and per == pytest.approx(0.02)
    assert fit_line([8, 8], [1.0, 3.0]) == (2.0, 0.0)


def test_measure_a_cut_against_its_base(short_whisper, tmp_path):
    cut = cuts(short_whisper, [1])
    assert list(cut) == ["dec1"] and cut["dec1"]["model"].config.decoder_layers == 1
    assert cut["dec1"]["layers"] == [1]  # one layer kept: the last, as `base shrink` keeps it
    feats = torch.randn(2, 80, 100)
    assert generate_seconds(cut["dec1"]["model"], feats, 5, "cs") > 0
    times = measure({"base": short_whisper, "dec1": cut["dec1"]["model"]}, {1: feats[:1], 2: feats}, [2, 6],
                    rounds=1, language="cs", progress=False)
    for m in ("base", "dec1"):
        for b in ("1", "2"):
            cell = times[m][b]
            assert set(cell["seconds"]) == {"2", "6"} and all(len(v) == 1 for v in cell["all_seconds"].values())
            assert cell["seconds"]["2"] > 0
            fixed, per = fit_line([2.0, 6.0], [cell["seconds"]["2"], cell["seconds"]["6"]])
            assert (cell["fixed_s"], cell["per_token_s"]) == pytest.approx((fixed, per))

    results = {"command": "python benchmarks/cut_speed.py", "tokens": [2, 6], "batch_sizes": [1, 2], "rounds": 1,
               "language": "cs", "data": "corpus", "transcript_tokens_median": 12, "threads": 2, "device": "CPU",
               "times": times,
               "models": {"base": {"label": "tiny", "layers": [0, 1], "parameters": 1},
                          "dec1": {"label": "tiny-dec1", "layers": [1], "parameters": 1}}}
    md = table(results)
    assert "| 2 | per token, ms (fit) |" in md and "12 tokens, median" in md and "tiny-dec1: decoder layers [1]" in md
    ratio = times["dec1"]["2"]["seconds"]["6"] / times["base"]["2"]["seconds"]["6"]
    assert f"({ratio:.2f}x)" in md
    plot(results, tmp_path / "speed.png")
    assert (tmp_path / "speed.png").stat().st_size > 0
    # --table-only rewrites table and plot from the JSON alone
    (tmp_path / "s.json").write_text(json.dumps(results))
    assert main(["--table-only", "--out", str(tmp_path), "--name", "s"]) == 0
    assert (tmp_path / "s.md").read_text() == md


def test_generate_seconds_refuses_a_short_output(short_whisper):
    class Early:  # stops before the asked length, as a model that ignored min_new_tokens would
        def generate(self, **kw):
            return torch.zeros(1, kw["max_new_tokens"] - 1, dtype=torch.long)

    with pytest.raises(RuntimeError, match="asked for 4"):
        generate_seconds(Early(), torch.zeros(1, 80, 100), 4, "cs")
