"""Expert packs: N experts for one base in one ``.safetensors`` file, loaded into one Whisper in one call.

A pack's tensors are the experts' tensors under a per-expert namespace, ``<expert name>/<tensor name>``
(``uk-espeak/model.decoder.layers.0.fc1.lora_A``). The header metadata holds one key, ``whisper_experts_pack``,
whose value is the JSON pack manifest:

==================  ==========================================================================================
``format_version``  int, this module's ``PACK_FORMAT_VERSION``
``base``            ``{"name", "fingerprint", "tokenizer_fingerprint"}`` shared by every expert in the pack
``experts``         in load order (= expert ids of the loaded bank): ``{"name", "ref", "sha256", "kind",
                    "languages", "digest", "manifest"}``; ``ref``/``sha256`` name the registry version it came
                    from (None for an expert that was never stored), ``digest`` is the sha256 of its tensors
                    (names, dtypes, shapes, bytes) and is checked on load, ``manifest`` is its expert manifest
``created``         ISO-8601 time; ``package_version``: the writer
==================  ==========================================================================================

:func:`read_pack` reads the file memory-mapped (``safe_open``) and gives back its experts (any kind), each
checked against its stored digest. Attaching a pack to a live Whisper is :func:`inference.packs.load_pack`.
Writes are atomic; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save

from registry.atomic import write_replacing_stale
from registry.expert_file import MANIFEST_KEY, Expert, ExpertFormatError, is_int, package_version, validate_manifest
from registry.records import ExpertNotFoundError, ExpertRecord, stored_test_wer, validate_name
from registry.store import Registry

PACK_KEY = "whisper_experts_pack"
PACK_FORMAT_VERSION = 1
SEPARATOR = "/"  # between the expert's name and its tensor's name; expert names never contain it


class PackFormatError(ExpertFormatError):
    """A pack file is missing, truncated, corrupt, or its manifest is invalid."""


@dataclass(frozen=True)
class PackEntry:
    """One expert of a pack, as the header describes it (no tensor data read).

    Attributes:
        name: the expert's name inside the pack (its tensors' namespace).
        ref, sha256: the registry version it was packed from (None when packed from memory).
        kind, languages, manifest: from the expert's manifest.
        digest: sha256 of its tensors (see :func:`tensor_digest`).
        tensors: how many tensors it has; parameters: their total elements; rank: the largest LoRA rank (0 if
            not LoRA).
    """

    name: str
    ref: str | None
    sha256: str | None
    kind: str
    languages: tuple[str, ...]
    digest: str
    manifest: dict
    tensors: int = 0
    parameters: int = 0
    rank: int = 0


@dataclass(frozen=True)
class PackInfo:
    """A pack's table of contents (:func:`inspect_pack`)."""

    path: Path
    base: dict
    experts: tuple[PackEntry, ...]
    size: int
    created: str | None = None
    format_version: int = PACK_FORMAT_VERSION

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def entry(self, name: str) -> PackEntry:
        for e in self.experts:
            if e.name == name:
                return e
        raise ExpertNotFoundError(f"pack {self.path} has no expert {name!r} (it holds {', '.join(self.names)})")


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over tensors sorted by name: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- writing
PROD_TAG = "prod"


def choose_expert(found: Iterable[ExpertRecord], language: str, latest: bool = False) -> tuple[ExpertRecord, str]:
    """The expert a pack should take for ``language`` among ``found``, and why.

    Order: the version tagged ``prod``; else the best stored test WER for the language; else the latest.
    ``latest=True`` takes the most recently added version whatever its tags or scores.
    """
    found = list(found)
    newest = max(found, key=lambda r: (r.added, r.created or "", r.version))
    if latest:
        return newest, "the latest (--latest)"
    prod = [r for r in found if PROD_TAG in r.tags]
    if prod:
        pick = max(prod, key=lambda r: (r.added, r.version))
        return pick, f"tagged {PROD_TAG!r}"
    by_recency = sorted(found, key=lambda r: (r.added, r.created or "", r.version), reverse=True)
    scored = [(w, r) for r in by_recency if (w := stored_test_wer(r.metrics, language)) is not None]
    if scored:
        wer, pick = min(scored, key=lambda x: x[0])  # min keeps the first: the newest among equals
        return pick, f"best stored {language} test WER ({100 * wer:.1f}%) of {len(scored)} scored"
    return newest, "the latest (no version is tagged 'prod' or has a stored test WER)"


