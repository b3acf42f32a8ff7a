"""The repetition guard: loops end the hypothesis and are cut to one copy; ordinary text is untouched."""

from __future__ import annotations

import torch

from inference.decoding import RepetitionGuard, _loop_unit, cut_loop


def test_loop_detection_needs_enough_copies():
    assert _loop_unit([5, 1, 2, 1, 2, 1, 2, 1, 2], repeats=4, max_unit=16) == 2
    assert _loop_unit([5, 1, 2, 1, 2, 1, 2], repeats=4, max_unit=16) == 0  # three copies are not a loop
    assert _loop_unit([9] * 7, repeats=4, max_unit=16) == 0  # single tokens need 8 copies
    assert _loop_unit([3] + [9] * 8, repeats=4, max_unit=16) == 1
    assert _loop_unit(list(range(40)), repeats=4, max_unit=16) == 0


def test_cut_loop_keeps_the_first_copy():
    assert cut_loop([7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]) == [7, 1, 2, 3]
    assert cut_loop([7, 8, 9]) == [7, 8, 9]
    assert cut_loop([4] + [6] * 8) == [4, 6]


def test_guard_forces_end_of_text_only_on_looping_rows():
    guard = RepetitionGuard(eos_token_id=0, repeats=4)
    prompt = torch.tensor([[50, 51], [50, 51]])
    scores = torch.zeros(2, 10)
    guard(prompt, scores.clone())  # first call fixes the prompt length
    looping = torch.cat([prompt, torch.tensor([[3, 4] * 4, [3, 4, 5, 6, 7, 8, 9, 3]])], dim=1)
    out = guard(looping, torch.zeros(2, 10))
    assert out[0].argmax() == 0 and out[0, 1] < -1e30  # row 0: only end-of-text allowed
    assert torch.equal(out[1], torch.zeros(10))  # row 1 untouched
    assert guard.fired == {0}


def test_guard_maps_beams_to_samples():
    guard = RepetitionGuard(eos_token_id=0, repeats=4, num_beams=2)
    ids = torch.tensor([[50, 1, 1], [50, 2, 3], [50, 4, 5], [50, 7, 7]])
    guard(ids[:, :1], torch.zeros(4, 10))
    guard(torch.cat([ids[:, :1], torch.tensor([[2, 3] * 4] * 3 + [[1, 2, 3, 4, 5, 6, 7, 8]])], 1), torch.zeros(4, 10))
    assert guard.fired == {0, 1}  # rows 0-1 are sample 0's beams, row 2 is sample 1's first beam


def test_the_max_length_clash_warning_is_dropped_and_others_kept(caplog):
    """Every decode passes max_new_tokens (the duration bound) while Whisper's generation config sets max_length:
    transformers' warning about the pair fired once per batch; it is dropped, other warnings are not."""
    import logging

    import inference.decoding  # noqa: F401  (installs the filter)

    log = logging.getLogger("transformers.generation.utils")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Both `max_new_tokens` (=44) and `max_length`(=448) seem to have been set. `max_new_tokens` "
                    "will take precedence. Please refer to the documentation for more information.")
        log.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
