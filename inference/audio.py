"""Audio reading for Whisper: any file, bytes or array in, float32 mono at 16 kHz out.

Whisper's feature extractor expects 16 kHz mono float32. This module reads audio with soundfile
(libsndfile: WAV, FLAC, OGG/Vorbis, Opus, MP3 with libsndfile >= 1.1) and, for what libsndfile cannot read
(m4a/AAC, WebM, MP4 and other video containers, WMA...), with PyAV, the FFmpeg bindings faster-whisper decodes
with (FFmpeg ships inside its wheels). Resampling is libsoxr's (``soxr``). The project needs neither
torchaudio, librosa nor torchcodec (the decoder behind ``datasets``' ``Audio`` feature, whose wheels need CUDA
libraries and fail with a CPU-only torch). Dataset audio columns are therefore always cast to
``Audio(decode=False)`` and their ``{"bytes", "path"}`` values decoded by :func:`load_audio`.
"""

from __future__ import annotations

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


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono signal with libsoxr (the SoX resampler, "HQ": band-limited, linear phase).

    Frequencies above the lower Nyquist frequency are removed (no aliasing when downsampling, no images when
    upsampling); the passband keeps its amplitude and phase.

    Args:
        audio: shape ``(samples,)``, any float or int dtype.
        orig_sr: its sample rate in Hz.
        target_sr: the wanted sample rate in Hz.

    Returns:
        float32 array of shape ``(about samples * target_sr / orig_sr,)``.
    """
    import soxr

    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"resample expects a mono signal of shape (samples,), got shape {audio.shape}")
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    audio = audio.astype(np.float32, copy=False)
    if orig_sr == target_sr or len(audio) == 0:
        return audio.copy()
    return soxr.resample(audio, int(orig_sr), int(target_sr), quality="HQ").astype(np.float32, copy=False)


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


def _read_pyav(data: bytes | str, name: str, rate: int, why: str) -> tuple[np.ndarray, int]:
    """Decode the first audio track of any container FFmpeg knows, resampled to mono ``rate`` by FFmpeg's
    resampler; ``why`` is libsndfile's complaint, quoted when FFmpeg fails too."""
    try:
        import av
    except ImportError as err:
        raise AudioError(f"cannot decode audio {name}: {why}; libsndfile does not read this format and PyAV "
                         f"(FFmpeg) is not installed: `pip install av`, or convert it to WAV/FLAC") from err
    chunks: list[np.ndarray] = []
    try:
        with av.open(data if isinstance(data, str) else io.BytesIO(data), metadata_errors="ignore") as container:
            if not container.streams.audio:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
                raise AudioError(f"{name} has no audio track (its streams: {kinds}); pass a file with sound")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(container.streams.audio[0]):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, OSError, EOFError) as err:
        raise AudioError(
            f"cannot decode audio {name}: libsndfile: {why}; FFmpeg: {str(err).rstrip('.')}. The file is corrupt, "
            f"truncated or not audio; re-encode it (e.g. `ffmpeg -i IN -ar 16000 -ac 1 OUT.flac`) or drop it"
        ) from err
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return audio[:, None], rate


def _read_soundfile(data: bytes | str, name: str, rate: int = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """Decode a file path or file bytes with libsndfile, or PyAV for formats it does not read; errors become
    :class:`AudioError` naming the file."""
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
        return _read_pyav(data, name, rate, str(err).rstrip("."))
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
            - a path (``str`` / ``Path``) to an audio or video file (wav, flac, ogg, mp3 through libsndfile;
              m4a, aac, webm, mp4, ... through PyAV);
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
        audio, sr = _read_soundfile(str(path), str(path), sampling_rate)
        return _finish(audio, sr, sampling_rate, str(path))
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise EmptyAudioError("audio bytes are empty (0 bytes)")
        audio, sr = _read_soundfile(bytes(source), "<bytes>", sampling_rate)
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
            audio, sr = _read_soundfile(bytes(data), name, sampling_rate)
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
        opened = io.BytesIO(bytes(source))
    elif isinstance(source, os.PathLike):
        opened = source = str(source)
    else:
        opened = source
    try:
        info = sf.info(opened)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return len(load_audio(source)) / SAMPLE_RATE  # a format only PyAV reads: decode it
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
