"""Cached vs online teachers: the same KD loss up to top-k truncation (exactly with k = vocab); reuse and keys."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distill.losses import DistillationLoss, DistillationLossConfig, JensenShannonLoss, topk_teacher
from distill.sources import CachedTeacher, OnlineTeacher
from distill.teacher_cache import TeacherCache, utterance_key
from distill.teachers import Teacher, TeacherSet
from tests.distill.clsr_helpers import FEATS3, IDS3


def _teachers(model, fingerprint="f" * 16) -> TeacherSet:
    base = SimpleNamespace(name="short", fingerprint=fingerprint, tokenizer_fingerprint="t")
    return TeacherSet([Teacher(model, base)], ["short"])


def _rows_and_batch():
    """Three utterances of different lengths as training rows, and the padded batch of all three."""
    import datasets

    lengths = (6, 4, 5)
    ids = [IDS3[i, :n].tolist() for i, n in enumerate(lengths)]
    labels = [x[1:] + [50257] for x in ids]
    for lab in labels:
        lab[:3] = [-100] * 3
    rows = datasets.Dataset.from_dict({
        "input_features": [f.numpy().astype(np.float16) for f in FEATS3], "decoder_input_ids": ids,
        "labels": labels, "language": ["uk", "de", "pt"]})
    width = max(lengths)
    dec = torch.full((3, width), 50257)
    lab = torch.full((3, width), -100)
    for i, (x, y) in enumerate(zip(ids, labels)):
        dec[i, :len(x)], lab[i, :len(y)] = torch.tensor(x), torch.tensor(y)
    feats = torch.from_numpy(np.stack([np.asarray(f, dtype=np.float32) for f in rows["input_features"]]))
    batch = {"input_features": feats, "decoder_input_ids": dec, "labels": lab, "language": ["uk", "de", "pt"],
             "index": torch.tensor([0, 1, 2])}
    return rows, batch


@pytest.fixture(scope="module")
def student_logits():
    return 2.0 * torch.randn(3, 6, 51865, generator=torch.Generator().manual_seed(3))


def test_cached_equals_online_with_k_equal_vocab(short_whisper, tmp_path, student_logits):
    rows, batch = _rows_and_batch()
    online = OnlineTeacher(_teachers(short_whisper))
    vocab = short_whisper.config.vocab_size
    cached = CachedTeacher(_teachers(short_whisper), TeacherCache(tmp_path, k=vocab, dtype="float32"), batch_size=2,
                           device="cpu", progress=False, precision="32")
    report = cached.prepare(rows)
    assert report["computed"] == 3 and report["mass_kept"]["min"] == pytest.approx(1.0, abs=1e-4)
    loss = DistillationLoss(DistillationLossConfig())
    a = loss(student_logits, online.teacher_for(batch), batch["labels"])
    b = loss(student_logits, cached.teacher_for(batch), batch["labels"])
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.kd, b.kd, rtol=1e-5, atol=1e-5)


def test_top_k_truncation_is_measured_and_shrinks_with_k(short_whisper, tmp_path, student_logits):
    rows, batch = _rows_and_batch()
    online_logits = OnlineTeacher(_teachers(short_whisper)).teacher_for(batch)
    kd, keep = JensenShannonLoss(), batch["labels"] != -100
    full = kd(student_logits, online_logits, batch["labels"])
    errors = []
    for k in (4, 512, 16384):
        cached = CachedTeacher(_teachers(short_whisper), TeacherCache(tmp_path, k=k), device="cpu", progress=False,
                               precision="32")
        report = cached.prepare(rows)
        # The reported mass is the teacher's probability inside its top-k at the target positions.
        want = topk_teacher(online_logits, k).logprobs.exp().sum(-1)[keep]
        assert report["mass_kept"]["mean"] == pytest.approx(float(want.mean()), rel=2e-3)
        assert report["mass_kept"]["min"] == pytest.approx(float(want.min()), rel=2e-3)
        # float16 storage: the cached loss is the loss against the exact top-k teacher, to storage precision.
        cached_loss = kd(student_logits, cached.teacher_for(batch), batch["labels"])
        exact_topk = kd(student_logits, topk_teacher(online_logits, k), batch["labels"])
        torch.testing.assert_close(cached_loss, exact_topk, rtol=2e-3, atol=2e-4)
        errors.append(abs(float(cached_loss - full)))
    assert errors[0] > errors[1] > errors[2]


def test_cache_is_reused_and_keyed_by_teacher_and_utterance(short_whisper, tmp_path):
    rows, batch = _rows_and_batch()
    first = CachedTeacher(_teachers(short_whisper), TeacherCache(tmp_path, k=8), device="cpu", progress=False)
    first.prepare(rows)
    again = CachedTeacher(_teachers(short_whisper), TeacherCache(tmp_path, k=8), device="cpu", progress=False)
    report = again.prepare(rows)
    assert (report["computed"], report["reused"]) == (0, 3)
    for a, b in zip(first.teacher_for(batch), again.teacher_for(batch)):
        assert torch.equal(a, b)
    # Another teacher (fingerprint) scores every utterance anew, into the same cache directory.
    other = CachedTeacher(_teachers(short_whisper, "0" * 16), TeacherCache(tmp_path, k=8), device="cpu", progress=False)
    assert other.prepare(rows)["computed"] == 3 and len(TeacherCache(tmp_path, k=8)) == 6
    # Keys change with the audio and with the transcript.
    feats, ids = rows[0]["input_features"], rows[0]["decoder_input_ids"]
    key = utterance_key("f" * 16, feats, ids)
    assert key != utterance_key("f" * 16, np.asarray(feats) + 1, ids) != utterance_key("f" * 16, feats, ids[:-1])
    # Padded positions of a batch read back as zeros, beyond each utterance's length.
    lp, _ = again.teacher_for(batch)
    assert torch.all(lp[1, 4:] == 0) and torch.all(lp[1, :4] < 0)


def test_an_interrupted_fill_keeps_the_shards_it_committed(short_whisper, tmp_path):
    """A fill commits a shard every ``commit_every`` utterances: stopped in the middle (here: the teacher fails on
    its second batch), the next run recomputes only what was not committed, and reads the same values."""
    rows, batch = _rows_and_batch()
    teachers = _teachers(short_whisper)
    real, calls = teachers.logits, []

    def fails_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    teachers.logits = fails_on_the_second_batch
    cut = CachedTeacher(teachers, TeacherCache(tmp_path, k=8), batch_size=1, device="cpu", progress=False,
                        commit_every=1, precision="32")
    with pytest.raises(KeyboardInterrupt):
        cut.prepare(rows)
    assert len(TeacherCache(tmp_path, k=8)) == 1 and not list(TeacherCache(tmp_path, k=8).dir.glob(".*.tmp"))
    resumed = CachedTeacher(_teachers(short_whisper), TeacherCache(tmp_path, k=8), device="cpu", progress=False,
                            precision="32")
    assert (resumed.prepare(rows)["computed"], resumed.report["reused"]) == (2, 1)
    whole = CachedTeacher(_teachers(short_whisper), TeacherCache(tmp_path / "whole", k=8), device="cpu",
                          progress=False, precision="32")
    whole.prepare(rows)
    for a, b in zip(resumed.teacher_for(batch), whole.teacher_for(batch)):
        assert torch.equal(a, b)


def test_a_bf16_fill_is_kept_apart_from_a_float32_one_and_close_to_it(short_whisper, tmp_path):
    """bf16 autocast scoring (the default where the machine computes bf16 natively) gets its own cache keys, so a
    cache filled in float32 is never read as bf16 or back; its top-k log-probabilities stay close to float32's."""
    rows, batch = _rows_and_batch()
    exact = CachedTeacher(_teachers(short_whisper), TeacherCache(tmp_path, k=8), device="cpu", progress=False,
                          precision="32")
    exact.prepare(rows)
    half = CachedTeacher(_teachers(short_whisper), TeacherCache(tmp_path, k=8), device="cpu", progress=False,
                         precision="bf16")
    report = half.prepare(rows)
    assert (report["computed"], report["reused"], report["precision"]) == (3, 0, "bf16")
    assert half.identity()["precision"] == "bf16" and exact.identity()["precision"] == "32"
    assert len(TeacherCache(tmp_path, k=8)) == 6
    keep = batch["labels"] != -100
    (lp32, _), (lp16, _) = exact.teacher_for(batch), half.teacher_for(batch)
    # The best token's probability, position by position: bf16 keeps it within a few percent.
    torch.testing.assert_close(lp16[..., 0][keep].exp(), lp32[..., 0][keep].exp(), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="bf16 or 32"):
        CachedTeacher(_teachers(short_whisper), TeacherCache(tmp_path, k=8), precision="fp16")


def test_cache_refuses_a_shard_overflow_and_leaves_no_partial_shard(tmp_path):
    cache = TeacherCache(tmp_path, k=2)
    with pytest.raises(ValueError, match="shard is full"):
        with cache.writer(3) as shard:
            shard.add("a", np.zeros((2, 2)), np.zeros((2, 2), dtype=np.int32))
            shard.add("b", np.zeros((2, 2)), np.zeros((2, 2), dtype=np.int32))
    assert len(TeacherCache(tmp_path, k=2)) == 0 and not list(cache.dir.glob("*.npy*"))
