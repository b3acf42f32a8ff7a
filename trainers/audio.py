"""Audio reading for Whisper: any file, bytes or array in, float32 mono at 16 kHz out.

Whisper's feature extractor expects 16 kHz mono float32. This module reads audio with soundfile
(libsndfile: WAV, FLAC, OGG/Vorbis, Opus, MP3 with libsndfile >= 1.1) and resamples it with a band-limited
windowed-sinc polyphase filter written here in numpy, so the project needs neither torchaudio, librosa, scipy
nor torchcodec (the decoder behind ``datasets``' ``Audio`` feature, whose wheels need CUDA libraries and fail
with a CPU-only torch). Dataset audio columns are therefore always cast to ``Audio(decode=False)`` and their
``{"bytes", "path"}`` values decoded by :func:`load_audio`.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """Audio that cannot be used: a missing, corrupt, truncated, empty or unsupported file or array."""


class EmptyAudioError(AudioError):
    """Audio with no samples at all (a 0-byte file, a header with no frames, an empty array)."""


# ----------------------------------------------------------------------------------------------------------
# Resampling


# Zero crossings of the sinc on each side of the centre. With the Kaiser window below, 16 gives a stopband
# under about -80 dB; the filter reads 2 * 16 / (2 * cutoff) input samples per output sample.
_ZERO_CROSSINGS = 16
# Cut-off as a fraction of the lower Nyquist frequency: a little below 1 leaves room for the transition band.
_ROLLOFF = 0.945
_KAISER_BETA = 8.6
# Above this many coefficients (phases x taps) the polyphase table is not worth building.
_MAX_TABLE = 1 << 22


def _filter_shape(up: int, down: int) -> tuple[float, int]:
    """Cut-off (cycles per input sample) and half-width (input samples) of the low-pass filter."""
    cutoff = _ROLLOFF * min(1.0, up / down) * 0.5
    return cutoff, int(math.ceil(_ZERO_CROSSINGS / (2 * cutoff)))


def _weights(offset: np.ndarray, cutoff: float, half: int) -> np.ndarray:
    """Kaiser-windowed sinc low-pass evaluated at ``offset`` (output instant minus input sample, in input
    samples); each row normalised to sum 1 so a constant signal keeps its exact level."""
    x = np.clip(offset / half, -1.0, 1.0)
    w = 2 * cutoff * np.sinc(2 * cutoff * offset) * np.i0(_KAISER_BETA * np.sqrt(1.0 - x * x))
    w[np.abs(offset) > half] = 0.0
    return w / w.sum(axis=-1, keepdims=True)


@functools.lru_cache(maxsize=16)
def _polyphase_table(up: int, down: int) -> tuple[np.ndarray, int]:
    """Filter bank for resampling by ``up / down`` (coprime integers).

    Output sample ``n = q * up + p`` sits at input time ``n * down / up``; it is the dot product of the
    input window starting at ``q * down - half`` (length ``taps``) with ``table[p]``.

    Returns:
        (``table`` float32 of shape ``(up, taps)``, ``half``: how far the filter reaches before the output
        instant, i.e. the left padding).
    """
    cutoff, half = _filter_shape(up, down)
    taps = 2 * half + down + 1
    p = np.arange(up, dtype=np.int64)[:, None]
    j = np.arange(taps, dtype=np.int64)[None, :]
    # Exact in integers first: the output instant of phase p is (p * down) / up input samples into its block.
    offset = ((p * down) // up - (j - half)) + ((p * down) % up) / up
    return _weights(offset, cutoff, half).astype(np.float32), half


def _resample_direct(audio: np.ndarray, up: int, down: int) -> np.ndarray:
    """The same filter with weights computed per output sample, for awkward ratios (16001 -> 16000 Hz)
    where a table of ``up`` phases would be huge."""
    cutoff, half = _filter_shape(up, down)
    n_out = int(math.ceil(len(audio) * up / down))
    padded = np.pad(audio.astype(np.float64), (half, half + 1))
    out = np.empty(n_out, dtype=np.float32)
    j = np.arange(-half + 1, half + 1, dtype=np.int64)
    for start in range(0, n_out, 8192):
        n = np.arange(start, min(start + 8192, n_out), dtype=np.int64)
        base = (n * down) // up
        offset = ((n * down) % up / up)[:, None] - j[None, :]
        out[start : start + len(n)] = np.einsum(
            "ij,ij->i", padded[base[:, None] + j[None, :] + half], _weights(offset, cutoff, half)
        )
    return out


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono signal with a band-limited (Kaiser-windowed sinc) polyphase filter.

    Frequencies above the lower Nyquist frequency are removed (no aliasing when downsampling, no images when
    upsampling); the passband keeps its amplitude and phase (the filter is symmetric: no delay).

    Args:
        audio: shape ``(samples,)``, any float or int dtype.
        orig_sr: its sample rate in Hz.
        target_sr: the wanted sample rate in Hz.

    Returns:
        float32 array of shape ``(ceil(samples * target_sr / orig_sr),)``.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"resample expects a mono signal of shape (samples,), got shape {audio.shape}")
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    audio = audio.astype(np.float32, copy=False)
    if orig_sr == target_sr or len(audio) == 0:
        return audio.copy()
    g = math.gcd(int(orig_sr), int(target_sr))
    up, down = int(target_sr) // g, int(orig_sr) // g
    _, half = _filter_shape(up, down)
    if up * (2 * half + down + 1) > _MAX_TABLE:
        return _resample_direct(audio, up, down)
    table, half = _polyphase_table(up, down)
    taps = table.shape[1]
    n_out = int(math.ceil(len(audio) * up / down))
    n_blocks = int(math.ceil(n_out / up))
    padded = np.zeros(max((n_blocks - 1) * down + taps, half + len(audio)), dtype=np.float32)
    padded[half : half + len(audio)] = audio
    # Block q of `up` output samples reads the input window padded[q * down : q * down + taps].
    frames = np.lib.stride_tricks.sliding_window_view(padded, taps)[::down][:n_blocks]
    out = np.empty((n_blocks, up), dtype=np.float32)
    for start in range(0, n_blocks, 4096):  # bounded memory for long files
        out[start : start + 4096] = frames[start : start + 4096] @ table.T
    return out.reshape(-1)[:n_out]


# ----------------------------------------------------------------------------------------------------------
# Reading


def _to_mono(audio: np.ndarray, name: str) -> np.ndarray:
    """Average channels. 2-D input is (samples, channels) as soundfile gives it, or (channels, samples)
    when the first axis is the short one (torch/torchaudio convention)."""
    if audio.ndim == 1:
        return audio
    if audio.ndim != 2:
        raise AudioError(f"{name}: expected mono (samples,) or multichannel 2-D audio, got shape {audio.shape}")
    channel_axis = 0 if audio.shape[0] < audio.shape[1] else 1
    return audio.mean(axis=channel_axis)


def _finish(audio: np.ndarray, sr: int, target_sr: int, name: str) -> np.ndarray:
    """Mono, finite, non-empty, resampled float32."""
    audio = np.asarray(audio)
    if audio.size == 0:  # checked before the channel mix: a (0, channels) read would average to NaN
        raise EmptyAudioError(f"{name}: the audio is empty (0 samples); remove it from the data set or re-record it")
    audio = _to_mono(audio, name)
    if np.issubdtype(audio.dtype, np.integer):
        audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max)
    audio = audio.astype(np.float32, copy=False)
    if not np.all(np.isfinite(audio)):
        raise AudioError(f"{name}: the audio contains NaN or infinite samples; re-encode or drop this file")
    return resample(audio, int(sr), target_sr) if int(sr) != target_sr else audio


def _wav_missing_bytes(head: bytes, total_size: int) -> int:
    """Bytes a RIFF/WAVE header promises in its ``data`` chunk beyond the end of the file (0 if complete).

    libsndfile quietly reads what is there when a WAV file was cut short, so truncation is checked here.
    Streamed WAVs whose data size is unknown (0 or 0xFFFFFFFF) are taken as complete.
    """
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return 0
    order = "little" if head[:4] == b"RIFF" else "big"
    pos = 12
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], order)
        if chunk == b"data":
            if size in (0, 0xFFFFFFFF):
                return 0
            return max(0, size - (total_size - (pos + 8)))
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return 0


def _read_soundfile(data: bytes | str, name: str) -> tuple[np.ndarray, int]:
    """Decode a file path or file bytes with libsndfile; errors become :class:`AudioError` naming the file."""
    if isinstance(data, str):
        with open(data, "rb") as f:
            head = f.read(1 << 16)
        total = os.path.getsize(data)
    else:
        head, total = data[: 1 << 16], len(data)
    missing = _wav_missing_bytes(head, total)
    if missing:
        raise AudioError(
            f"audio {name} is truncated: its WAV header announces {missing} more bytes of samples than the "
            f"file holds; re-download or re-encode it"
        )
    try:
        with sf.SoundFile(data if isinstance(data, str) else io.BytesIO(data)) as f:
            expected, container = f.frames, f.format
            audio = f.read(dtype="float32", always_2d=True)
            sr = f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(
            f"cannot decode audio {name}: {str(err).rstrip('.')}. The file is corrupt, truncated or in a format "
            f"libsndfile {sf.__libsndfile_version__} does not read; convert it to WAV or FLAC "
            f"(e.g. `ffmpeg -i IN -ar 16000 -ac 1 OUT.flac`) or drop it"
        ) from err
    # A header that promises more frames than the data holds means the file was cut short. MP3 frame counts
    # are estimates (from the bitrate, for VBR files without a Xing header), so allow them some slack.
    if len(audio) < expected * (0.95 if container == "MP3" else 1.0):
        raise AudioError(
            f"audio {name} is truncated: its header announces {expected} frames but only {len(audio)} could be "
            f"read; re-download or re-encode it"
        )
    return audio, sr


def load_audio(source: Any, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read audio from a file, bytes, a ``datasets`` audio value or an array; return float32 mono.

    Args:
        source: one of
            - a path (``str`` / ``Path``) to a file libsndfile reads (wav, flac, ogg, mp3, ...);
            - ``{"bytes": b"..." or None, "path": str or None}`` as a ``datasets.Audio(decode=False)`` column
              stores it (bytes win when present; the path's extension is only a hint);
            - ``{"array": array_like, "sampling_rate": int}`` (a decoded ``datasets`` value);
            - raw file ``bytes``;
            - a numpy array, taken to be at 16 kHz already.
        sampling_rate: the rate of the returned signal.

    Returns:
        float32 array of shape ``(samples,)`` at ``sampling_rate``.

    Raises:
        AudioError: missing, corrupt, truncated, empty or unreadable audio, with the file named.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"audio file {path} does not exist; check the path (relative paths are taken from "
                             f"{Path.cwd()})")
        if path.is_dir():
            raise AudioError(f"{path} is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise EmptyAudioError(f"audio file {path} is empty (0 bytes); re-download or re-record it")
        if path.suffix.lower() == ".mp3" and "MP3" not in sf.available_formats():
            raise AudioError(
                f"cannot read {path}: this libsndfile ({sf.__libsndfile_version__}) has no MP3 support; "
                f"convert it with `ffmpeg -i {path} {path.with_suffix('.flac')}` or install libsndfile >= 1.1"
            )
        audio, sr = _read_soundfile(str(path), str(path))
        return _finish(audio, sr, sampling_rate, str(path))
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise EmptyAudioError("audio bytes are empty (0 bytes)")
        audio, sr = _read_soundfile(bytes(source), "<bytes>")
        return _finish(audio, sr, sampling_rate, "<bytes>")
    if isinstance(source, Mapping):
        if "array" in source:
            if "sampling_rate" not in source:
                raise AudioError("audio dict has an 'array' but no 'sampling_rate'; add the rate in Hz")
            return _finish(np.asarray(source["array"]), int(source["sampling_rate"]), sampling_rate,
                           str(source.get("path") or "<array>"))
        data, path = source.get("bytes"), source.get("path")
        if data:
            name = f"{path} (embedded bytes)" if path else "<bytes>"
            audio, sr = _read_soundfile(bytes(data), name)
            return _finish(audio, sr, sampling_rate, name)
        if path:
            return load_audio(path, sampling_rate)
        raise AudioError(f"audio value has neither bytes nor a path: {dict(source)!r}")
    if isinstance(source, np.ndarray) or hasattr(source, "__array__"):
        return _finish(np.asarray(source), SAMPLE_RATE, sampling_rate, "<array>")
    raise AudioError(
        f"cannot read audio from a {type(source).__name__}: pass a path, bytes, a datasets audio dict "
        f"({{'bytes', 'path'}} or {{'array', 'sampling_rate'}}) or a numpy array"
    )


def audio_duration(source: Any) -> float:
    """Duration in seconds of a file / ``{"bytes", "path"}`` value / bytes, read from the header only."""
    if isinstance(source, Mapping):
        if "array" in source:
            return len(source["array"]) / float(source["sampling_rate"])
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, os.PathLike):
        source = str(source)
    try:
        info = sf.info(source)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"cannot read the header of audio {source!r}: {err}") from err
    return info.frames / float(info.samplerate)


# ----------------------------------------------------------------------------------------------------------
# Writing and simple signal checks


def encode_flac(audio: np.ndarray, sampling_rate: int = SAMPLE_RATE) -> bytes:
    """Encode float mono audio in [-1, 1] as 16-bit FLAC bytes (lossless for 16-bit sources, ~2x smaller
    than WAV)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), sampling_rate,
             format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def rms_db(audio: np.ndarray) -> float:
    """Root-mean-square level in dB relative to full scale (-inf for digital silence or no samples)."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.size == 0:
        return float("-inf")
    rms = float(np.sqrt(np.mean(audio * audio)))
    return 20.0 * math.log10(rms) if rms > 0 else float("-inf")


def is_silent(audio: np.ndarray, threshold_db: float = -60.0) -> bool:
    """Whether the signal's RMS level is below ``threshold_db`` dBFS (empty audio counts as silent)."""
    return rms_db(audio) < threshold_db


def trim_silence(
    audio: np.ndarray, sampling_rate: int = SAMPLE_RATE, threshold_db: float = -50.0, pad_seconds: float = 0.1
) -> np.ndarray:
    """Drop leading and trailing samples quieter than ``threshold_db`` below the peak, keeping
    ``pad_seconds`` of margin on each side (a recogniser should hear the start and end of speech)."""
    audio = np.asarray(audio, dtype=np.float32)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        return audio
    loud = np.flatnonzero(np.abs(audio) >= peak * 10 ** (threshold_db / 20))
    pad = int(pad_seconds * sampling_rate)
    return audio[max(0, loud[0] - pad) : min(len(audio), loud[-1] + 1 + pad)]
