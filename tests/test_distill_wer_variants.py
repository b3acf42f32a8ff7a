"""benchmarks/distill_wer.py names each CLSR variant by the knobs it sets away from the recipe: rows at the defaults
keep the names and cache keys they had before a knob existed, and a knob set (the gate budget here) gets its own row
key, label and cache key, so two settings never share a cached student."""

from __future__ import annotations

import argparse

from benchmarks.distill_wer import variant


def _args(**changes) -> argparse.Namespace:
    defaults = dict(gate_lr=None, path_dropout=0.3, decoder_lr=None, gate_warmup=0.0, path_dropout_ramp=0.0,
                    gate_budget=0.5, attention=False, path_dropout_on="output", validate_gates="hard")
    return argparse.Namespace(**{**defaults, **changes})


def test_defaults_keep_their_old_names_and_each_knob_names_its_row():
    assert variant(_args()) == ("", "", {})
    suffix, label, knobs = variant(_args(gate_lr=0.01, gate_budget=1.0, path_dropout_on="delta"))
    assert suffix == "-glr0.01-gb1-pdd"
    assert label == ", gate lr 0.01, gate budget 1, path dropout on the delta"
    assert knobs == {"glr": 0.01, "gb": 1.0, "pdd": 1}
    assert variant(_args(gate_lr=0.01, path_dropout_on="delta"))[2] != knobs  # another cached student
