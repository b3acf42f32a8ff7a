"""Writing transcripts: plain text, JSON records, SubRip (SRT) and WebVTT subtitles.

=========  ===========================================================================================
``text``   per input, a header line (file, language and its probability, expert) and the transcript
``json``   a list with one record per input, in input order: ``file``, ``text``, ``language``,
           ``language_probability``, ``expert`` (null: the base model), ``duration``, ``segments``
           (``start``, ``end`` in seconds, ``text``, ``language``, ``language_probability``, ``expert``)
           and ``note`` when nothing was decoded (empty or silent audio), ``error`` when the input could not
           be read
``srt``    numbered cues ``HH:MM:SS,mmm --> HH:MM:SS,mmm`` for one input's segments
``vtt``    ``WEBVTT`` then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` for one input's segments
=========  ===========================================================================================
"""

from __future__ import annotations

import json
from typing import Sequence

from inference.transcribe import Transcript

FORMATS = ("text", "json", "srt", "vtt")
SUBTITLE_FORMATS = ("srt", "vtt")


def clock(seconds: float, decimal: str = ",") -> str:
    """``3725.5`` -> ``01:02:05,500`` (SRT); ``decimal="."`` gives WebVTT's form."""
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def _cues(transcript: Transcript) -> list[tuple[float, float, str]]:
    return [(s.start, s.end, s.text) for s in transcript.segments if s.text]


def to_srt(transcript: Transcript) -> str:
    """One input's segments as SubRip cues (blank-line separated, numbered from 1)."""
    blocks = [f"{n}\n{clock(a)} --> {clock(b)}\n{text}\n" for n, (a, b, text) in enumerate(_cues(transcript), 1)]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    """One input's segments as a WebVTT file."""
    blocks = [f"{clock(a, '.')} --> {clock(b, '.')}\n{text}\n" for a, b, text in _cues(transcript)]
    return "\n".join(["WEBVTT\n", *blocks])


def describe(t: Transcript) -> str:
    """``file  [uk 0.93 -> expert uk-espeak]`` (or the error or note saying why nothing was decoded)."""
    if t.error:
        return f"{t.file}  [error: {t.error}]"
    if t.note:
        return f"{t.file}  [{t.note}]"
    probability = "" if t.language_probability is None else f" {t.language_probability:.2f}"
    return f"{t.file}  [{t.language}{probability} -> {'expert ' + t.expert if t.expert else 'base model'}]"


def to_text(transcripts: Sequence[Transcript]) -> str:
    """Each input's header line and transcript, blank-line separated."""
    return "\n".join(f"{describe(t)}\n{t.text}\n" for t in transcripts)


def to_json(transcripts: Sequence[Transcript]) -> str:
    return json.dumps([t.as_dict() for t in transcripts], indent=2, ensure_ascii=False) + "\n"


def render(transcripts: Sequence[Transcript], fmt: str) -> str:
    """All inputs in ``text`` or ``json``; one input in ``srt`` or ``vtt``."""
    if fmt == "text":
        return to_text(transcripts)
    if fmt == "json":
        return to_json(transcripts)
    if fmt in SUBTITLE_FORMATS:
        if len(transcripts) != 1:
            raise ValueError(f"a {fmt} file holds one input's subtitles; render each transcript separately")
        return (to_srt if fmt == "srt" else to_vtt)(transcripts[0])
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