def select_experts(registry: Registry, base: str, languages: Iterable[str],
                   kind: str | None = "lora", latest: bool = False,
                   reasons: dict[str, str] | None = None) -> list[ExpertRecord]:
    """For each language, the expert serving it on ``base`` that :func:`choose_expert` picks (the one tagged
    ``prod``, else the best stored test WER, else the latest); an expert serving several is listed once.

    Args:
        base: base name as recorded, or a prefix of its weight fingerprint.
        kind: only experts of this kind (None: any).
        latest: take the latest version instead.
        reasons: when given, filled with ``language -> "<ref>: why it was taken"``.

    Raises:
        ExpertNotFoundError: a language has no such expert (names the registry and the command that lists).
    """
    chosen: list[ExpertRecord] = []
    for language in languages:
        found = registry.find(language=language, base=base, kind=kind, latest_only=False)
        if not found:
            what = f"{kind} expert" if kind else "expert"
            raise ExpertNotFoundError(
                f"no {what} for language {language!r} on base {base!r} in the registry at {registry.root}; "
                f"see `whisper-experts registry list --language {language}`")
        pick, why = choose_expert(found, language, latest)
        if reasons is not None:
            reasons[language] = f"{pick.ref}: {why}"
        if pick.ref not in {r.ref for r in chosen}:
            chosen.append(pick)
    return chosen


def pack_bytes(experts: Mapping[str, Expert], provenance: Mapping[str, dict] | None = None) -> bytes:
    """The file content of a pack of ``experts`` (name -> expert, in load order).

    Args:
        provenance: name -> ``{"ref", "sha256"}`` of the registry version each came from.

    Raises:
        ExpertFormatError: no experts, an invalid name, or experts made for different bases.
    """
    if not experts:
        raise ExpertFormatError("a pack needs at least one expert")
    bases = {}
    for name, expert in experts.items():
        validate_name(name, "expert name in a pack")
        validate_manifest(expert.manifest, f"expert {name}")
        b = expert.manifest["base"]
        bases.setdefault((b["fingerprint"], b.get("tokenizer_fingerprint")), []).append(name)
    if len(bases) > 1:
        described = "; ".join(f"{', '.join(names)} on base fingerprint {fp} (tokenizer {tok})"
                              for (fp, tok), names in bases.items())
        raise ExpertFormatError(f"a pack holds experts of one base, but these differ: {described}. Pack the "
                                "experts of each base separately")
    first = next(iter(experts.values())).manifest["base"]
    entries, tensors = [], {}
    for name, expert in experts.items():
        for key, t in expert.tensors.items():
            tensors[f"{name}{SEPARATOR}{key}"] = t.detach().to("cpu").contiguous()
        source = (provenance or {}).get(name, {})
        entries.append({"name": name, "ref": source.get("ref"), "sha256": source.get("sha256"), "kind": expert.kind,
                        "languages": expert.languages, "digest": tensor_digest(expert.tensors),
                        "manifest": expert.manifest})
    manifest = {"format_version": PACK_FORMAT_VERSION, "base": dict(first), "experts": entries,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "package_version": package_version()}
    return save(dict(sorted(tensors.items())),
                metadata={PACK_KEY: json.dumps(manifest, sort_keys=True, ensure_ascii=False)})


