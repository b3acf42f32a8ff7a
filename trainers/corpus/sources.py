"""Real sentences in many languages, from files that work offline, and the espeak-ng voices that speak them.

A synthetic corpus is only as good as its text: the sentences must be real (so a language model inside
Whisper has something to recognise), varied, short enough to be one utterance, and free of characters that
no one would say aloud. This module gathers such sentences per language from:

- the user's own text files, one sentence per line (``--text-file LANG=PATH``); these come first;
- Debian's ``fortunes`` / ``fortunes-<xx>`` packages (``/usr/share/games/fortunes``): quotations, proverbs
  and jokes, entries separated by ``%`` lines;
- the ``chatterbot-corpus`` PyPI package: short dialogues in ~25 languages (YAML);
- the ``gflanguages`` PyPI package: a few sentences of the Universal Declaration of Human Rights per language.

Every candidate passes the same cleaning: whitespace collapsed, attributions (``-- Author``), URLs, code,
digits and letters outside the language's alphabet (from gflanguages' exemplar characters) rejected, and a
length between a few words and ~200 characters, so that an utterance lasts under ~15 s of speech.
The result is deduplicated and in a deterministic order.

Language codes and espeak-ng voices live in :mod:`trainers.corpus.languages`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from trainers.corpus.languages import CorpusError, language_code, supported_languages

logger = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")


# Fortunes: where each language lives under FORTUNES_DIR, and the Debian package it comes from.
# English is the top-level files of `fortunes`/`fortunes-min` (they have a `.u8` twin; fortunes-it also
# installs top-level copies without one). cs/ holds a Slovak file (klasik-sk), which sk/ links to.
_FORTUNES_PACKAGE = {"en": "fortunes", "pt": "fortunes-br", "sk": "fortunes-cs"}
_FORTUNES_SKIP = {
    "cs": {"klasik-sk", "lkml", "pocitace"},
    # ASCII art, banners and programming jokes say nothing a speaker would.
    "*": {"ascii-art", "asciiart", "banner", "perl", "linux", "linuxcookie", "computers", "computer", "debian",
          "channel-debian.fortunes", "zippy", "translate-me"},
}

# chatterbot-corpus names its data folders by English language name.
_CHATTERBOT_DIR = {
    "bn": "bengali", "zh": "chinese", "nl": "dutch", "en": "english", "fr": "french", "de": "german",
    "he": "hebrew", "hi": "hindi", "id": "indonesian", "it": "italian", "ja": "japanese", "ko": "korean",
    "mr": "marathi", "fa": "persian", "pt": "portuguese", "ru": "russian", "es": "spanish", "sv": "swedish",
    "ta": "tamil", "te": "telugu", "th": "thai", "tr": "turkish", "uk": "ukrainian", "ur": "urdu",
}

# Scripts written without spaces between words: length is judged in characters, not words.
_NO_SPACE_LANGUAGES = {"zh", "ja", "th", "yue", "my", "lo", "km", "bo"}
# Languages whose gflanguages "auxiliary" letters are another language's alphabet (Russian letters in
# Ukrainian): only the base alphabet is accepted, which keeps Russian sentences out of a Ukrainian corpus.
_BASE_LETTERS_ONLY = {"uk", "be"}
# Characters that mean code, markup, URLs or tables, never speech; parentheses (asides, stage directions);
# digits (a transcript of "1984" could be read or written many ways).
_CODE_CHARS = re.compile(r"[<>{}\[\]|\\/_=#*~^$`@+&%§¤\t()\d]")
_ITALIAN_ACCENT = dict(zip("aeiouAEIOU", "àèìòùÀÈÌÒÙ"))
_DOUBLE_QUOTES = str.maketrans("", "", "\"„“”«»‹›")
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"'»”’)]*\s+")
# "\t\t-- Author": an indented dash, or "--" anywhere at the start. A dash at column 0 is dialogue ("— Hi!").
_ATTRIBUTION = re.compile(r"^(\s+(--|—|―|–)|--)\s*\S")
_ABBREVIATION = re.compile(r"\w\.\w")  # "z.B.", "т.к.": read aloud differently from how they are written
_SHOUTED = re.compile(r"\b[^\W\d_]{3,}\s+[^\W\d_]{3,}\b")
_URL = re.compile(r"(https?:|www\.|\.(com|org|net|de|ru|cz|pl)\b|\w@\w)", re.IGNORECASE)

DEFAULT_MIN_WORDS = 3
DEFAULT_MAX_WORDS = 25
DEFAULT_MIN_CHARS = 10
DEFAULT_MAX_CHARS = 200


# ----------------------------------------------------------------------------------------------------------
# Cleaning


@functools.cache
def _alphabet(language: str) -> frozenset[str] | None:
    """Lower-case letters of the language's alphabet (gflanguages exemplar characters), or None if unknown."""
    record = _gflanguages_record(language)
    if record is None or language in _NO_SPACE_LANGUAGES:
        return None  # CJK exemplar lists are ranges of thousands of ideographs: judge by script instead
    fields = [record.exemplar_chars.base]
    if language not in _BASE_LETTERS_ONLY:
        fields.append(record.exemplar_chars.auxiliary)
    letters = set()
    for token in " ".join(fields).split():
        if len(token) == 3 and token[1] == "-":  # a range, e.g. Korean "가-힣" (all Hangul syllables)
            token = "".join(chr(c) for c in range(ord(token[0]), ord(token[2]) + 1))
        for ch in token.strip("{}"):
            if unicodedata.category(ch).startswith("L"):
                letters.add(ch.lower())
    return frozenset(letters) if letters else None


