"""Real recorded speech from Debian: the voice acting of the game Fish Fillets NG (GPL-2).

Debian's ``fillets-ng-data-cs`` and ``fillets-ng-data-nl`` packages hold several actors' recordings (Czech
1,756 clips / 1.6 h, Dutch 1,528 clips / 1.5 h, 22.05 kHz Ogg Vorbis); ``fillets-ng-data`` holds the
transcripts, one Lua file per game level and language::

    usr/share/games/fillets-ng/sound/<level>/<lang>/<clip id>.ogg
    usr/share/games/fillets-ng/script/<level>/dialogs_<lang>.lua   dialogId("<clip id>", <font>, "<gloss>")
                                                                   dialogStr("<line>")

``fetch_packages`` downloads and unpacks the packages with ``apt-get download`` + ``dpkg-deb -x`` (no root,
no install); ``read_dialogs`` pairs clips with their lines; ``split_levels`` deals whole game levels to
train / validation / test, so a test scene and its sentences are never trained on; the import itself is
:func:`trainers.corpus.debian.import_listing`, an ``audiofolder`` listing read by
:func:`trainers.corpus.importers.corpus_from_dir`, the path a user's own recordings take. ``build_corpus``
does all of it (``corpus fetch fillets`` and the quickstart call it).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainers.corpus.debian import fetch_debs, import_listing
from trainers.corpus.languages import CorpusError

GAME_DIR = Path("usr/share/games/fillets-ng")
LANGUAGES = ("cs", "nl")  # the languages Debian ships voice packages for
DATA_PACKAGE = "fillets-ng-data"
# A Lua string literal in double quotes, with backslash escapes.
_STRING = r'"((?:[^"\\]|\\.)*)"'
_CALL = re.compile(r"\b(dialogId|dialogStr)\s*\(\s*" + _STRING
                   + r"((?:\s*,\s*(?:" + _STRING[:-1] + r'"|[\w.]+))*)\s*\)')
_ARG = re.compile(_STRING + r"|([\w.]+)")
_LUA_ESCAPES = {"n": " ", "t": " ", '"': '"', "'": "'", "\\": "\\"}


class FilletsError(CorpusError):
    """The Fish Fillets packages could not be fetched, or their files are not where the game keeps them."""


@dataclass(frozen=True)
class Clip:
    """One recorded line: its game level, language, clip id, transcript, speaker (the dialog font) and file."""

    level: str
    language: str
    clip_id: str
    text: str
    speaker: str
    audio: Path


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: _LUA_ESCAPES.get(m.group(1), m.group(1)), s)


def parse_dialogs(lua: str) -> list[tuple[str, str, str]]:
    """``(clip id, speaker font, line)`` for every ``dialogId(...)`` followed by its ``dialogStr(...)``.

    A ``dialogId`` without a ``dialogStr`` (an untranslated line) is left out.
    """
    out, pending = [], None
    for m in _CALL.finditer(lua):
        fn, first, rest = m.group(1), _unescape(m.group(2)), m.group(3) or ""
        if fn == "dialogId":
            args = [a or b for a, b in _ARG.findall(rest)]
            pending = (first, args[0] if args else "")
        elif pending is not None:
            text = " ".join(first.split())
            if text:
                out.append((pending[0], pending[1], text))
            pending = None
    return out


def game_root(path: str | os.PathLike) -> Path:
    """The ``fillets-ng`` directory under ``path`` (an unpacked package root, or the game directory itself)."""
    path = Path(path).expanduser()
    for candidate in (path, path / GAME_DIR, path / "fillets-ng"):
        if (candidate / "script").is_dir() and (candidate / "sound").is_dir():
            return candidate
    raise FilletsError(
        f"{path} holds no Fish Fillets NG data (expected script/ and sound/ under {path / GAME_DIR}); fetch it "
        f"with `whisper-experts corpus fetch fillets --out DIR`, or pass the unpacked packages' root")


def read_dialogs(root: str | os.PathLike, languages: Sequence[str] = LANGUAGES) -> tuple[list[Clip], dict[str, int]]:
    """Every clip of ``languages`` that has both a transcript and an audio file.

    Returns:
        ``(clips, missing)``: clips sorted by level and id; ``missing[lang]`` counts transcripts whose audio
        file does not exist (lines the actors did not record).
    """
    game = game_root(root)
    clips, missing = [], {lang: 0 for lang in languages}
    for lang in languages:
        for lua in sorted((game / "script").glob(f"*/*dialogs_{lang}.lua")):
            level = lua.parent.name
            for clip_id, font, text in parse_dialogs(lua.read_text(encoding="utf-8", errors="replace")):
                audio = game / "sound" / level / lang / f"{clip_id}.ogg"
                if audio.is_file():
                    clips.append(Clip(level, lang, clip_id, text, font.removeprefix("font_"), audio))
                else:
                    missing[lang] += 1
    if not clips:
        raise FilletsError(f"{game}: no recorded clips for {', '.join(languages)}; Debian ships voices for "
                           f"{', '.join(LANGUAGES)} (packages fillets-ng-data-<lang>)")
    clips.sort(key=lambda c: (c.language, c.level, c.clip_id))
    return clips, missing


def split_levels(counts: dict[str, int], fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict[str, str]:
    """Deal whole levels to splits, deterministically, so each split gets about its share of clips.

    Levels are ordered by a hash of their name (stable across machines and Python versions), then test and
    validation are filled to their shares and the rest is train.

    Args:
        counts: clips per level.
        fractions: train, validation, test shares of the clips.

    Returns:
        level -> ``"train"`` / ``"validation"`` / ``"test"``.
    """
    total = sum(counts.values())
    order = sorted(counts, key=lambda lvl: hashlib.sha256(lvl.encode()).hexdigest())
    targets = [("test", fractions[2] * total), ("validation", fractions[1] * total)]
    out, filled, k = {}, 0.0, 0
    for level in order:
        while k < len(targets) and filled >= targets[k][1] - 0.5 * counts[level]:
            k, filled = k + 1, 0.0
        out[level] = targets[k][0] if k < len(targets) else "train"
        filled += counts[level]
    return out


def fetch_packages(dest: str | os.PathLike, languages: Sequence[str] = LANGUAGES) -> Path:
    """Download Debian's Fish Fillets NG data packages for ``languages`` and unpack them into ``dest``.

    Uses :func:`trainers.corpus.debian.fetch_debs` (no root needed, nothing installed); packages already
    unpacked there are not fetched again.

    Returns:
        The game directory (``dest/usr/share/games/fillets-ng``).
    """
    dest = Path(dest).expanduser()
    unknown = sorted(set(languages) - set(LANGUAGES))
    if unknown:
        raise FilletsError(f"no Fish Fillets voice package for {', '.join(unknown)}; Debian has {', '.join(LANGUAGES)}")
    fetch_debs(dest, [DATA_PACKAGE] + [f"{DATA_PACKAGE}-{lang}" for lang in languages], FilletsError)
    return game_root(dest)


def build_corpus(game: Path, languages: Sequence[str], out: str | os.PathLike, *, overwrite: bool = False,
                 split: tuple[float, float, float] = (0.7, 0.1, 0.2), progress: bool = True) -> dict:
    """Write the corpus of ``languages`` from an unpacked game (``fetch_packages`` or an installed game) to
    ``out``: whole levels per split, unusable clips skipped and counted, a card saying where it came from.

    Returns:
        ``{"clips", "unrecorded_lines" (per language), "skipped" [(file, reason)]}``.
    """
    from collections import defaultdict

    clips, missing = read_dialogs(game, languages)
    counts: dict[str, int] = defaultdict(int)
    for clip in clips:
        counts[clip.level] += 1
    splits = split_levels(dict(counts), split)
    skipped: list[tuple[str, str]] = []
    rows = ({"file_name": c.audio.relative_to(game / "sound").as_posix(), "transcription": c.text,
             "language": c.language, "split": splits[c.level], "speaker": c.speaker} for c in clips)
    card = {"kind": "recorded", "source": "fish-fillets-ng (Debian packages fillets-ng-data, fillets-ng-data-"
            + ", fillets-ng-data-".join(languages) + "; GPL-2)", "split": "by game level",
            "levels": {s: sorted(lvl for lvl, v in splits.items() if v == s) for s in ("train", "validation", "test")},
            "unrecorded_lines": missing}
    import_listing(game / "sound", rows, out, link="sound", card=card, overwrite=overwrite, progress=progress,
                   skipped=skipped)
    return {"clips": len(clips), "unrecorded_lines": missing, "skipped": skipped}
