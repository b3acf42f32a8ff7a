"""Languages a corpus can be made in: Whisper language codes, their names and espeak-ng voices.

``language_code`` turns what a user types (``de``, ``German``, ``de-DE``, ``cmn``) into Whisper's code and
refuses languages that espeak-ng cannot speak (for synthesis) or Whisper does not know (for imports).
"""

from __future__ import annotations

import functools


class CorpusError(ValueError):
    """Base class of the corpus errors; the command line prints their message and exits with status 2."""


class UnknownLanguageError(CorpusError):
    """A language that has no espeak-ng voice in :data:`ESPEAK_VOICES`."""


# Whisper language code -> espeak-ng voices (``espeak-ng --voices``), first one the standard accent.
# Several accents of one language add speaker variety (synthesis cycles through them).
# "eo" and "ga" are not Whisper languages; they are here as targets for new experts.
ESPEAK_VOICES: dict[str, tuple[str, ...]] = {
    "af": ("af",),
    "ar": ("ar",),
    "az": ("az",),
    "be": ("be",),
    "bg": ("bg",),
    "bn": ("bn",),
    "bs": ("bs",),
    "ca": ("ca",),
    "cs": ("cs",),
    "cy": ("cy",),
    "da": ("da",),
    "de": ("de",),
    "el": ("el",),
    "en": ("en-us", "en-gb", "en-gb-scotland", "en-029"),
    "eo": ("eo",),
    "es": ("es", "es-419"),
    "et": ("et",),
    "eu": ("eu",),
    "fa": ("fa",),
    "fi": ("fi",),
    "fr": ("fr-fr", "fr-be", "fr-ch"),
    "ga": ("ga",),
    "gu": ("gu",),
    "haw": ("haw",),
    "he": ("he",),
    "hi": ("hi",),
    "hr": ("hr",),
    "ht": ("ht",),
    "hu": ("hu",),
    "hy": ("hy",),
    "id": ("id",),
    "is": ("is",),
    "it": ("it",),
    "ja": ("ja",),
    "ka": ("ka",),
    "kk": ("kk",),
    "kn": ("kn",),
    "ko": ("ko",),
    "la": ("la",),
    "lb": ("lb",),
    "lt": ("lt",),
    "lv": ("lv",),
    "mi": ("mi",),
    "mk": ("mk",),
    "ml": ("ml",),
    "mr": ("mr",),
    "ms": ("ms",),
    "mt": ("mt",),
    "my": ("my",),
    "ne": ("ne",),
    "nl": ("nl",),
    "no": ("nb",),
    "pa": ("pa",),
    "pl": ("pl",),
    "pt": ("pt-br", "pt"),
    "ro": ("ro",),
    "ru": ("ru",),
    "sd": ("sd",),
    "si": ("si",),
    "sk": ("sk",),
    "sl": ("sl",),
    "sq": ("sq",),
    "sr": ("sr",),
    "sv": ("sv",),
    "sw": ("sw",),
    "ta": ("ta",),
    "te": ("te",),
    "th": ("th",),
    "tk": ("tk",),
    "tr": ("tr",),
    "tt": ("tt",),
    "uk": ("uk",),
    "ur": ("ur",),
    "uz": ("uz",),
    "vi": ("vi", "vi-vn-x-south"),
    "yue": ("yue",),
    "zh": ("cmn",),
}

# Other codes for Whisper's languages (espeak-ng's "cmn", ISO's "nb", old "iw"); names ("German") come from
# Whisper's own table and locales ("pt-BR") are cut at the dash.
_LANGUAGE_ALIASES = {"cmn": "zh", "nb": "no", "iw": "he", "jv": "jw"}

def supported_languages() -> list[str]:
    """Whisper language codes that have an espeak-ng voice, sorted."""
    return sorted(ESPEAK_VOICES)


def language_code(language: str, *, synthesizable: bool = True) -> str:
    """Normalise a language given as a Whisper code, a locale or an English name to the Whisper code.

    ``"de"``, ``"German"``, ``"de-DE"`` and ``"de_DE"`` all give ``"de"``.

    Args:
        language: the language as the user wrote it.
        synthesizable: require an espeak-ng voice (for synthesis); otherwise any Whisper language is accepted
            (for imported recordings).

    Raises:
        UnknownLanguageError: naming the language and listing the accepted codes.
    """
    known = set(ESPEAK_VOICES) if synthesizable else set(ESPEAK_VOICES) | set(_whisper_language_names())
    key = language.strip().lower().replace("_", "-")
    names = {name: code for code, name in _whisper_language_names().items()}
    for candidate in (key, key.split("-")[0]):
        code = _LANGUAGE_ALIASES.get(candidate, names.get(candidate, candidate))
        if code in known:
            return code
    what = "no espeak-ng voice for it" if synthesizable else "not a Whisper language"
    raise UnknownLanguageError(
        f"unknown or unsupported language {language!r}: {what}. Supported Whisper language codes: "
        f"{', '.join(sorted(known))}"
    )


def espeak_voices(language: str) -> tuple[str, ...]:
    """The espeak-ng voices (accents) for a Whisper language code, standard accent first."""
    return ESPEAK_VOICES[language_code(language)]


@functools.cache
def _whisper_language_names() -> dict[str, str]:
    """Whisper's code -> English name table, from transformers (imported lazily: it is slow to import)."""
    try:
        from transformers.models.whisper.tokenization_whisper import LANGUAGES
    except ImportError:  # pragma: no cover - transformers is a dependency; stay usable without it
        return {}
    return dict(LANGUAGES)