def _script_of(ch: str) -> str:
    """The first word of a letter's Unicode name ("LATIN", "CYRILLIC", "CJK", ...)."""
    return unicodedata.name(ch, "UNKNOWN").split(" ")[0]


@functools.cache
def _scripts(language: str) -> frozenset[str]:
    """Unicode scripts the language's sample text is written in (the fallback when no alphabet is known)."""
    record = _gflanguages_record(language)
    text = record.sample_text.specimen_16 if record is not None else ""
    scripts = {_script_of(ch) for ch in text if unicodedata.category(ch).startswith("L")}
    return frozenset(scripts or {"LATIN"})


def _letters_ok(text: str, language: str) -> bool:
    """Whether every letter of ``text`` belongs to the language's alphabet (or at least its script)."""
    letters = {ch for ch in set(text.lower()) if unicodedata.category(ch).startswith("L")}
    alphabet = _alphabet(language)
    if alphabet is not None:
        return letters <= alphabet
    scripts = _scripts(language)
    return all(_script_of(ch) in scripts for ch in letters)


def _normalise(text: str, language: str) -> str:
    """Unicode NFC, collapsed whitespace, no double quotes (unbalanced after splitting), ``--`` as a dash."""
    text = unicodedata.normalize("NFC", text)
    if language == "fa":
        # Persian typed on an Arabic keyboard: Arabic yeh/kaf for the Persian letters that look the same.
        text = text.replace("ي", "ی").replace("ك", "ک")
    text = text.translate(_DOUBLE_QUOTES)
    text = re.sub(r"\s*--+\s*", " – ", text)  # typewriter dashes, spaced or not
    if language == "it":
        # Italian typed in ASCII writes a final accent as an apostrophe: "verita'" is "verità".
        text = re.sub(r"(?<!\bp)([aeiouAEIOU])'(?=[\s.,;:!?]|$)", lambda m: _ITALIAN_ACCENT[m.group(1)], text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.lstrip("-–—― ").strip()


def clean_sentence(
    text: str,
    language: str,
    *,
    min_chars: int = DEFAULT_MIN_CHARS,
    max_chars: int = DEFAULT_MAX_CHARS,
    min_words: int = DEFAULT_MIN_WORDS,
    max_words: int = DEFAULT_MAX_WORDS,
) -> str | None:
    """Return ``text`` cleaned for speech synthesis, or None if it is not a usable sentence.

    Rejects URLs, code and markup characters, digits (a transcript of "1984" could be read or written many
    ways), letters outside the language's alphabet, and texts outside the length limits (words, or
    characters / 2 for languages written without spaces).
    """
    text = _normalise(text, language)
    if not (min_chars <= len(text) <= max_chars):
        return None
    if _URL.search(text) or _CODE_CHARS.search(text):
        return None
    letters = [ch for ch in text if unicodedata.category(ch).startswith("L")]
    if not letters:
        return None
    if letters[0] != letters[0].upper():
        return None  # starts lower-case: the tail of a sentence cut at an abbreviation or a line break
    if _ABBREVIATION.search(text) or any(
        m.group(0).isupper() for m in _SHOUTED.finditer(text)
    ):
        return None  # abbreviations, and upper-case headings ("MURPHY'S LAW Anything that can ...")
    n_words = len(text) // 2 if language in _NO_SPACE_LANGUAGES else len(text.split())
    if not (min_words <= n_words <= max_words):
        return None
    if not _letters_ok(text, language):
        return None
    return text


def split_sentences(text: str) -> list[str]:
    """Split a paragraph at sentence-final punctuation; a piece that starts lower-case is glued back on
    (it followed an abbreviation such as "z. B." or "Dr.")."""
    pieces = [p for p in _SENTENCE_END.split(text.strip()) if p]
    sentences: list[str] = []
    for piece in pieces:
        first_letter = next((ch for ch in piece if ch.isalpha()), "")
        if sentences and first_letter and first_letter.islower():
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


def _ends_sentence(text: str) -> bool:
    return bool(re.search(r"[.!?…。！？][\"'»”’)]*$", text))


# ----------------------------------------------------------------------------------------------------------
# Sources: each yields raw candidate texts in a deterministic order.


def fortune_files(language: str, root: Path = FORTUNES_DIR) -> list[tuple[Path, str]]:
    """The fortune files for a language under ``root`` as (file, source name) pairs, sorted by name.

    The source name is the Debian package, e.g. ``fortunes-de``. Offensive sections (``off/``) are skipped.
    """
    if not root.is_dir():
        return []
    package = _FORTUNES_PACKAGE.get(language, f"fortunes-{language}")
    skip = _FORTUNES_SKIP["*"] | _FORTUNES_SKIP.get(language, set())
    if language == "en":
        # English files are the top-level ones with a UTF-8 twin `<name>.u8` (see the note above).
        candidates = [p for p in root.iterdir() if (root / f"{p.name}.u8").exists()]
    elif language == "pt":
        candidates = [root / "brasil"]
    else:
        folder = root / language
        candidates = list(folder.iterdir()) if folder.is_dir() else []
    files = [
        p for p in candidates
        if p.is_file() and not p.name.endswith((".dat", ".u8")) and p.name not in skip
        and p.stat().st_size > 0
    ]
    return [(p, package) for p in sorted(files, key=lambda p: p.name)]


def _fortune_entries(path: Path) -> Iterator[str]:
    """Entries of a fortune file: the text between ``%`` lines."""
    text = path.read_text(encoding="utf-8", errors="replace")
    entry: list[str] = []
    for line in text.splitlines():
        if line.strip() == "%":
            if entry:
                yield "\n".join(entry)
            entry = []
        else:
            entry.append(line)
    if entry:
        yield "\n".join(entry)


def fortune_texts(language: str, root: Path = FORTUNES_DIR) -> Iterator[tuple[str, str]]:
    """Candidate sentences from the fortune files of ``language``, as (text, source) pairs."""
    for path, source in fortune_files(language, root):
        for entry in _fortune_entries(path):
            lines = entry.splitlines()
            # An attribution line ("-- Author") ends the quotation; what follows is a signature.
            for i, line in enumerate(lines):
                if _ATTRIBUTION.match(line):
                    lines = lines[:i]
                    break
            paragraphs = [p for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]
            # A one-line entry (a proverb) may lack a full stop; in longer entries an unterminated piece is
            # a title or a list item, not a sentence.
            single = len(paragraphs) == 1 and len(paragraphs[0].strip().splitlines()) == 1
            for paragraph in paragraphs:
                for sentence in split_sentences(" ".join(paragraph.split())):
                    if single or _ends_sentence(sentence):
                        yield sentence, source


def chatterbot_texts(language: str) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """Candidate messages from the chatterbot-corpus dialogues of ``language``, as (message, source, parts).

    A message that is usable whole is kept whole (it is a natural utterance); otherwise its sentences
    ``parts`` are tried one by one. Never both, so no sentence appears twice inside different utterances.
    """
    folder_name = _CHATTERBOT_DIR.get(language)
    if folder_name is None:
        return
    try:
        import chatterbot_corpus
    except ImportError:
        logger.info("chatterbot-corpus is not installed (pip install chatterbot-corpus); skipping it")
        return
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / folder_name
    for path in sorted(folder.glob("*.yml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:  # one broken file should not hide the others
            logger.warning("skipping unreadable chatterbot-corpus file %s: %s", path, err)
            continue
        for conversation in data.get("conversations") or []:
            for message in conversation if isinstance(conversation, list) else []:
                if not isinstance(message, str):
                    continue
                parts = split_sentences(" ".join(message.split()))
                yield message, "chatterbot-corpus", tuple(parts) if len(parts) > 1 else ()


@functools.cache
def _gflanguages_record(language: str):
    """The gflanguages record for a Whisper code: the most spoken script variant (``uk`` -> ``uk_Cyrl``).

    Parses only the ``<code>_*.textproto`` files (loading all 1,700 languages takes a second).
    """
    try:
        import gflanguages
    except ImportError:
        logger.info("gflanguages is not installed (pip install gflanguages); skipping UDHR samples")
        return None
    code = {"no": "nb", "jw": "jv"}.get(language, language)
    try:
        from importlib.resources import files

        folder = files("gflanguages.data").joinpath("languages")
        records = [
            gflanguages.text_format.Parse(f.read_text(encoding="utf-8"), gflanguages.LanguageProto())
            for f in folder.iterdir()
            if f.name.startswith(f"{code}_") and f.name.endswith(".textproto")
        ]
    except AttributeError:  # an older gflanguages without these names: the public (slower) loader
        records = [r for r in gflanguages.LoadLanguages().values() if r.language == code]
    records = [r for r in records if r.language == code]
    if code == "zh":
        records = [r for r in records if r.script == "Hans"] or records
    if not records:
        return None
    return max(records, key=lambda r: r.population)


def udhr_texts(language: str) -> Iterator[tuple[str, str]]:
    """Sentences of the Universal Declaration of Human Rights from gflanguages' sample texts."""
    record = _gflanguages_record(language)
    if record is None:
        return
    sample = record.sample_text
    for field in ("specimen_36", "specimen_32", "specimen_21", "specimen_16"):
        for paragraph in getattr(sample, field, "").splitlines():
            for sentence in split_sentences(paragraph):
                if _ends_sentence(sentence):
                    yield sentence, "udhr"


def user_texts(paths: Sequence[Path]) -> Iterator[tuple[str, str]]:
    """Lines of the user's text files (one sentence per line), source ``user:<path>``."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"text file {path} does not exist (expected one sentence per line)")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield line, f"user:{path}"


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def _dedup_key(text: str) -> str:
    """Sentences that differ only in case, punctuation or spacing are one sentence."""
    return " ".join("".join(ch for ch in text.casefold() if ch.isalnum() or ch.isspace()).split())


def sentences(
    language: str,
    text_files: Mapping[str, Sequence[Path]] | None = None,
    min_chars: int = DEFAULT_MIN_CHARS,
    max_chars: int = DEFAULT_MAX_CHARS,
    *,
    min_words: int = DEFAULT_MIN_WORDS,
    max_words: int = DEFAULT_MAX_WORDS,
    builtin: bool = True,
) -> list[tuple[str, str]]:
    """All usable sentences for a language, as (sentence, source) pairs, deduplicated, deterministic order.

    Args:
        language: Whisper language code (or a name/locale that :func:`language_code` understands).
        text_files: language code -> text files with one sentence per line; these come first and are
            cleaned like the rest (a line that is no usable sentence is dropped).
        min_chars, max_chars: length limits in characters.
        min_words, max_words: length limits in words (characters / 2 where words are not spaced).
        builtin: also use the built-in sources (fortunes, chatterbot-corpus, UDHR samples).

    Returns:
        ``[(sentence, source), ...]``; source is ``user:<path>``, ``fortunes-<xx>``, ``chatterbot-corpus``
        or ``udhr``.
    """
    code = language_code(language)
    limits = (min_chars, max_chars, min_words, max_words)
    user_paths = [p for key, paths in (text_files or {}).items() if language_code(key) == code for p in paths]
    seen: set[str] = set()
    result: list[tuple[str, str]] = []
    merged = _clean_stream(user_texts(user_paths), code, limits)
    if builtin:
        merged += list(_builtin_sentences(code, limits))
    for text, source, key in merged:
        if key not in seen:
            seen.add(key)
            result.append((text, source))
    return result


@functools.lru_cache(maxsize=64)
def _builtin_sentences(code: str, limits: tuple[int, int, int, int]) -> tuple[tuple[str, str, str], ...]:
    """Cleaned built-in sentences (fortunes, chatterbot-corpus, UDHR): parsed once per process, since the
    installed files do not change while it runs."""
    stream = itertools.chain(fortune_texts(code), chatterbot_texts(code), udhr_texts(code))
    return tuple(_clean_stream(stream, code, limits))


def _clean_stream(stream: Iterable[tuple], code: str, limits: tuple[int, int, int, int]) -> list[tuple[str, str, str]]:
    """Clean and deduplicate candidates; returns (text, source, dedup key) triples.

    A stream yields (text, source) or (text, source, parts): the parts are tried when the whole is unusable.
    """
    min_chars, max_chars, min_words, max_words = limits
    clean = functools.partial(clean_sentence, language=code, min_chars=min_chars, max_chars=max_chars,
                              min_words=min_words, max_words=max_words)
    seen: set[str] = set()
    result = []
    for raw, source, *fallback in stream:
        text = clean(raw)
        texts = [text] if text is not None else [clean(part) for part in (fallback[0] if fallback else ())]
        for text in texts:
            if text is None:
                continue
            key = _dedup_key(text)
            if key not in seen:
                seen.add(key)
                result.append((text, source, key))
    return result


def source_counts(
    languages: Sequence[str] | None = None,
    text_files: Mapping[str, Sequence[Path]] | None = None,
) -> dict[str, dict[str, int]]:
    """Usable sentences per language per source: ``{"de": {"fortunes-de": 2817, "udhr": 6, ...}, ...}``.

    ``languages`` defaults to every supported language.
    """
    codes = [language_code(lang) for lang in languages] if languages else supported_languages()
    return {code: dict(Counter(source for _, source in sentences(code, text_files))) for code in codes}
