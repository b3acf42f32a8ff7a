"""Audio I/O: the resampler keeps what is below Nyquist and removes what is above; load_audio reads every
accepted source and turns every broken one into an AudioError that names the file."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from inference.audio import (
    SAMPLE_RATE,
    AudioError,
    audio_duration,
    encode_flac,
    is_silent,
    load_audio,
    resample,
    trim_silence,
)


def _sine(freq: float, sr: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


def _level_db(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-12)


# ------------------------------------------------------------------------------------------------- resample


@pytest.mark.parametrize("orig_sr", [22050, 44100, 48000, 8000, 11025, 16001])
@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0])
def test_resample_keeps_frequency_amplitude_and_phase(orig_sr, freq):
    x = _sine(freq, orig_sr, seconds=1.0)
    y = resample(x, orig_sr, SAMPLE_RATE)
    assert y.dtype == np.float32
    assert len(y) == int(np.ceil(len(x) * SAMPLE_RATE / orig_sr))
    # Away from the edges the output is the same sine sampled at 16 kHz (no delay: the filter is symmetric).
    expected = _sine(freq, SAMPLE_RATE, seconds=len(y) / SAMPLE_RATE)[: len(y)]
    mid = slice(len(y) // 4, 3 * len(y) // 4)
    np.testing.assert_allclose(y[mid], expected[mid], atol=1e-3)
    assert abs(_peak_hz(y, SAMPLE_RATE) - freq) <= 2.0


def test_resample_removes_content_above_the_new_nyquist():
    # 9.5 kHz is fine at 22.05 kHz but above 8 kHz: it must vanish, not alias down to 6.5 kHz.
    y = resample(_sine(9500.0, 22050, amplitude=1.0), 22050, SAMPLE_RATE)
    assert _level_db(y[len(y) // 4 : -len(y) // 4]) < -60


def test_resample_identity_and_dtypes():
    x = (np.arange(100) % 7).astype(np.int16)
    y = resample(x, 16000, 16000)
    assert y.dtype == np.float32 and np.array_equal(y, x.astype(np.float32))
    assert len(resample(np.zeros(0, np.float32), 22050)) == 0
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 100)), 22050)


def test_resample_keeps_a_constant_level():
    y = resample(np.full(22050, 0.25, np.float32), 22050, SAMPLE_RATE)
    np.testing.assert_allclose(y[1000:-1000], 0.25, atol=1e-4)


# ---------------------------------------------------------------------------------------------- load_audio


@pytest.fixture(scope="module")
def tone() -> np.ndarray:
    return _sine(440.0, SAMPLE_RATE, seconds=0.5)


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3")])
def test_load_audio_reads_files(tmp_path, tone, fmt, ext):
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile without {fmt}")
    path = tmp_path / f"a.{ext}"
    sf.write(path, tone, SAMPLE_RATE, format=fmt)
    for source in (path, str(path)):
        audio = load_audio(source)
        assert audio.dtype == np.float32 and audio.ndim == 1
        # Lossy codecs pad a little; the tone must survive.
        assert abs(len(audio) - len(tone)) < 0.1 * SAMPLE_RATE
        assert abs(_peak_hz(audio, SAMPLE_RATE) - 440) < 5


def test_load_audio_stereo_44k_becomes_mono_16k(tmp_path):
    left, right = _sine(440.0, 44100), _sine(440.0, 44100, amplitude=0.1)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 44100)
    audio = load_audio(path)
    assert len(audio) == 16000
    expected = resample((left + right) / 2, 44100)
    np.testing.assert_allclose(audio, expected, atol=1e-4)


def test_load_audio_accepts_datasets_values_bytes_and_arrays(tmp_path, tone):
    path = tmp_path / "a.flac"
    sf.write(path, tone, SAMPLE_RATE, format="FLAC")
    data = path.read_bytes()
    reference = load_audio(path)
    np.testing.assert_allclose(load_audio({"bytes": data, "path": "de/x.flac"}), reference)
    np.testing.assert_allclose(load_audio({"bytes": data, "path": None}), reference)
    np.testing.assert_allclose(load_audio({"bytes": None, "path": str(path)}), reference)
    np.testing.assert_allclose(load_audio(data), reference)
    np.testing.assert_allclose(load_audio({"array": tone, "sampling_rate": SAMPLE_RATE}), tone)
    np.testing.assert_allclose(load_audio(tone), tone)
    assert len(load_audio({"array": _sine(440.0, 8000), "sampling_rate": 8000})) == 16000
    # (channels, samples) arrays, as torch code produces them, are averaged over the short axis.
    np.testing.assert_allclose(load_audio(np.stack([tone, tone])), tone, atol=1e-6)


@pytest.mark.parametrize("case", ["missing", "empty_file", "corrupt", "truncated_wav", "truncated_flac"])
def test_load_audio_broken_files_raise_audio_error_naming_the_file(tmp_path, tone, case):
    path = tmp_path / f"{case}.{'flac' if case.endswith('flac') else 'wav'}"
    buffer = io.BytesIO()
    sf.write(buffer, tone, SAMPLE_RATE, format="FLAC" if case.endswith("flac") else "WAV")
    whole = buffer.getvalue()
    if case == "empty_file":
        path.write_bytes(b"")
    elif case == "corrupt":
        path.write_bytes(b"this is not audio" * 50)
    elif case.startswith("truncated"):
        path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(AudioError) as err:
        load_audio(path)
    message = str(err.value)
    assert str(path) in message
    expect = {"missing": "does not exist", "empty_file": "empty", "corrupt": "cannot decode",
              "truncated_wav": "truncated", "truncated_flac": "truncated"}[case]
    assert expect in message
    assert isinstance(err.value, ValueError)
    if case.startswith("truncated"):  # embedded bytes name the dataset path
        with pytest.raises(AudioError, match="de/x"):
            load_audio({"bytes": whole[: len(whole) // 2], "path": "de/x.wav"})


def test_load_audio_empty_and_invalid_inputs():
    with pytest.raises(AudioError, match="empty"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(np.array([0.0, np.nan], np.float32))
    with pytest.raises(AudioError, match="neither bytes nor a path"):
        load_audio({"bytes": None, "path": None})
    with pytest.raises(AudioError, match="sampling_rate"):
        load_audio({"array": [0.1, 0.2]})
    with pytest.raises(AudioError, match="cannot read audio from a int"):
        load_audio(3)


# ------------------------------------------------------------------------------------------------- helpers


def test_is_silent_and_trim(tone):
    assert is_silent(np.zeros(1000, np.float32))
    assert is_silent(np.zeros(0, np.float32))
    assert is_silent(np.full(1000, 1e-4, np.float32))  # -80 dBFS
    assert not is_silent(tone)
    assert is_silent(tone * 1e-3, threshold_db=-50) and not is_silent(tone * 1e-3, threshold_db=-70)
    padded = np.concatenate([np.zeros(16000, np.float32), tone, np.zeros(16000, np.float32)])
    trimmed = trim_silence(padded, pad_seconds=0.1)
    assert len(tone) <= len(trimmed) <= len(tone) + 2 * 1600 + 2


def test_encode_flac_round_trip_and_duration(tone):
    data = encode_flac(tone)
    info = sf.info(io.BytesIO(data))
    assert (info.format, info.samplerate, info.channels) == ("FLAC", SAMPLE_RATE, 1)
    np.testing.assert_allclose(load_audio(data), tone, atol=1 / 32767 + 1e-6)
    assert audio_duration(data) == pytest.approx(0.5)
    assert audio_duration({"bytes": data, "path": "x.flac"}) == pytest.approx(0.5)
