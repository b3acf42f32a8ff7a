"""The expert file: one ``.safetensors`` file per expert, its manifest in the header.

Tensor names are the Whisper module paths the tensors attach to (for a LoRA expert,
``model.decoder.layers.0.self_attn.q_proj.lora_A`` of shape (rank, in_features) and ``...lora_B`` of shape
(out_features, rank)). The safetensors header metadata holds one key, ``whisper_experts``, whose value is the
JSON manifest:

=====================  =================================================================================
``format_version``     int, this module's ``FORMAT_VERSION``
``kind``               ``lora`` | ``clsr`` | ``task_vector`` | ``mask`` | ``sparse``
``languages``          Whisper language codes the expert serves
``base``               ``{"name", "fingerprint", "tokenizer_fingerprint"}`` of the base it was trained on
``hyperparameters``    kind-specific (LoRA: ``rank``, ``alpha``, ``dropout``, ``target_modules``, ...)
``data``               training data summary (``corpus``, ``utterances``, ``hours``, ...)
``metrics``            per language: ``{"validation": {"wer", "cer"}, "test": {...}}``
``lineage``            ``{"parents": [...], "method": ..., ...}`` (empty for a freshly trained expert)
``created``            ISO-8601 time
``package_version``    the ``whisper-experts`` version that wrote it
=====================  =================================================================================

Files are never unpickled: safetensors only. Writes are atomic (temporary file, fsync, rename).
"""

from __future__ import annotations

import functools
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save

from registry.atomic import atomic_write_bytes

FORMAT_VERSION = 1
MANIFEST_KEY = "whisper_experts"
KINDS = ("lora", "clsr", "task_vector", "mask", "sparse")
REQUIRED = ("format_version", "kind", "languages", "base")
MAX_HEADER = 100_000_000  # safetensors' own bound on a header's size


class ExpertFormatError(ValueError):
    """An expert file is missing, truncated, corrupt, or its manifest is invalid."""


class ExpertMismatchError(ValueError):
    """An expert was trained on another base (weights or tokenizer) than the one it is being loaded onto."""


@functools.lru_cache(maxsize=None)  # reading package metadata costs ~10 ms; one process has one version
def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("whisper-experts")
    except Exception:  # running from a source tree that was never installed
        return "0+unknown"


@dataclass
class Expert:
    """An expert in memory: tensors keyed by Whisper module path, and its manifest.

    Attributes:
        tensors: name -> tensor (CPU, contiguous).
        manifest: see the module docstring; :func:`new_manifest` builds a valid one.
    """

    tensors: dict[str, torch.Tensor]
    manifest: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def languages(self) -> list[str]:
        return list(self.manifest.get("languages", []))

    @property
    def num_parameters(self) -> int:
        """Stored numbers; for a ``sparse`` expert its delta values (its packed mask bytes are not parameters)."""
        if self.manifest.get("kind") == "sparse":
            return sum(t.numel() for k, t in self.tensors.items() if k.endswith(".values"))
        return sum(t.numel() for t in self.tensors.values())


def new_manifest(kind: str, languages, base, hyperparameters: dict | None = None, **extra) -> dict:
    """A manifest with every required field.

    Args:
        kind: one of ``KINDS``.
        languages: Whisper codes.
        base: a ``registry.bases.Base`` or a dict with ``name``, ``fingerprint``, ``tokenizer_fingerprint``.
        extra: ``data``, ``metrics``, ``lineage`` or other fields to set.
    """
    if not isinstance(base, dict):
        base = {"name": base.name, "fingerprint": base.fingerprint, "tokenizer_fingerprint": base.tokenizer_fingerprint}
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "languages": list(languages),
        "base": dict(base),
        "hyperparameters": dict(hyperparameters or {}),
        "data": {},
        "metrics": {},
        "lineage": {"parents": []},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "package_version": package_version(),
    }
    manifest.update(extra)
    validate_manifest(manifest, "<new>")
    return manifest


