"""What the registry says about its experts: records, integrity problems, and the rules for names and tags.

A name (``uk-espeak``) is lowercase letters, digits, ``.``, ``_`` and ``-``, at most 64 characters, so it is
safe as a path component and never contains the ``@`` that separates versions and tags
(``uk-espeak@2``, ``uk-espeak@latest``, ``uk-espeak@prod``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

# Matched with fullmatch: a pattern ending in ``$`` would also accept a trailing newline ("uk\n").
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SHA_PREFIX_PATTERN = re.compile(r"[0-9a-f]{8,64}")  # a content hash prefix (matched with fullmatch)
RESERVED_TAGS = ("latest", "all")  # selectors with a fixed meaning; a tag cannot shadow them
OBJECT_SUFFIX = ".safetensors"  # objects are <sha256>.safetensors


class ExpertNotFoundError(LookupError):
    """No expert in the registry matches a spec."""


class InvalidNameError(ValueError):
    """An expert name, tag or spec is malformed."""


@dataclass(frozen=True)
class ExpertRecord:
    """One version of a named expert, as the index describes it (no tensors are read).

    Attributes:
        name, version: the expert's identity in this registry (``ref`` is ``name@version``).
        sha256: hex digest of the object file's bytes (its content address).
        kind, languages, base_name, base_fingerprint, tokenizer_fingerprint, metrics, lineage,
            hyperparameters, created: copied from the manifest.
        size: file size in bytes; num_parameters: total tensor elements.
        added: when the version entered this registry (ISO-8601, UTC).
        tags: the tags pointing at this version (``latest`` is implicit and not listed).
        objects_dir: the registry's ``objects/`` directory (None for a record not read from a registry).
        path: the object file, ``objects/<sha[:2]>/<sha>.safetensors`` (a property: a listing of thousands of
            records builds no paths it does not use).
    """

    name: str
    version: int
    sha256: str
    kind: str
    languages: tuple[str, ...]
    base_name: str | None
    base_fingerprint: str
    tokenizer_fingerprint: str | None
    metrics: dict = field(hash=False)
    lineage: dict = field(hash=False)
    hyperparameters: dict = field(hash=False)
    size: int
    num_parameters: int
    created: str | None
    added: str
    tags: tuple[str, ...] = ()
    objects_dir: Path | None = field(default=None, compare=False, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def path(self) -> Path | None:
        if self.objects_dir is None:
            return None
        return self.objects_dir / self.sha256[:2] / f"{self.sha256}{OBJECT_SUFFIX}"


@dataclass(frozen=True)
class Problem:
    """Something :meth:`Registry.verify` found wrong.

    Attributes:
        kind: ``missing`` (object file gone), ``size`` / ``hash`` (content changed: corrupt or truncated),
            ``manifest`` (hash fine but not a readable expert), ``orphan`` (object or temporary file no index
            row refers to; harmless, ``gc`` removes it), ``index`` (SQLite integrity check failed), ``base``
            (an imported base the experts name no longer matches its recorded fingerprint).
        path: the file concerned.
        refs: the expert versions that use it.
        detail: expected vs found, in words.
    """

    kind: str
    path: Path
    refs: tuple[str, ...] = ()
    detail: str = ""

    @property
    def serious(self) -> bool:
        """Whether the problem affects an expert (orphans are harmless leftovers)."""
        return self.kind != "orphan"

    def __str__(self) -> str:
        who = f" ({', '.join(self.refs)})" if self.refs else ""
        return f"{self.kind}: {self.path}{who}: {self.detail}"


def stored_test_wer(metrics: dict | None, language: str) -> float | None:
    """The test WER a manifest's ``metrics`` records for ``language`` (``{"uk": {"test": {"wer": 0.231}}}``), or
    None when it records none."""
    per_split = (metrics or {}).get(language)
    test = per_split.get("test") if isinstance(per_split, dict) else None
    wer = test.get("wer") if isinstance(test, dict) else None
    return float(wer) if isinstance(wer, (int, float)) else None


def validate_name(name: str, what: str = "expert name") -> str:
    """Return ``name`` if it is a valid expert name (or tag), else raise :class:`InvalidNameError`.

    Valid: 1 to 64 characters of lowercase letters, digits, ``.``, ``_``, ``-``, starting with a letter or
    digit; so no ``/``, ``@``, ``..`` prefix or empty name. Names are never used as paths; the rule keeps specs
    unambiguous and names portable.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (no '/', '@' or spaces), e.g. 'uk-espeak'"
        )
    return name


def validate_tag(tag: str) -> str:
    """A tag follows the name rule, and cannot be a number or a reserved selector (``latest``, ``all``)."""
    validate_name(tag, "tag")
    if tag in RESERVED_TAGS or tag.isdigit():  # "7" would read as version 7, "latest" as the newest
        raise InvalidNameError(f"invalid tag {tag!r}: numbers and {', '.join(RESERVED_TAGS)} are reserved selectors")
    return tag


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