def create_pack(out: Path | str, experts=(), *, registry: Registry | None = None, base: str | None = None,
                languages: Iterable[str] = (), kind: str | None = "lora", latest: bool = False,
                reasons: dict[str, str] | None = None,
                check: Callable[[str, Expert], None] | None = None) -> PackInfo:
    """Write a pack from registry experts and/or experts in memory; returns its table of contents.

    Args:
        out: the pack file to write (atomically).
        experts: registry specs (``uk-espeak``, ``pt-espeak@2``), :class:`ExpertRecord` s, or a mapping
            name -> :class:`Expert` (e.g. just trained); packed under their names, in this order.
        registry: where specs and language queries resolve (default: the registry under the project home).
        base: with ``languages``: the base to query; with ``experts``: every expert must be for this base
            (name or fingerprint prefix).
        languages: for each, the expert serving it on ``base`` that :func:`select_experts` picks (tagged
            ``prod``, else best stored test WER, else latest).
        kind: the kind the language query selects (default ``lora``; ``sparse``, ``clsr``; None: any kind).
        latest: with ``languages``: the latest version instead.
        reasons: when given, filled with language -> why its expert was taken.
        check: called with each expert's name and expert before anything is written; raises to refuse one (the
            command line refuses kinds an expert bank cannot route, as the table of kinds says).
    """
    registry = registry or Registry()
    languages = list(languages)
    if languages and not base:
        raise ValueError("packing by --languages needs --base (the base the experts were trained on)")
    chosen: dict[str, Expert] = {}
    provenance: dict[str, dict] = {}
    if isinstance(experts, (str, ExpertRecord)):
        experts = [experts]
    if isinstance(experts, Mapping):
        chosen.update(experts)
        experts = ()
    records = [registry.resolve(e) if isinstance(e, str) else e for e in experts]
    if languages:
        named = {r.ref for r in records}
        records += [r for r in select_experts(registry, base, languages, kind, latest, reasons) if r.ref not in named]
    for rec in records:
        if rec.name in chosen:
            raise ValueError(f"two experts named {rec.name!r} in one pack ({rec.ref} and another); pack one version")
        chosen[rec.name] = registry.get(rec.ref)
        provenance[rec.name] = {"ref": rec.ref, "sha256": rec.sha256}
    if not chosen:
        raise ValueError("nothing to pack: name experts (--experts) or languages with a base (--languages, --base)")
    if check is not None:
        for name, expert in chosen.items():
            check(name, expert)
    if base:
        for name, expert in chosen.items():
            b = expert.manifest["base"]
            if b.get("name") != base and not b["fingerprint"].startswith(base):
                raise ExpertFormatError(f"expert {name} was trained on base {b.get('name')} (fingerprint "
                                        f"{b['fingerprint']}), not {base}; leave it out or pack it for its own base")
    data = pack_bytes(chosen, provenance)
    try:
        # Temporaries that killed `pack create` runs left beside --out are deleted first (an hour old, writer gone).
        write_replacing_stale(out, data)
    except OSError as e:
        raise type(e)(f"cannot write the pack {out} ({e.strerror or e}): choose another --out, or free space on / "
                      f"fix the permissions of {Path(out).parent}") from e
    return inspect_pack(out)


# ------------------------------------------------------------------------------------------------- reading
def _open_error(path: Path, e: Exception) -> PackFormatError:
    return PackFormatError(f"{path} is not a readable safetensors file ({e}); the pack is truncated or corrupt, "
                           "create it again with `whisper-experts pack create`")