def is_int(value) -> bool:
    """A JSON integer (``True`` is an int to Python, but not a version number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def validate_manifest(manifest: dict, where: str) -> None:
    """Raise :class:`ExpertFormatError` naming ``where`` if the manifest lacks a field or has a bad value
    (of the wrong JSON type too: a hand-edited ``"format_version": "1"`` is an error, not a traceback)."""
    if not isinstance(manifest, dict):
        raise ExpertFormatError(f"{where}: manifest is not a JSON object")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ExpertFormatError(f"{where}: manifest lacks {', '.join(missing)}; not a whisper-experts expert file")
    version = manifest["format_version"]
    if not is_int(version) or version < 1:
        raise ExpertFormatError(f"{where}: manifest format_version must be a positive integer, not {version!r}; "
                                "the file is corrupt or was edited by hand")
    if version > FORMAT_VERSION:
        raise ExpertFormatError(f"{where}: expert format version {version} is newer than this "
                                f"package understands ({FORMAT_VERSION}); upgrade whisper-experts")
    if not isinstance(manifest["kind"], str) or manifest["kind"] not in KINDS:
        raise ExpertFormatError(f"{where}: unknown expert kind {manifest['kind']!r} (known: {', '.join(KINDS)})")
    base = manifest["base"]
    if not isinstance(base, dict) or not base.get("fingerprint") or not isinstance(base["fingerprint"], str):
        raise ExpertFormatError(f"{where}: manifest base has no weight fingerprint")
    for key in ("name", "tokenizer_fingerprint"):
        if not isinstance(base.get(key), (str, type(None))):
            raise ExpertFormatError(f"{where}: manifest base {key} must be a string, not {base[key]!r}")
    languages = manifest["languages"]
    if not isinstance(languages, list) or not all(isinstance(lang, str) for lang in languages):
        raise ExpertFormatError(f"{where}: manifest languages must be a list of Whisper codes")
    for key in ("hyperparameters", "metrics", "lineage"):
        if not isinstance(manifest.get(key), (dict, type(None))):
            raise ExpertFormatError(f"{where}: manifest {key} must be a JSON object, not {manifest[key]!r:.60}")
    if not isinstance(manifest.get("created"), (str, type(None))):
        raise ExpertFormatError(f"{where}: manifest created must be an ISO-8601 string")


def expert_bytes(expert: Expert) -> bytes:
    """The file content of ``expert`` (deterministic: same tensors and manifest give the same bytes)."""
    validate_manifest(expert.manifest, "expert")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(expert.tensors.items())}
    return save(tensors, metadata={MANIFEST_KEY: json.dumps(expert.manifest, sort_keys=True, ensure_ascii=False)})


def save_expert(expert: Expert, path: Path | str) -> Path:
    """Write an expert file atomically; returns its path."""
    return atomic_write_bytes(path, expert_bytes(expert))


def read_manifest(path: Path | str) -> dict:
    """The manifest of an expert file, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise ExpertFormatError(f"expert file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ExpertFormatError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt") from e
    if MANIFEST_KEY not in meta:
        raise ExpertFormatError(f"{path} has no '{MANIFEST_KEY}' manifest in its header; not an expert file "
                                "(a PEFT adapter? use `whisper-experts registry import DIR`)")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except ValueError as e:
        raise ExpertFormatError(f"{path}: manifest is not valid JSON ({e})") from e
    validate_manifest(manifest, str(path))
    return manifest


def _read_header(read, size: int, where: str) -> tuple[dict, int]:
    """``(header, header length)`` of a safetensors file of ``size`` bytes, reading with ``read(offset, n)``.

    The 8-byte length is checked against the file's size and a sane bound before the header is read, so a
    huge or foreign file is refused after reading 8 bytes, never loaded.
    """
    if size < 8:
        raise ExpertFormatError(f"{where}: {size} bytes is too short for a safetensors file; truncated")
    header_len = int.from_bytes(read(0, 8), "little")
    if header_len > MAX_HEADER:
        raise ExpertFormatError(f"{where}: its first 8 bytes give a header of {header_len} bytes (more than "
                                f"{MAX_HEADER}); not a safetensors expert file, or corrupt")
    if header_len > size - 8:
        raise ExpertFormatError(f"{where}: header claims {header_len} bytes but the file has {size - 8}; truncated")
    try:
        header = json.loads(read(8, header_len))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
    except (ValueError, TypeError) as e:
        raise ExpertFormatError(f"{where}: unreadable safetensors header ({e}); corrupt") from e
    return header, header_len


