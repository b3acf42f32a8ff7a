"""Data augmentation for expert training: SpecAugment masks, speed perturbation and additive noise.

Three augmentations, as ASR recipes use them; all off by default, all deterministic given the run's seed.

- **SpecAugment** (Park et al. 2019, the LD policy scaled to Whisper: 2 frequency masks up to 27 mel bins, 2
  time masks up to 100 frames and 5% of the utterance) masks every training batch on the fly, after it reaches
  the device (:meth:`trainers.data.ExpertDataModule.on_after_batch_transfer`); validation and test batches are
  never masked. What is masked is whatever the batch carries, so the encoder cache keeps working:

  * log-mel features (no cache): time masks over 10 ms mel frames, frequency masks over mel bins;
  * cached activations (the input of the lowest adapted encoder layer, or the encoder output of a
    decoder-only expert): time masks over 20 ms encoder frames (widths halved), and channel masks, the
    frequency masks' analogue on the feature axis, each at most the same share of ``d_model`` as the frequency
    width is of the mel bins.

  Masked entries take the utterance's per-channel mean over its speech frames: a time mask leaves the
  average frame, a frequency (channel) mask a flat band. Masks are drawn per (seed, epoch, training row).

- **Speed perturbation** (Ko et al. 2015) resamples the waveform as if it had been recorded at ``factor``
  times the sample rate: ``factor`` 1.1 is 10% faster and higher, and lasts ``1 / factor`` as long.
- **Additive noise** at a signal-to-noise ratio in dB: white or pink noise from a generator seeded per
  (seed, utterance), or excerpts of recordings in a directory.

Speed and noise change the audio, so they must happen before the features (and the encoder cache) are
computed: each is an extra **copy** of the training set (:meth:`AugmentConfig.variants`), featurized and cached
once like the originals. Training with ``speed_perturb=(0.9, 1.0, 1.1)`` thus featurizes and caches 3x the
training rows (3x the disk and the one-time encoder pass), plus one more copy with ``noise_snr_db``; every
epoch then sees every copy (3x or 4x the steps).
"""

from __future__ import annotations

import functools
import hashlib
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from inference.audio import SAMPLE_RATE, resample

NOISE_KINDS = ("white", "pink")
MEL_FRAMES_PER_SECOND = 100  # Whisper's log-mel hop is 10 ms
ENCODER_FRAMES_PER_SECOND = 50  # its second convolution has stride 2
NOISE_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".webm")


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation of a training run (the fields of the same name in ``trainers.train_lora.TrainConfig``).

    Args:
        spec_augment: mask training batches (see the module docstring).
        spec_freq_masks: frequency masks per utterance (channel masks on cached activations).
        spec_freq_width: widest frequency mask, in mel bins.
        spec_time_masks: time masks per utterance.
        spec_time_width: widest time mask, in 10 ms mel frames.
        spec_time_ratio: and at most this fraction of the utterance's frames.
        speed_perturb: speed factors; a resampled copy of the training set per factor other than 1.0 (the
            originals are always kept).
        noise_snr_db: add a noisy copy of the training set at this SNR in dB (None: none).
        noise_kind: ``white`` or ``pink`` generated noise.
        noise_dir: a directory of noise recordings, used instead of generated noise.
    """

    spec_augment: bool = False
    spec_freq_masks: int = 2
    spec_freq_width: int = 27
    spec_time_masks: int = 2
    spec_time_width: int = 100
    spec_time_ratio: float = 0.05
    speed_perturb: tuple[float, ...] = ()
    noise_snr_db: float | None = None
    noise_kind: str = "pink"
    noise_dir: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "speed_perturb", tuple(float(s) for s in self.speed_perturb))
        for name in ("spec_freq_masks", "spec_freq_width", "spec_time_masks", "spec_time_width"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 < self.spec_time_ratio <= 1:
            raise ValueError(f"spec_time_ratio must be in (0, 1] (0.05: masks up to 5% of the utterance), "
                             f"got {self.spec_time_ratio}")
        bad = [s for s in self.speed_perturb if not 0.5 <= s <= 2.0]
        if bad:
            raise ValueError(f"speed_perturb factors must lie in [0.5, 2] (e.g. 0.9,1.0,1.1), got {bad}")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {', '.join(NOISE_KINDS)}, got {self.noise_kind!r}")
        if self.noise_dir is not None and self.noise_snr_db is None:
            raise ValueError("noise_dir needs noise_snr_db (the SNR to mix its noise at), e.g. --noise-snr-db 20")

    def variants(self, seed: int = 0) -> list[AudioVariant]:
        """The copies of the training set: the originals first, then one per speed factor other than 1.0, then
        the noisy copy (of the originals) when ``noise_snr_db`` is set."""
        out = [AudioVariant()]
        out += [AudioVariant(speed=s) for s in dict.fromkeys(self.speed_perturb) if s != 1.0]
        if self.noise_snr_db is not None:
            out.append(AudioVariant(noise_snr_db=float(self.noise_snr_db), noise_kind=self.noise_kind,
                                    noise_dir=self.noise_dir, seed=seed))
        return out

    def hyperparameters(self) -> dict:
        """JSON-ready fields, as an expert's manifest records them."""
        return {**asdict(self), "speed_perturb": list(self.speed_perturb)}


