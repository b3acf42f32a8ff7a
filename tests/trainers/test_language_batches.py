"""The language batch sampler: one language per batch, every row once per epoch, sharded across ranks."""

from __future__ import annotations

import pytest

from trainers.language_batches import LanguageBatchSampler

LANGUAGES = ["uk"] * 7 + ["pt"] * 5 + ["nl"] * 2
LENGTHS = [5, 9, 3, 7, 7, 2, 11, 4, 4, 8, 1, 6, 3, 10]


def test_batches_hold_one_language_and_cover_every_row_once():
    sampler = LanguageBatchSampler(LANGUAGES, LENGTHS, batch_size=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 1
    assert all(len({LANGUAGES[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(LANGUAGES)))
    # Within a language, batches are length-grouped: the longest row of a batch is no longer than the next one's
    # shortest (rows sorted by length before chunking).
    for lang in ("uk", "pt"):
        mine = sorted((b for b in batches if LANGUAGES[b[0]] == lang), key=lambda b: min(LENGTHS[i] for i in b))
        for a, b in zip(mine, mine[1:]):
            assert max(LENGTHS[i] for i in a) <= min(LENGTHS[i] for i in b)


def test_order_changes_per_epoch_and_is_seeded():
    sampler = LanguageBatchSampler(LANGUAGES, LENGTHS, batch_size=2, seed=0)
    assert sampler.batches(0) == LanguageBatchSampler(LANGUAGES, LENGTHS, batch_size=2, seed=0).batches(0)
    assert sampler.batches(0) != sampler.batches(1)
    ordered = LanguageBatchSampler(LANGUAGES, LENGTHS, batch_size=2, shuffle=False)
    assert [LANGUAGES[b[0]] for b in ordered.batches(0)] == ["uk"] * 4 + ["pt"] * 3 + ["nl"]


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_share_the_batches_with_equal_step_counts(replicas):
    ranks = [LanguageBatchSampler(LANGUAGES, LENGTHS, 3, seed=2, num_replicas=replicas, rank=r)
             for r in range(replicas)]
    shares = [list(s) for s in ranks]
    assert len({len(s) for s in shares}) == 1 and all(len(s) == len(ranks[0]) for s in shares)
    seen = [i for share in shares for b in share for i in b]
    assert set(seen) == set(range(len(LANGUAGES)))  # repeats only pad the last steps
    assert all(len({LANGUAGES[i] for i in b}) == 1 for share in shares for b in share)


def test_one_language_per_row_is_required():
    with pytest.raises(ValueError, match="one language per row"):
        LanguageBatchSampler(["uk"], [1, 2], batch_size=1)