def _manifest_in(header: dict, where: str) -> dict:
    try:
        manifest = json.loads((header.get("__metadata__") or {})[MANIFEST_KEY])
    except KeyError:
        raise ExpertFormatError(f"{where} has no '{MANIFEST_KEY}' manifest in its header; not an expert file "
                                "(a PEFT adapter? use `whisper-experts registry import DIR`)") from None
    except (ValueError, AttributeError, TypeError) as e:
        raise ExpertFormatError(f"{where}: unreadable safetensors header ({e}); corrupt") from e
    validate_manifest(manifest, where)
    return manifest


def manifest_from_bytes(data: bytes, where: str) -> dict:
    """The manifest in a safetensors file's header, parsed from its bytes (JSON only, never pickle).

    Args:
        data: the whole file content.
        where: file or URL named in errors.
    """
    header, _ = _read_header(lambda offset, n: data[offset:offset + n], len(data), where)
    return _manifest_in(header, where)


def manifest_from_file(f, where: str) -> dict:
    """The manifest in the header of an open binary file (read from its start; tensors are not read)."""
    size = os.fstat(f.fileno()).st_size

    def read(offset: int, n: int) -> bytes:
        f.seek(offset)
        return f.read(n)

    return _manifest_in(_read_header(read, size, where)[0], where)


def read_expert_file(path: Path | str) -> bytes:
    """The bytes of an expert file, read only after its header was checked: a safetensors header with a valid
    manifest that describes exactly the file's size. A foreign, truncated or padded file (even one of
    gigabytes) is refused after reading its header.

    Raises:
        ExpertFormatError: missing, not a regular file, not an expert, truncated, or too large for memory.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ExpertFormatError(f"{path} is not a regular file; give an expert .safetensors file")

            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            header, header_len = _read_header(read, info.st_size, str(path))
            _manifest_in(header, str(path))
            try:
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise ExpertFormatError(f"{path}: unreadable safetensors header ({e!r}); corrupt") from e
            described = 8 + header_len + max(ends, default=0)
            if described != info.st_size:
                raise ExpertFormatError(f"{path} has {info.st_size} bytes but its header describes {described}; "
                                        "it is truncated, or other data follows the expert")
            f.seek(0)
            try:
                return f.read()
            except MemoryError:
                raise ExpertFormatError(f"{path} ({info.st_size} bytes) does not fit in memory; free memory, or "
                                        "store a smaller expert") from None
    except FileNotFoundError:
        raise ExpertFormatError(f"expert file {path} does not exist") from None
    except IsADirectoryError:
        raise ExpertFormatError(f"{path} is a directory; give an expert .safetensors file (a PEFT adapter "
                                "directory? use `whisper-experts registry import DIR`)") from None


def expert_from_bytes(data: bytes, where: str) -> Expert:
    """Parse a whole expert file from bytes; raises :class:`ExpertFormatError` naming ``where``."""
    manifest = manifest_from_bytes(data, where)
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own types for bad offsets / truncated data
        raise ExpertFormatError(f"{where}: tensor data is truncated or corrupt ({e})") from e
    return Expert(tensors, manifest)


def load_expert(path: Path | str) -> Expert:
    """Read an expert file (tensors on CPU) and validate its manifest."""
    manifest = read_manifest(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ExpertFormatError(f"{path}: tensor data is truncated or corrupt ({e})") from e
    return Expert(tensors, manifest)


def check_compatible(manifest: dict, base, *, force: bool = False, what: str = "expert") -> None:
    """Refuse an expert trained on another base: compares weight and tokenizer fingerprints.

    Args:
        manifest: the expert's manifest.
        base: a ``registry.bases.Base`` (anything with ``name``, ``fingerprint``, ``tokenizer_fingerprint``).
        force: skip the weight check (the tokenizer must still match: token ids would be meaningless).
    """
    want = manifest["base"]
    if want.get("tokenizer_fingerprint") and want["tokenizer_fingerprint"] != base.tokenizer_fingerprint:
        raise ExpertMismatchError(
            f"{what} was trained with the tokenizer of {want.get('name')} ({want['tokenizer_fingerprint']}), but "
            f"{base.name} has tokenizer {base.tokenizer_fingerprint}; token ids differ, so it cannot be used here"
        )
    if want["fingerprint"] != base.fingerprint and not force:
        raise ExpertMismatchError(
            f"{what} was trained on base {want.get('name')} (fingerprint {want['fingerprint']}), but the loaded "
            f"base is {base.name} (fingerprint {base.fingerprint}); load it on its own base, or pass --force "
            "to apply it anyway"
        )