def _pack_manifest(path: Path, meta: dict) -> dict:
    if PACK_KEY not in meta:
        if MANIFEST_KEY in meta:
            raise PackFormatError(f"{path} is a single expert file, not a pack; load it with registry.expert_file."
                                  "load_expert, or pack it with `whisper-experts pack create`")
        raise PackFormatError(f"{path} has no '{PACK_KEY}' manifest in its header; not an expert pack")
    try:
        manifest = json.loads(meta[PACK_KEY])
    except ValueError as e:
        raise PackFormatError(f"{path}: pack manifest is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(manifest, dict) or not {"format_version", "base", "experts"} <= set(manifest):
        raise PackFormatError(f"{path}: pack manifest lacks format_version, base or experts; corrupt")
    version = manifest["format_version"]
    if not is_int(version) or version < 1:
        raise PackFormatError(f"{path}: pack format_version must be a positive integer, not {version!r}; the pack "
                              "is corrupt or was edited: create it again with `whisper-experts pack create`")
    if not isinstance(manifest["base"], dict) or not isinstance(manifest["experts"], list):
        raise PackFormatError(f"{path}: pack manifest base must be an object and experts a list; the pack is "
                              "corrupt or was edited: create it again with `whisper-experts pack create`")
    if manifest["format_version"] > PACK_FORMAT_VERSION:
        raise PackFormatError(f"{path}: pack format version {manifest['format_version']} is newer than this package "
                              f"understands ({PACK_FORMAT_VERSION}); upgrade whisper-experts")
    return manifest


def inspect_pack(path: Path | str) -> PackInfo:
    """A pack's table of contents from its header alone (no tensor data is read).

    Raises:
        PackFormatError: missing, truncated or corrupt file; a header whose tensors and manifest disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise PackFormatError(f"pack file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            manifest = _pack_manifest(path, f.metadata() or {})
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except PackFormatError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise _open_error(path, e) from e
    entries, by_expert = [], {}
    for key, shape in shapes.items():
        name, sep, tensor = key.partition(SEPARATOR)
        if not sep or not tensor:
            raise PackFormatError(f"{path}: tensor {key!r} is not namespaced <expert>{SEPARATOR}<tensor>; corrupt")
        by_expert.setdefault(name, {})[tensor] = shape
    listed = []
    for item in manifest["experts"]:
        try:
            name = item["name"]
            if name in listed:  # two entries would share one tensor namespace: which manifest is whose?
                raise PackFormatError(f"{path}: the pack lists expert {name!r} twice; it is corrupt or was edited: "
                                      "create it again with `whisper-experts pack create`")
            validate_manifest(item["manifest"], f"{path}: expert {name}")
            own = by_expert.get(name)
            if not own:
                raise PackFormatError(f"{path}: expert {name} is listed but has no tensors; the pack is corrupt")
            ranks = [s[0] for k, s in own.items() if k.endswith(".lora_A")]
            entries.append(PackEntry(name, item.get("ref"), item.get("sha256"), item["kind"],
                                     tuple(item["languages"]), item["digest"], item["manifest"], len(own),
                                     sum(_numel(s) for s in own.values()), max(ranks, default=0)))
            listed.append(name)
        except (KeyError, TypeError) as e:
            raise PackFormatError(f"{path}: pack manifest entry {item!r:.80} is incomplete ({e}); corrupt") from e
    stray = sorted(set(by_expert) - set(listed))
    if stray:
        raise PackFormatError(f"{path}: tensors of experts the manifest does not list ({', '.join(stray)}); corrupt")
    return PackInfo(path, dict(manifest["base"]), tuple(entries), path.stat().st_size, manifest.get("created"),
                    manifest["format_version"])


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_tensors(path: Path, info: PackInfo, names: list[str], verify: bool) -> dict[str, dict[str, torch.Tensor]]:
    """name -> tensors for ``names``, read memory-mapped; digests checked when ``verify``."""
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name, _, tensor = key.partition(SEPARATOR)
                if name in out:
                    out[name][tensor] = f.get_tensor(key)
    except Exception as e:
        raise _open_error(path, e) from e
    if verify:
        # sha256 releases the GIL on large buffers: the experts' digests are computed side by side
        workers = max(1, min(len(names), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            digests = dict(zip(names, pool.map(lambda n: tensor_digest(out[n]), names)))
        for name in names:
            want, found = info.entry(name).digest, digests[name]
            if found != want:
                raise PackFormatError(f"{path}: tensors of expert {name} are corrupt (digest {found[:16]}, expected "
                                      f"{want[:16]}); create the pack again with `whisper-experts pack create`")
    return out


def select_names(info: PackInfo, names: Iterable[str] | None) -> list[str]:
    if names is None:
        return info.names
    names = list(names)
    for name in names:
        info.entry(name)  # raises for an unknown name
    return names


def read_pack(path: Path | str, names: Iterable[str] | None = None, verify: bool = True) -> dict[str, Expert]:
    """The experts of a pack (all, or ``names``) as :class:`Expert` objects, tensors on CPU."""
    info = inspect_pack(path)
    names = select_names(info, names)
    tensors = read_tensors(Path(path), info, names, verify)
    return {name: Expert(tensors[name], info.entry(name).manifest) for name in names}


def base_of_packs(base: str | None, packs) -> str:
    """The base to load for ``packs``: ``base`` when given, else the base the first pack was made for, else
    ``whisper-base``."""
    if base:
        return base
    if packs:
        name = inspect_pack(packs[0]).base.get("name")
        if name:
            return name
    return "whisper-base"
