"""Formats libsndfile cannot read (m4a/AAC, WebM/Opus, MP4 video with sound) come in through PyAV; a video
without sound and garbage are refused with the file named."""

from __future__ import annotations

import numpy as np
import pytest

from inference.audio import AudioError, audio_duration, load_audio

av = pytest.importorskip("av")


def _write(path, container: str, codec: str | None, rate: int = 44100, video: bool = False) -> None:
    """One second of a 440 Hz tone at amplitude 0.5 (and/or a few black video frames), encoded by FFmpeg."""
    with av.open(str(path), "w", format=container) as out:
        if video:
            v = out.add_stream("mpeg4", rate=10)
            v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        if codec:
            a = out.add_stream(codec, rate=rate)
            a.layout = "mono"
            tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in [*a.encode(frame), *a.encode(None)]:
                out.mux(packet)
        if video:
            for _ in range(10):
                black = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                for packet in v.encode(black):
                    out.mux(packet)
            for packet in v.encode():
                out.mux(packet)


@pytest.mark.parametrize("name, container, codec, rate, video", [
    ("tone.m4a", "mp4", "aac", 44100, False),
    ("tone.aac", "adts", "aac", 44100, False),
    ("tone.webm", "webm", "libopus", 48000, False),
    ("clip.mp4", "mp4", "aac", 44100, True),
])
def test_containers_libsndfile_cannot_read_decode_to_16k_mono(tmp_path, name, container, codec, rate, video):
    path = tmp_path / name
    _write(path, container, codec, rate, video)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.95 < len(audio) / 16000 < 1.1  # encoders add a little priming
    middle = audio[2000:14000]
    assert np.argmax(np.abs(np.fft.rfft(middle))) * 16000 / len(middle) == pytest.approx(440, abs=3)
    assert np.sqrt(np.mean(middle ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    assert audio_duration(str(path)) == pytest.approx(len(audio) / 16000)
    assert np.allclose(load_audio(path.read_bytes()), audio)  # bytes take the same route


def test_video_without_sound_and_garbage_are_refused_by_name(tmp_path):
    silent_video = tmp_path / "silent.mp4"
    _write(silent_video, "mp4", None, video=True)
    with pytest.raises(AudioError, match=r"silent\.mp4 has no audio track"):
        load_audio(silent_video)
    garbage = tmp_path / "noise.m4a"
    garbage.write_bytes(b"\x00\x01not audio at all" * 50)
    with pytest.raises(AudioError, match=r"noise\.m4a.*(corrupt|re-encode)"):
        load_audio(garbage)
