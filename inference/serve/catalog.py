"""What a request's ``model`` names, and the ``/v1/models`` list.

=======================  ====================================================================================
``auto`` / ``whisper-1``  each window's language is detected (language ID, or the learned router given with
                          ``--router``) and its expert serves it, as ``transcribe --language auto`` does;
                          ``whisper-1`` is what OpenAI clients send by default
an expert's name          that expert serves every window; the language is the request's ``language``, else the
                          expert's own (detected among its languages when it has several)
a base name               the base model alone: ``base``, or the name it was loaded as (``whisper-base``)
a language code           that language's expert in the pack, else the base model, decoding in that language
=======================  ====================================================================================

An expert's name wins over a language code of the same spelling. A request's ``language`` (optional) must be a
Whisper code; with ``auto`` it fixes the language (its expert serves), with a language model it must agree.
"""

from __future__ import annotations

from pathlib import Path

from inference.window_routing import FROM_LANGUAGE, Route

AUTO_NAMES = ("auto", "whisper-1")
BASE_ALIAS = "base"


class UnknownModelError(LookupError):
    """A ``model`` that is neither ``auto``, the base, an expert nor a language; ``known`` lists what is."""

    def __init__(self, model: str, known: list[str]):
        self.model, self.known = model, known
        super().__init__(f"The model '{model}' does not exist. Models served here: {', '.join(known)}; or a "
                         "language code (its expert, else the base model)")


def languages(whisper) -> list[str]:
    """The Whisper codes the base decodes (``en`` alone for an English-only Whisper)."""
    return whisper.base.languages or ["en"]


def base_names(whisper) -> list[str]:
    """The names the base model answers to: ``base``, its name, and the last part of a path name."""
    name = whisper.base.name
    names = [BASE_ALIAS, name]
    if "/" in name and Path(name).name:
        names.append(Path(name).name)
    return list(dict.fromkeys(names))


def model_ids(whisper) -> list[str]:
    """Every id ``/v1/models`` lists: the base, ``auto``, then each expert."""
    return [whisper.base.name, "auto", *whisper.bank.names]


def resolve(whisper, model: str, language: str | None = None) -> Route:
    """The :class:`Route` of a request's windows.

    Raises:
        UnknownModelError: ``model`` names nothing served here.
        ValueError: ``language`` is not a Whisper code, or contradicts a language ``model``.
    """
    if language:
        whisper.check_language(language)
    bank = whisper.bank
    if model in AUTO_NAMES:
        return Route(language or "auto", FROM_LANGUAGE)
    if model in bank:
        if language:
            return Route(language, model)
        known = [code for code in bank.experts[bank.index(model)].languages if code in languages(whisper)]
        if len(known) == 1:
            return Route(known[0], model)
        return Route("auto", model, tuple(known) if known else None)  # detected among its languages
    if model in base_names(whisper):
        return Route(language or "auto", None)
    if model in languages(whisper):
        if language and language != model:
            raise ValueError(f"model '{model}' names a language, but language is '{language}'; give one of them")
        return Route(model, FROM_LANGUAGE)
    raise UnknownModelError(model, model_ids(whisper))


def models(whisper, created: int = 0) -> list[dict]:
    """``/v1/models`` entries (OpenAI's shape plus ``kind``, ``languages`` and, for experts, ``pack``)."""
    owner = "whisper-experts"
    by_language = whisper.bank.expert_for_language()
    out = [{"id": whisper.base.name, "object": "model", "created": created, "owned_by": owner, "kind": "base",
            "aliases": base_names(whisper)[:1] + base_names(whisper)[2:],
            "languages": sorted(languages(whisper))},
           {"id": "auto", "object": "model", "created": created, "owned_by": owner, "kind": "auto",
            "aliases": ["whisper-1"], "languages": sorted(by_language)}]
    for e in whisper.bank.experts:
        out.append({"id": e.name, "object": "model", "created": created, "owned_by": owner, "kind": e.kind,
                    "languages": list(e.languages), "pack": e.info.get("pack"), "ref": e.info.get("ref")})
    return out
