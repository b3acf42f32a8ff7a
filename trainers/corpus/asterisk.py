"""Real recorded speech from Debian: the voice prompts of the Asterisk telephone exchange (CC-BY-SA-3.0).

Debian's ``asterisk-core-sounds-<lang>-g722`` packages hold one professional speaker's recordings of about 560
prompts per language (English, Spanish, French, Italian, Russian; wide-band G.722, 16 kHz; about 25 minutes
each), and ``asterisk-core-sounds-<lang>`` the transcripts, one ``name: text`` line per prompt::

    usr/share/asterisk/sounds/<voice>/<name>.g722                    <voice>: e.g. ru_RU_f_IvrvoiceRU
    usr/share/doc/asterisk-core-sounds-<lang>/core-sounds-<lang>.txt.gz

Prompts are menu lines, voicemail messages, numbers, dates, letters ("Нажмите решётку"); tones and silences
(transcribed ``[beep]``, ``<beep ascending>``, ``(10 seconds of silence)``) are left out. There is one speaker
per language and prompts share phrases, so clips are dealt to train / validation / test one by one (by a hash
of their name): the test split is the same voice and the same phone-menu register, an optimistic test of a
language expert.
The project uses Russian as real speech of a related language for a Czech expert (issue 16 item 3).

``fetch_packages`` downloads and unpacks the packages (:func:`trainers.corpus.debian.fetch_debs`),
``read_prompts`` pairs transcripts with recordings, ``build_corpus`` writes the corpus
(``whisper-experts corpus fetch asterisk``).
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainers.corpus.debian import fetch_debs, import_listing
from trainers.corpus.fillets import split_levels
from trainers.corpus.languages import CorpusError

SOUNDS = Path("usr/share/asterisk/sounds")
DOCS = Path("usr/share/doc")
LANGUAGES = ("en", "es", "fr", "it", "ru")  # the languages Debian ships core sound packages for
AUDIO_SUFFIXES = (".g722", ".wav")  # the wide-band package first; the 8 kHz WAV one is read if that is all


class AsteriskError(CorpusError):
    """The Asterisk sound packages could not be fetched, or their files are not where Debian puts them."""


@dataclass(frozen=True)
class Prompt:
    """One recorded prompt: its language, name (``vm-intro``, ``digits/7``), transcript, voice and file."""

    language: str
    name: str
    text: str
    voice: str
    audio: Path


def packages(language: str) -> list[str]:
    """The Debian packages holding ``language``'s transcripts and wide-band recordings."""
    return [f"asterisk-core-sounds-{language}", f"asterisk-core-sounds-{language}-g722"]


def parse_transcripts(listing: str) -> list[tuple[str, str]]:
    """``(name, text)`` for each ``name: text`` line of a ``core-sounds-<lang>.txt`` listing.

    Comments (``;``) and empty lines are skipped; bracketed notes (``[ascending tones]``, ``Точка [.]``,
    ``<beep ascending>``) are removed; a line whose text is empty or only a parenthesized description
    (``(1 second of silence)``) is left out; a text that repeats its name first
    (``conf-adminmenu: conf-adminmenu: ...``) loses the repeat.
    """
    out = []
    for line in listing.splitlines():
        line = line.strip()
        if not line or line.startswith(";") or ":" not in line:
            continue
        name, text = (part.strip() for part in line.split(":", 1))
        text = text.removeprefix(f"{name}:")
        text = " ".join(re.sub(r"\[[^\]]*\]|<[^>]*>", " ", text).split())
        if name and text and not re.fullmatch(r"\([^)]*\)", text):
            out.append((name, text))
    return out


def _check_languages(languages: Sequence[str]) -> None:
    unknown = sorted(set(languages) - set(LANGUAGES))
    if unknown:
        raise AsteriskError(f"no Asterisk sound package for {', '.join(unknown)}; Debian has {', '.join(LANGUAGES)}")


def _voice_dir(root: Path, language: str) -> Path | None:
    sounds = root / SOUNDS
    voices = sorted(p for p in sounds.glob(f"{language}_*") if p.is_dir()) if sounds.is_dir() else []
    return voices[0] if voices else None


