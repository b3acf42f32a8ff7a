"""The one-time encoder pass reads a featurized dataset's log-mels in numpy format, a batch slice at a time, and
stores what the live encoder computes for every row, in row order (batches of uneven size included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def featurized():
    from datasets import Dataset

    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((80, 3000)).astype(np.float16) for _ in range(5)]
    # stored as a featurize() result is: float16 log-mels beside the label columns, arrow-backed
    return Dataset.from_dict({"input_features": feats, "labels": [[1, 2]] * 5}).map(lambda b: b, batched=True)


@pytest.mark.parametrize("layer", [None, 1], ids=["output", "layer-1-input"])
def test_cache_rows_equal_the_live_encoder_in_order(featurized, tiny_whisper, tmp_path, layer):
    from trainers.data import EncoderCache, encode_until, feature_column

    model, _ = tiny_whisper
    encoder = model.model.encoder
    column = feature_column(featurized)
    assert isinstance(column[0:2], np.ndarray)  # a slice is one stacked array, not Python lists
    cache = EncoderCache(tmp_path / "c.npy", encoder, column, batch_size=2, progress=False, layer=layer,
                         device="cpu")
    assert len(cache) == 5
    with torch.inference_mode():
        x = torch.from_numpy(np.stack([np.asarray(f, dtype=np.float32) for f in featurized["input_features"]]))
        live = encoder(x).last_hidden_state if layer is None else encode_until(encoder, x, layer)
    for i in range(5):  # float16 storage: equal to half precision
        torch.testing.assert_close(cache[i], live[i].half().float(), rtol=2e-3, atol=2e-3)


def test_cache_is_reused_and_a_plain_list_still_works(featurized, tiny_whisper, tmp_path):
    from trainers.data import EncoderCache, feature_column

    model, _ = tiny_whisper
    encoder = model.model.encoder
    first = EncoderCache(tmp_path / "c.npy", encoder, feature_column(featurized), batch_size=4, progress=False)
    stamp = (tmp_path / "c.npy").stat().st_mtime_ns
    again = EncoderCache(tmp_path / "c.npy", encoder, feature_column(featurized), progress=False)
    assert (tmp_path / "c.npy").stat().st_mtime_ns == stamp  # read back, not recomputed
    listed = EncoderCache(tmp_path / "l.npy", encoder, list(featurized["input_features"]), batch_size=3,
                          progress=False)
    for i in range(5):
        torch.testing.assert_close(again[i], first[i])
        torch.testing.assert_close(listed[i], first[i])
