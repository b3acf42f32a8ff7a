"""Bootstrap intervals of WER and the paired comparison of two systems on the same utterances."""

from __future__ import annotations

import numpy as np
import pytest

from inference.confidence import bootstrap_ci, format_ci, paired_bootstrap, utterance_counts


def test_counts_match_corpus_wer():
    refs = ["a b c d", "e f", "g h i", ""]
    hyps = ["a x c d", "e f g", "", "anything"]
    c = utterance_counts(refs, hyps)
    assert c.word_errors.tolist() == [1, 1, 3, 0] and c.words.tolist() == [4, 2, 3, 0]
    assert c.char_errors.tolist()[1] == 2 and c.chars.tolist()[3] == 0  # empty references count nothing


def test_interval_contains_the_estimate_and_shrinks_with_more_utterances():
    rng = np.random.default_rng(0)
    words = rng.integers(3, 12, 2000)
    errors = rng.binomial(words, 0.3)
    wide = bootstrap_ci(errors[:50], words[:50])
    narrow = bootstrap_ci(errors, words)
    assert wide[0] < errors[:50].sum() / words[:50].sum() < wide[1]
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3
    assert narrow[0] < 0.3 < narrow[1]
    assert np.isnan(bootstrap_ci(np.array([]), np.array([]))[0])


def test_paired_difference_finds_a_real_gain_and_not_a_fake_one():
    rng = np.random.default_rng(1)
    words = rng.integers(3, 12, 300)
    a = rng.binomial(words, 0.4)
    better = rng.binomial(words, 0.3)
    d = paired_bootstrap(a, better, words)
    assert d.difference < 0 and d.significant and d.high < 0 and d.p_value < 0.01
    assert d.relative == pytest.approx(d.difference / d.a)
    same = paired_bootstrap(a, a + rng.integers(-1, 2, 300).clip(min=-a), words)
    assert not same.significant and same.p_value > 0.05
    with pytest.raises(ValueError, match="same utterances"):
        paired_bootstrap(a, a[:-1], words)


def test_format():
    assert format_ci(0.4123, (0.379, 0.448)) == "41.2 [37.9, 44.8]"
    assert format_ci(0.5, None) == "50.0"