def _listing(root: Path, language: str) -> str | None:
    for name in (f"core-sounds-{language}.txt.gz", f"core-sounds-{language}.txt"):
        path = root / DOCS / f"asterisk-core-sounds-{language}" / name
        if path.is_file():
            data = path.read_bytes()
            return (gzip.decompress(data) if name.endswith(".gz") else data).decode("utf-8", errors="replace")
    return None


def read_prompts(root: str | os.PathLike, languages: Sequence[str]) -> tuple[list[Prompt], dict[str, int]]:
    """Every prompt of ``languages`` under ``root`` (unpacked packages, or ``/`` with them installed) that has
    both a transcript and a recording.

    Returns:
        ``(prompts, missing)``: prompts sorted by language and name; ``missing[lang]`` counts transcripts
        without a recording.

    Raises:
        AsteriskError: a language's transcripts or recordings are not there (naming the package to fetch).
    """
    _check_languages(languages)
    root = Path(root).expanduser()
    prompts, missing = [], {}
    for lang in languages:
        voice, listing = _voice_dir(root, lang), _listing(root, lang)
        if voice is None or listing is None:
            what = root / (SOUNDS / f"{lang}_*" if voice is None else DOCS / f"asterisk-core-sounds-{lang}")
            raise AsteriskError(
                f"{root} holds no Asterisk {lang} prompts ({what} is missing); fetch them with `whisper-experts "
                f"corpus fetch asterisk --languages {lang} --out DIR`, or pass the root where Debian's "
                f"{' and '.join(packages(lang))} are unpacked")
        missing[lang] = 0
        for name, text in parse_transcripts(listing):
            audio = next((voice / f"{name}{s}" for s in AUDIO_SUFFIXES if (voice / f"{name}{s}").is_file()), None)
            if audio is None:
                missing[lang] += 1
            else:
                prompts.append(Prompt(lang, name, text, voice.name, audio))
    prompts.sort(key=lambda p: (p.language, p.name))
    return prompts, missing


def fetch_packages(dest: str | os.PathLike, languages: Sequence[str]) -> Path:
    """Download and unpack the transcript and G.722 packages of ``languages`` into ``dest``; return ``dest``."""
    _check_languages(languages)
    return fetch_debs(dest, [p for lang in languages for p in packages(lang)], AsteriskError)


def build_corpus(root: str | os.PathLike, languages: Sequence[str], out: str | os.PathLike, *,
                 overwrite: bool = False, split: tuple[float, float, float] = (0.7, 0.1, 0.2),
                 progress: bool = True) -> dict:
    """Write the corpus of ``languages`` from unpacked packages (``fetch_packages``) to ``out``: each prompt
    dealt to a split by a hash of its language and name, undecodable clips skipped and counted, a card saying
    where it came from.

    Returns:
        ``{"clips", "unrecorded_lines" (per language), "skipped" [(file, reason)]}``.
    """
    root = Path(root).expanduser()
    prompts, missing = read_prompts(root, languages)
    keys = {p: f"{p.language}/{p.name}" for p in prompts}
    splits = split_levels(dict.fromkeys(keys.values(), 1), split)
    sounds = root / SOUNDS
    rows = ({"file_name": p.audio.relative_to(sounds).as_posix(), "transcription": p.text,
             "language": p.language, "split": splits[keys[p]], "speaker": p.voice} for p in prompts)
    skipped: list[tuple[str, str]] = []
    card = {"kind": "recorded", "source": "Asterisk core sounds (Debian packages "
            + ", ".join(p for lang in languages for p in packages(lang)) + "; CC-BY-SA-3.0)",
            "split": "by prompt (one speaker per language)", "unrecorded_lines": missing}
    import_listing(sounds, rows, out, link="sounds", card=card, overwrite=overwrite, progress=progress,
                   skipped=skipped)
    return {"clips": len(prompts), "unrecorded_lines": missing, "skipped": skipped}
