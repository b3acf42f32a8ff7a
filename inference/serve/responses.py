"""Response bodies as OpenAI's audio API shapes them: transcripts in five formats, errors as ``{"error": ...}``.

=================  ==========================================================================================
``json``           ``{"text", "language", "expert", "duration", "usage"}`` (OpenAI's ``text`` and ``usage``,
                   plus which language and expert served it)
``text``           the text alone (``text/plain``)
``srt``, ``vtt``   subtitles (``text/plain``); times from Whisper's timestamp tokens when the base has them,
                   else one cue per window
``verbose_json``   ``{"task", "language", "duration", "text", "segments", "usage"}`` as OpenAI's, plus
                   ``expert`` and ``language_probability``; each segment also names its language and expert.
                   ``avg_logprob`` and ``no_speech_prob`` are null (not computed); ``tokens`` is empty
=================  ==========================================================================================

Languages are Whisper codes (``uk``), where OpenAI writes English names (``ukrainian``).
"""

from __future__ import annotations

import math
import zlib

from inference.transcribe import WINDOW_SECONDS, Transcript
from inference.transcript_formats import to_srt, to_vtt

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
TIMED_FORMATS = ("srt", "vtt", "verbose_json")  # decoded with timestamp tokens when the base has them


class APIError(Exception):
    """An answer other than 200, in OpenAI's error shape (see :meth:`body`).

    Args:
        status: the HTTP status.
        message: what went wrong and what to do about it.
        type: OpenAI's error type (``invalid_request_error``, ``server_error``...).
        param: the request field at fault, if any.
        code: a short machine-readable code (``model_not_found``, ``invalid_audio``...).
        headers: extra response headers (``Retry-After``).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes of its zlib compression (Whisper flags repetition loops above 2.4)."""
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 4) if data else 0.0


def _usage(t: Transcript) -> dict:
    return {"type": "duration", "seconds": math.ceil(t.duration)}


def as_json(t: Transcript) -> dict:
    """The ``json`` format."""
    return {"text": t.text, "language": t.language, "expert": t.expert, "duration": round(t.duration, 3),
            "usage": _usage(t)}


def as_verbose_json(t: Transcript, task: str = "transcribe") -> dict:
    """The ``verbose_json`` format, segments included."""
    segments = []
    for n, s in enumerate(x for x in t.segments if x.text):
        window = s.seek if s.seek is not None else s.start // WINDOW_SECONDS * WINDOW_SECONDS
        segments.append({"id": n, "seek": int(round(100 * window)),
                         "start": s.start, "end": s.end, "text": s.text, "tokens": [], "temperature": 0.0,
                         "avg_logprob": None, "compression_ratio": compression_ratio(s.text), "no_speech_prob": None,
                         "language": s.language, "expert": s.expert})
    return {"task": task, "language": t.language, "language_probability": t.language_probability,
            "expert": t.expert, "duration": round(t.duration, 3), "text": t.text, "segments": segments,
            "usage": _usage(t)}


def render(t: Transcript, fmt: str, task: str = "transcribe") -> tuple[dict | str, str]:
    """(body, media type) of a transcript in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "json":
        return as_json(t), "application/json"
    if fmt == "verbose_json":
        return as_verbose_json(t, task), "application/json"
    if fmt == "text":
        return t.text + "\n", "text/plain; charset=utf-8"
    if fmt == "srt":
        return to_srt(t), "text/plain; charset=utf-8"
    if fmt == "vtt":
        return to_vtt(t), "text/plain; charset=utf-8"
    raise ValueError(f"unknown response_format {fmt!r}; choose one of {', '.join(FORMATS)}")