# ---------------------------------------------------------------------------------------------------- waveforms


def speed_perturb(audio: np.ndarray, factor: float) -> np.ndarray:
    """``audio`` (16 kHz mono) played ``factor`` times as fast: read as if sampled at ``factor * 16000`` Hz and
    resampled to 16 kHz (Kaldi's speed perturbation; tempo and pitch change together).

    Returns:
        float32, about ``len(audio) / factor`` samples.
    """
    if factor == 1.0:
        return np.asarray(audio, dtype=np.float32).copy()
    return resample(audio, round(SAMPLE_RATE * factor), SAMPLE_RATE)


def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of unit-variance Gaussian white noise."""
    return rng.standard_normal(n).astype(np.float32)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of unit-variance pink (1/f power) noise: white noise shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0.0  # no DC offset
    x = np.fft.irfft(spectrum, n)
    return (x / (x.std() or 1.0)).astype(np.float32)


def add_noise(audio: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``audio + g * noise`` with ``g`` such that ``10 log10(power(audio) / power(g * noise)) == snr_db``.

    Args:
        audio, noise: float arrays of the same shape (samples,); power is the mean square.
        snr_db: the wanted signal-to-noise ratio in dB.

    Returns:
        float32; ``audio`` unchanged when it or the noise is silent.
    """
    audio = np.asarray(audio, dtype=np.float32)
    p_signal = float(np.mean(np.square(audio, dtype=np.float64)))
    p_noise = float(np.mean(np.square(noise, dtype=np.float64)))
    if p_signal == 0 or p_noise == 0:
        return audio.copy()
    gain = math.sqrt(p_signal / (p_noise * 10 ** (snr_db / 10)))
    return (audio + gain * np.asarray(noise, dtype=np.float32)).astype(np.float32)


def measured_snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    """The SNR in dB of ``noisy`` against ``clean`` (the noise being their difference)."""
    clean = np.asarray(clean, dtype=np.float64)
    return 10 * math.log10(np.sum(clean ** 2) / np.sum((np.asarray(noisy, dtype=np.float64) - clean) ** 2))


@functools.lru_cache(maxsize=4)
def _noise_files(directory: str) -> tuple[str, ...]:
    files = sorted(str(p) for p in Path(directory).rglob("*") if p.suffix.lower() in NOISE_SUFFIXES)
    if not files:
        raise ValueError(f"noise_dir {directory}: no audio files ({', '.join(NOISE_SUFFIXES)}) found; "
                         "point --noise-dir at a folder of noise recordings, or leave it out for generated noise")
    return tuple(files)


@functools.lru_cache(maxsize=16)
def _noise_recording(path: str) -> np.ndarray:
    from inference.audio import load_audio

    return load_audio(path)


