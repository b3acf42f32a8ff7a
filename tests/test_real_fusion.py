"""benchmarks/real_fusion.py's support specs: every kind it trains or reads, and a clear refusal otherwise."""

from __future__ import annotations

import pytest

from benchmarks.real_fusion import parse_supports


def test_support_specs_name_synthetic_real_asterisk_and_file_experts():
    assert parse_supports("sk:synth, nl:real,ru:asterisk,de=runs/de.safetensors") == [
        ("sk", "synth", None), ("nl", "real", None), ("ru", "asterisk", None), ("de", "file", "runs/de.safetensors")]
    with pytest.raises(SystemExit, match="'ru:phone' is not LANG:synth, LANG:real, LANG:asterisk or LANG=FILE"):
        parse_supports("ru:phone")
