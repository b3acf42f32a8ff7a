"""Augmentation for expert training: SpecAugment (on log-mels and on cached activations), speed copies, noise."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from inference.audio import SAMPLE_RATE
from trainers.augment import (AudioVariant, AugmentConfig, add_noise, measured_snr_db, pink_noise, spec_augment_batch,
                              speed_perturb, white_noise)


def _data(corpus, processor, tmp_path=None, encoder=None, layer=None, **augment):
    from trainers.data import ExpertDataModule

    dm = ExpertDataModule(str(corpus), processor, ["uk"], 4, encoder=encoder, encoder_layer=layer,
                          cache_dir=None if tmp_path is None else str(tmp_path), progress=False,
                          augment=AugmentConfig(**augment) if augment else None, seed=3)
    dm.setup()
    return dm


def _fit_batch(dm, training: bool, epoch: int = 0, loader=None):
    """A batch as the Trainer hands it to the module: through the data module's after-transfer hook."""
    batch = next(iter(loader or dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=training, current_epoch=epoch)
    try:
        return batch, dm.on_after_batch_transfer(batch, 0)
    finally:
        dm.trainer = None


# ------------------------------------------------------------------------------------------------ SpecAugment


def test_spec_augment_masks_training_batches_only_and_is_reproducible(uk_corpus, tiny_whisper):
    dm = _data(uk_corpus, tiny_whisper[1], spec_augment=True)
    raw, masked = _fit_batch(dm, training=True)
    assert "input_features" in raw and not torch.equal(raw["input_features"], masked["input_features"])
    assert torch.equal(raw["labels"], masked["labels"])  # only the model input changes
    _, again = _fit_batch(dm, training=True)
    assert torch.equal(masked["input_features"], again["input_features"])  # same seed, epoch and rows
    _, next_epoch = _fit_batch(dm, training=True, epoch=1)
    assert not torch.equal(masked["input_features"], next_epoch["input_features"])
    # Validation batches (and training batches outside the training loop) pass unchanged.
    raw, out = _fit_batch(dm, training=False)
    assert torch.equal(raw["input_features"], out["input_features"])
    val, out = _fit_batch(dm, training=False, loader=dm.val_dataloader())
    assert torch.equal(val["input_features"], out["input_features"])
    # Off by default: no augmentation at all.
    plain = _data(uk_corpus, tiny_whisper[1])
    raw, out = _fit_batch(plain, training=True)
    assert torch.equal(raw["input_features"], out["input_features"])


def test_time_masks_stay_inside_the_speech_and_the_width_bounds(uk_corpus, tiny_whisper):
    dm = _data(uk_corpus, tiny_whisper[1], spec_augment=True, spec_freq_masks=0, spec_time_masks=1)
    seen = 0
    for epoch in range(4):
        raw, masked = _fit_batch(dm, training=True, epoch=epoch)
        for i in range(len(raw["index"])):
            changed = (raw["input_features"][i] != masked["input_features"][i]).any(0).nonzero().flatten()
            if not len(changed):
                continue
            seen += 1
            speech = math.ceil(float(raw["seconds"][i]) * 100)
            width = int(changed.max() - changed.min()) + 1
            assert changed.max() < speech and width <= min(100, 0.05 * speech)
            # the masked frames hold the utterance's average frame
            mean = raw["input_features"][i][:, :speech].mean(1)
            torch.testing.assert_close(masked["input_features"][i][:, int(changed[0])], mean)
    assert seen > 0


def test_masks_on_cached_encoder_outputs(uk_corpus, tiny_whisper, tmp_path):
    """A decoder-only expert trains on cached encoder outputs: time and channel masks act on them, and the cache
    itself is never changed."""
    model, processor = tiny_whisper
    dm = _data(uk_corpus, processor, tmp_path, encoder=model.model.encoder, spec_augment=True, spec_time_masks=0)
    raw, masked = _fit_batch(dm, training=True)
    assert "encoder_hidden_states" in raw and "input_features" not in raw
    x, y = raw["encoder_hidden_states"], masked["encoder_hidden_states"]
    assert x.shape == y.shape and not torch.equal(x, y)
    d_model, widest = x.shape[-1], round(27 * x.shape[-1] / 80)
    for i in range(len(x)):
        channels = (x[i] != y[i]).any(0).nonzero().flatten()
        assert len(channels) <= 2 * widest
        # a masked channel is flat over time: its mean over the speech frames
        speech = math.ceil(float(raw["seconds"][i]) * 50)
        for c in channels.tolist():
            torch.testing.assert_close(y[i][:, c], x[i][:speech, c].mean().expand(x.shape[1]))
    again = next(iter(dm.train_dataloader()))
    assert torch.equal(again["encoder_hidden_states"], x)  # the cache holds the clean activations
    assert d_model == model.config.d_model


def test_time_masks_on_cached_layer_inputs_use_encoder_frames():
    """The input of the lowest adapted encoder layer: 20 ms frames, so a 100-frame mel width is 50 frames here."""
    x = torch.randn(3, 1500, 64)
    batch = {"encoder_layer_input": x, "index": torch.tensor([0, 1, 2]),
             "seconds": torch.tensor([30.0, 12.0, 2.0])}
    cfg = AugmentConfig(spec_augment=True, spec_freq_masks=0, spec_time_masks=1, spec_time_ratio=1.0)
    widths = []
    for epoch in range(8):
        y = spec_augment_batch(batch, cfg, seed=0, epoch=epoch, n_mels=80)["encoder_layer_input"]
        for i, seconds in enumerate([30.0, 12.0, 2.0]):
            frames = (x[i] != y[i]).any(1).nonzero().flatten()
            if len(frames):
                assert frames.max() < seconds * 50
                widths.append(int(frames.max() - frames.min()) + 1)
    assert 25 < max(widths) <= 50  # up to 50 encoder frames (100 mel frames), not 100
    assert torch.equal(batch["encoder_layer_input"], x)  # the input batch is not modified in place


# ------------------------------------------------------------------------------------------------ speed


def _tone(hz: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(audio))


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturbation_changes_duration_and_pitch_by_the_factor(factor):
    tone = _tone(440.0)
    fast = speed_perturb(tone, factor)
    assert abs(len(fast) - len(tone) / factor) <= 2
    assert abs(_peak_hz(fast) - 440.0 * factor) < 3


def test_speed_copies_are_cached_and_multiply_the_cache(uk_corpus, tiny_whisper, tmp_path):
    model, processor = tiny_whisper
    plain = _data(uk_corpus, processor, tmp_path / "plain", encoder=model.model.encoder)
    sped = _data(uk_corpus, processor, tmp_path / "sped", encoder=model.model.encoder, speed_perturb=(0.9, 1.0, 1.1))
    n = len(plain.datasets["train"])
    rows = sped.datasets["train"].rows
    assert (len(sped.datasets["train"]) == 3 * n
            and len(sped.datasets["validation"]) == len(plain.datasets["validation"]))
    ids, seconds = rows["id"], rows["seconds"]
    assert ids[n:2 * n] == [i + "#speed0.9" for i in ids[:n]] and ids[2 * n:] == [i + "#speed1.1" for i in ids[:n]]
    for k, factor in ((1, 0.9), (2, 1.1)):
        for a, b in zip(seconds[:n], seconds[k * n:(k + 1) * n]):
            assert b == pytest.approx(a / factor, abs=2e-3)

    def cache_bytes(d):
        return sum(p.stat().st_size for p in d.glob("*.npy"))

    # originals + 2 copies for training, + validation: (3n + v) / (n + v) of the plain cache
    v = len(plain.datasets["validation"])
    assert cache_bytes(tmp_path / "sped") == pytest.approx(cache_bytes(tmp_path / "plain") * (3 * n + v) / (n + v),
                                                           rel=1e-3)
    # the originals' cache is the plain run's own file (shared, not recomputed)
    assert {p.name for p in (tmp_path / "plain").glob("*.npy")} <= {p.name for p in (tmp_path / "sped").glob("*.npy")}
    assert sped.corpora_summary[0]["copies"] == 3 and sped.corpora_summary[0]["rows"] == 3 * n
    assert sped.summary["train"]["utterances"] == n  # distinct utterances, not copies
    # a copy's cached activations differ from its original's
    ds = sped.datasets["train"]
    assert not torch.equal(ds[0]["encoder_hidden_states"], ds[n]["encoder_hidden_states"])


# ------------------------------------------------------------------------------------------------ noise


@pytest.mark.parametrize("kind", ["white", "pink"])
@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
def test_noise_is_added_at_the_asked_snr(kind, snr):
    speech = _tone(220.0, 2.0) * np.linspace(0.2, 1.0, 2 * SAMPLE_RATE, dtype=np.float32)
    variant = AudioVariant(noise_snr_db=snr, noise_kind=kind, seed=1)
    noisy = variant(speech, "uk-00001")
    assert len(noisy) == len(speech)
    assert abs(measured_snr_db(speech, noisy) - snr) < 0.5
    assert np.array_equal(noisy, variant(speech, "uk-00001"))  # seeded per (seed, utterance)
    assert not np.array_equal(noisy, variant(speech, "uk-00002"))
    assert not np.array_equal(noisy, AudioVariant(noise_snr_db=snr, noise_kind=kind, seed=2)(speech, "uk-00001"))


def test_pink_noise_has_more_power_at_low_frequencies():
    rng = np.random.default_rng(0)
    for make, low_over_high in ((pink_noise, (10, None)), (white_noise, (0.5, 2))):
        power = np.abs(np.fft.rfft(make(1 << 15, rng))) ** 2
        f = np.fft.rfftfreq(1 << 15, 1 / SAMPLE_RATE)
        ratio = power[(f > 50) & (f < 500)].mean() / power[(f > 4000) & (f < 8000)].mean()
        lo, hi = low_over_high
        assert ratio > lo and (hi is None or ratio < hi)


def test_noise_from_a_directory_of_recordings(tmp_path):
    import soundfile as sf

    noise_dir = tmp_path / "noise"
    noise_dir.mkdir()
    rng = np.random.default_rng(5)
    sf.write(noise_dir / "hum.wav", 0.1 * rng.standard_normal(SAMPLE_RATE // 2), SAMPLE_RATE)
    speech = _tone(300.0, 2.0)  # longer than the recording: it loops
    noisy = AudioVariant(noise_snr_db=15.0, noise_dir=str(noise_dir))(speech, "a")
    assert abs(measured_snr_db(speech, noisy) - 15.0) < 0.5
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        AudioVariant(noise_snr_db=15.0, noise_dir=str(tmp_path / "empty"))(speech, "a")
    with pytest.raises(ValueError, match="noise_dir needs noise_snr_db"):
        AugmentConfig(noise_dir=str(noise_dir))


def test_silent_audio_stays_silent():
    silence = np.zeros(1000, dtype=np.float32)
    assert np.array_equal(add_noise(silence, white_noise(1000, np.random.default_rng(0)), 10.0), silence)


def test_noisy_copy_is_featurized_and_tagged(uk_corpus, tiny_whisper, tmp_path):
    model, processor = tiny_whisper
    dm = _data(uk_corpus, processor, tmp_path, encoder=model.model.encoder, noise_snr_db=10.0, noise_kind="white")
    rows = dm.datasets["train"].rows
    n = len(rows) // 2
    assert rows["id"][n:] == [i + "#noise10dB-white-seed3" for i in rows["id"][:n]]
    assert rows["seconds"][n:] == rows["seconds"][:n]  # noise keeps the duration
    assert len(list(tmp_path.glob("*.npy"))) == 3  # train originals, noisy train copy, validation


def test_augment_options_are_checked():
    with pytest.raises(ValueError, match="noise_kind"):
        AugmentConfig(noise_kind="brown")
    with pytest.raises(ValueError, match="speed_perturb"):
        AugmentConfig(speed_perturb=(0.0, 1.0))
    with pytest.raises(ValueError, match="spec_time_ratio"):
        AugmentConfig(spec_time_ratio=0.0)
    assert [v.speed for v in AugmentConfig(speed_perturb=(1.1, 0.9, 1.0, 0.9)).variants()] == [1.0, 1.1, 0.9]