@dataclass(frozen=True)
class AudioVariant:
    """One copy of the training set: the audio at ``speed``, with noise at ``noise_snr_db`` (None: clean).

    Called on ``(audio, utterance_id)``; noise is drawn from a generator seeded by (``seed``, the id), so a copy
    is the same in every run with that seed.
    """

    speed: float = 1.0
    noise_snr_db: float | None = None
    noise_kind: str = "pink"
    noise_dir: str | None = None
    seed: int = 0

    @property
    def original(self) -> bool:
        return self.speed == 1.0 and self.noise_snr_db is None

    @property
    def tag(self) -> str:
        """Appended to each utterance id of this copy (and so to its encoder cache's name); empty for originals."""
        tag = "" if self.speed == 1.0 else f"#speed{self.speed:g}"
        if self.noise_snr_db is not None:
            source = self.noise_kind if self.noise_dir is None else \
                "dir-" + hashlib.sha256(str(Path(self.noise_dir).resolve()).encode()).hexdigest()[:8]
            tag += f"#noise{self.noise_snr_db:g}dB-{source}-seed{self.seed}"
        return tag

    def noise(self, n: int, utterance_id: str) -> np.ndarray:
        """``n`` samples of this copy's noise for one utterance."""
        rng = np.random.default_rng([abs(self.seed), zlib.crc32(utterance_id.encode())])
        if self.noise_dir is None:
            return (pink_noise if self.noise_kind == "pink" else white_noise)(n, rng)
        files = _noise_files(str(self.noise_dir))
        recording = _noise_recording(files[int(rng.integers(len(files)))])
        if len(recording) == 0:
            return white_noise(n, rng)
        start = int(rng.integers(len(recording)))
        reps = math.ceil((start + n) / len(recording))
        return np.tile(recording, reps)[start:start + n]

    def __call__(self, audio: np.ndarray, utterance_id: str) -> np.ndarray:
        audio = speed_perturb(audio, self.speed)
        if self.noise_snr_db is not None:
            audio = add_noise(audio, self.noise(len(audio), utterance_id), self.noise_snr_db)
        return audio


# ---------------------------------------------------------------------------------------------------- SpecAugment


def _mask_row(x: torch.Tensor, frames: int, time_masks: int, time_width: int, channel_masks: int,
              channel_width: int, rng: np.random.Generator) -> None:
    """Mask one utterance in place.

    Args:
        x: (time, channels) view of the utterance.
        frames: its speech frames (the rest is padding); time masks fall inside them.
        time_masks, time_width: how many time masks, and the widest.
        channel_masks, channel_width: how many channel (frequency) masks, and the widest.
        rng: draws widths uniformly in [0, widest] and positions uniformly where the mask fits.
    """
    length, channels = x.shape
    frames = max(1, min(frames, length))
    fill = x[:frames].mean(0)  # per-channel mean over the speech frames, before any mask
    for _ in range(time_masks):
        w = int(rng.integers(0, min(time_width, frames) + 1))
        t0 = int(rng.integers(0, frames - w + 1))
        x[t0:t0 + w] = fill
    for _ in range(channel_masks):
        w = int(rng.integers(0, min(channel_width, channels) + 1))
        c0 = int(rng.integers(0, channels - w + 1))
        x[:, c0:c0 + w] = fill[c0:c0 + w]


INPUT_KEYS = ("input_features", "encoder_layer_input", "encoder_hidden_states")


def spec_augment_batch(batch: dict, cfg: AugmentConfig, *, seed: int, epoch: int, n_mels: int) -> dict:
    """SpecAugment on a training batch: a copy of ``batch`` with its model input masked (module docstring).

    Args:
        batch: a :class:`trainers.data.Collator` batch: ``index`` (batch,), ``seconds`` (batch,) when known, and
            one of ``input_features`` (batch, n_mels, mel frames), ``encoder_layer_input`` or
            ``encoder_hidden_states`` (batch, encoder frames, d_model).
        cfg: the mask counts and widths.
        seed, epoch: with each row's ``index``, seed its masks.
        n_mels: the base's mel bins (scales frequency widths to channel widths on activations).
    """
    key = next((k for k in INPUT_KEYS if k in batch), None)
    if key is None:
        return batch
    x = batch[key].clone()
    seconds = batch.get("seconds")
    for i, row in enumerate(batch["index"].tolist()):
        rng = np.random.default_rng([abs(seed), epoch, row])
        if key == "input_features":
            view, rate, channel_width = x[i].transpose(0, 1), MEL_FRAMES_PER_SECOND, cfg.spec_freq_width
        else:
            view, rate = x[i], ENCODER_FRAMES_PER_SECOND
            channel_width = round(cfg.spec_freq_width * x.shape[-1] / n_mels)
        frames = view.shape[0] if seconds is None else math.ceil(float(seconds[i]) * rate)
        frames = max(1, min(frames, view.shape[0]))
        time_width = min(round(cfg.spec_time_width * rate / MEL_FRAMES_PER_SECOND),
                         int(cfg.spec_time_ratio * frames))
        _mask_row(view, frames, cfg.spec_time_masks, time_width, cfg.spec_freq_masks, channel_width, rng)
    return {**batch, key: x}
