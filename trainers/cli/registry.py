"""``whisper-experts registry``: keep experts with names, versions and tags; mirror them; export to PEFT."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from trainers.cli.common import print_table, split_list

if TYPE_CHECKING:  # the registry modules load torch; `--help` must not
    from registry.records import ExpertRecord
    from registry.store import Registry

DESCRIPTION = """\
The registry keeps experts as content-addressed .safetensors files with a SQLite index of names, versions and
tags. An expert is named by a spec: NAME (latest version), NAME@3, NAME@latest, NAME@TAG, or a sha256 prefix.
The registry lives in <home>/registry (set --home or WHISPER_EXPERTS_HOME), or wherever --registry points.
A journal beside the index records every name, version and tag: `registry doctor` rebuilds a lost or damaged
index from it and the objects. A registry this user may only read is opened read-only (reads work).

examples:
  whisper-experts registry add runs/uk/expert.safetensors --name uk-espeak --tag best
  whisper-experts registry list --language uk
  whisper-experts registry show uk-espeak@latest
  whisper-experts registry export uk-espeak --format peft --out exported/uk-espeak
  whisper-experts registry push file:///srv/experts uk-espeak
  whisper-experts registry --registry /data/team-registry verify
  whisper-experts registry doctor
"""

FORMATTER = argparse.RawDescriptionHelpFormatter


def _is_remote(location: str | None) -> bool:
    return bool(location) and "://" in location and not location.startswith("file://")


def _local_root(location: str | None) -> Path | None:
    if not location:
        return None
    if location.startswith("file://"):
        return Path(unquote(urlparse(location).path))
    return Path(location)


def open_registry(args) -> Registry:
    """The registry ``--registry`` names (a directory or file:// URL), else the default under the home."""
    from registry.store import Registry

    location = getattr(args, "registry", None)
    if _is_remote(location):
        raise ValueError(f"{location} is a remote mirror; this action needs a local registry. Copy experts from "
                         f"it with `whisper-experts registry pull {location}`")
    return Registry(_local_root(location))


def _fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _test_wer(metrics: dict) -> str:
    """``"uk 23.1"`` from ``{"uk": {"test": {"wer": 0.231}}}`` (WER as a percentage), blank without one."""
    from registry.records import stored_test_wer

    wers = {lang: stored_test_wer(metrics, lang) for lang in sorted(metrics or {})}
    return ", ".join(f"{lang} {100 * wer:.1f}" for lang, wer in wers.items() if wer is not None)


def _row(r: dict) -> dict:
    tags = r.get("tags") or ()
    return {
        "ref": f"{r['name']}@{r['version']}", "tags": ",".join(tags), "kind": r["kind"],
        "languages": ",".join(r["languages"]), "base": r.get("base_name") or (r.get("base_fingerprint") or "")[:12],
        "params": _fmt_params(r["num_parameters"]), "size": _fmt_size(r["size"]),
        "test wer %": _test_wer(r.get("metrics")), "created": (r.get("created") or "")[:16].replace("T", " "),
    }


def _record_dict(rec: ExpertRecord) -> dict:
    return vars(rec)  # the record's own field dict, not a copy: a listing has thousands (read it, don't change it)


# ------------------------------------------------------------------------------------------------- actions
def _add(args) -> int:
    rec = open_registry(args).add(args.file, args.name, tags=args.tag or ())
    print(f"{rec.ref}  sha256 {rec.sha256[:12]}  {_fmt_size(rec.size)}"
          + (f"  tags: {', '.join(rec.tags)}" if rec.tags else ""))
    return 0


def _list(args) -> int:
    if _is_remote(args.registry):
        from registry.remote import list_remote

        rows = list_remote(args.registry)
        rows = [r for r in rows if (not args.language or args.language in r["languages"])
                and (not args.kind or r["kind"] == args.kind)
                and (not args.base or r.get("base_name") == args.base
                     or (r.get("base_fingerprint") or "").startswith(args.base))]
        if not args.all_versions:
            newest = {r["name"]: r for r in rows}
            rows = [r for r in rows if newest[r["name"]] is r]
    else:
        records = open_registry(args).find(language=args.language, base=args.base, kind=args.kind,
                                           latest_only=not args.all_versions)
        rows = [_record_dict(r) for r in records]
    print_table([_row(r) for r in rows],
                ["ref", "tags", "kind", "languages", "base", "params", "size", "test wer %", "created"])
    return 0


def _show(args) -> int:
    reg = open_registry(args)
    rec = reg.resolve(args.spec)
    manifest = reg.read_manifest(rec)  # the file is hashed (streamed) first: a corrupt object is refused
    fields = [("ref", rec.ref), ("tags", ", ".join(rec.tags) or "-"), ("sha256", rec.sha256), ("path", rec.path),
              ("size", f"{_fmt_size(rec.size)} ({rec.size} bytes)"), ("parameters", f"{rec.num_parameters:,}"),
              ("added", rec.added)]
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k:<{width}}  {v}")
    print("manifest:")
    print(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False))
    return 0


def _remove(args) -> int:
    removed = open_registry(args).remove(args.spec, all_versions=args.all_versions)
    print("removed " + ", ".join(r.ref for r in removed))
    return 0


def _verify(args) -> int:
    reg = open_registry(args)
    problems = reg.verify(bases=not args.no_bases)
    serious = [p for p in problems if p.serious]
    for p in problems:
        print(p)
    records = reg.records()
    if serious:
        fixes = ["re-add or pull the affected experts, or remove them"]
        if any(p.kind == "base" for p in serious):
            fixes.append("re-import the damaged base(s)")
        if any(p.kind == "index" for p in serious):
            fixes.append("rebuild the index with `whisper-experts registry doctor --rebuild`")
        print(f"{len(serious)} problem(s) in {reg.root}: {'; '.join(fixes)}")
        return 1
    print(f"ok: {len(records)} expert version(s), {len({r.sha256 for r in records})} object(s) in {reg.root}"
          + (f"; {len(problems)} orphan file(s), `whisper-experts registry gc` removes them" if problems else ""))
    return 0


def _gc(args) -> int:
    from registry.integrity import gc

    reg = open_registry(args)
    report = gc(reg, temp_age=-1.0 if args.now else args.temp_age)
    print(f"removed {len(report.removed)} orphan or temporary file(s) from {reg.root}")
    if report.kept_temporary:
        print(f"kept {len(report.kept_temporary)} temporary file(s) younger than {args.temp_age:g} s whose writer may "
              "still be running (a killed writer's are deleted at once when it ran on this host); "
              "`whisper-experts registry gc --now` deletes them now: run it only when no add or pull is running")
    return 0


def _doctor(args) -> int:
    reg = open_registry(args)
    report = reg.doctor(rebuild=args.rebuild, check=args.check)
    print(f"index {reg.index_path}: {report.index_state}")
    for line in report.differences:
        print(f"  differs from the journal: {line}")
    if report.bad_lines:
        print(f"  journal lines that could not be read: {', '.join(map(str, report.bad_lines[:20]))}"
              + (" ..." if len(report.bad_lines) > 20 else ""))
    for line in report.dropped:
        print(f"  left out (its object is gone; re-add the file to restore it): {line}")
    if report.recovered:
        print(f"  objects the journal did not name, kept as: {', '.join(report.recovered)}")
    for path in report.set_aside:
        print(f"  kept the old file as {path}")
    if report.action == "none":
        print(f"ok: the index and the journal agree ({report.experts} expert version(s), {report.tags} tag(s))")
    else:
        print(f"{report.action}: {report.experts} expert version(s), {report.tags} tag(s)")
    return 1 if args.check and report.action != "none" else 0


def _tag(args) -> int:
    rec = open_registry(args).tag(args.spec, args.tag)
    print(f"{rec.name}@{args.tag} -> {rec.ref}")
    return 0


def _push(args) -> int:
    entries = open_registry(args).push(args.url, args.specs or None)
    for e in entries:
        print(f"pushed {e['name']}@{e['version']}  sha256 {e['sha256'][:12]}")
    print(f"{len(entries)} expert(s) on {args.url}")
    return 0


def _pull(args) -> int:
    records = open_registry(args).pull(args.url, args.specs or None)
    for r in records:
        print(f"pulled {r.ref}  sha256 {r.sha256[:12]}")
    print(f"{len(records)} expert(s) from {args.url}")
    return 0


def _export(args) -> int:
    reg = open_registry(args)
    rec = reg.resolve(args.spec)
    out = Path(args.out)
    if args.format == "safetensors":
        target = out if out.suffix == ".safetensors" else out / f"{rec.name}-v{rec.version}.safetensors"
        from registry.atomic import atomic_write_bytes

        try:
            atomic_write_bytes(target, reg.read_bytes(rec))  # the exact bytes: same sha256 as in the registry
        except OSError as e:
            raise type(e)(f"cannot write {target} ({e.strerror or e}): choose another --out, or free space on / fix "
                          f"the permissions of {target.parent}") from e
        print(f"wrote {target}")
        return 0
    from inference.kinds import expert_kind

    kind = expert_kind(rec.kind)  # which formats a kind exports to, or why not: before anything is read
    if args.format in ("hf", "ct2"):
        from lora_experts.export import export_ct2_expert, export_hf
        from registry.ct2_export import ExportError

        kind.require("merge", rec.ref, ExportError)
        expert = reg.get(rec.ref)
        if args.format == "hf":
            export_hf(expert, out, rec.ref, force=args.force)
            print(f"wrote {out}: {expert.manifest['base'].get('name')} with {rec.ref} merged in (load it with "
                  f"WhisperForConditionalGeneration.from_pretrained or pipeline('automatic-speech-recognition'))")
        else:
            export_ct2_expert(expert, out, rec.ref, quantization=args.quantization, force=args.force)
            print(f"wrote {out}: {expert.manifest['base'].get('name')} with {rec.ref} merged in, CTranslate2 "
                  f"{args.quantization} (load it with faster_whisper.WhisperModel('{out}'))")
        return 0
    kind.require("peft", rec.ref)
    from registry.bases import base_reference

    expert = reg.get(rec.ref)
    reference = base_reference(expert.manifest["base"].get("name") or "")
    written = kind.peft(expert, out, base_model_name_or_path=reference)
    print(f"wrote PEFT adapter {written} (load it with PeftModel.from_pretrained)")
    return 0


def _import(args) -> int:
    from registry.expert_file import Expert, ExpertFormatError, new_manifest

    reg = open_registry(args)
    source = Path(args.source)
    if source.is_file():
        rec = reg.add(source, args.name, tags=args.tag or ())
    elif (source / "adapter_config.json").is_file():
        languages = split_list(args.language)
        if not args.base or not languages:
            raise ValueError(f"{source} is a PEFT adapter, which does not record its base's fingerprint or its "
                             "languages; pass --base (the base it was trained on) and --language")
        from lora_experts.peft_format import read_peft_adapter
        from registry.bases import load_base

        tensors, hyperparameters = read_peft_adapter(source)
        base = load_base(args.base, device="cpu")
        manifest = new_manifest("lora", languages, base, hyperparameters,
                                lineage={"parents": [], "imported_from": f"peft:{source.resolve()}"})
        rec = reg.add(Expert(tensors, manifest), args.name, tags=args.tag or ())
    elif source.exists():
        raise ExpertFormatError(f"{source} is neither an expert file nor a PEFT adapter directory (no "
                                "adapter_config.json)")
    else:
        raise FileNotFoundError(f"{source} does not exist")
    print(f"imported {rec.ref}  sha256 {rec.sha256[:12]}")
    return 0


# ------------------------------------------------------------------------------------------------ parsers
def _action(sub, parents, name: str, help: str, description: str, examples: list[str], func):
    p = sub.add_parser(name, help=help, parents=parents, formatter_class=FORMATTER,
                       description=description + "\n\nexample" + ("s" if len(examples) > 1 else "") + ":\n"
                       + "\n".join(f"  whisper-experts registry {e}" for e in examples))
    p.set_defaults(func=func)
    return p


def register(subparsers) -> None:
    p = subparsers.add_parser("registry", help="store, list, verify, mirror and export experts",
                              description=DESCRIPTION, formatter_class=FORMATTER)
    location_help = ("registry directory or file:// URL (default <home>/registry); `list` also reads a remote "
                     "mirror URL such as s3://bucket/experts")
    p.add_argument("--registry", metavar="PATH_OR_URL", help=location_help)
    # Each action also takes --registry after its name; SUPPRESS keeps an absent one from hiding the parent's.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="PATH_OR_URL", default=argparse.SUPPRESS, help=location_help)
    parents = [common]
    sub = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    a = _action(sub, parents, "add", "store an expert file as the next version of a name",
                "Store an expert file under NAME as its next version (adding the same bytes again returns the "
                "existing version).", ["add runs/uk/expert.safetensors --name uk-espeak --tag best"], _add)
    a.add_argument("file", help="an expert .safetensors file")
    a.add_argument("--name", required=True, help="expert name: lowercase letters, digits, '.', '_', '-'")
    a.add_argument("--tag", action="append", help="tag to point at this version (repeatable)")

    ls = _action(sub, parents, "list", "table of experts, filtered",
                 "List experts (latest version of each name unless --all-versions). TEST WER % is read from the "
                 "manifest's metrics.", ["list", "list --language uk --base whisper-base --all-versions",
                                         "--registry s3://bucket/experts list"], _list)
    ls.add_argument("--language", help="only experts serving this Whisper language code")
    ls.add_argument("--base", help="only experts for this base (name or fingerprint prefix)")
    ls.add_argument("--kind", help="only this kind (lora, clsr, task_vector, mask, sparse)")
    ls.add_argument("--all-versions", action="store_true", help="every version, not just the latest")

    sh = _action(sub, parents, "show", "record fields and manifest of one expert",
                 "Print an expert's record (ref, tags, sha256, path, size) and its manifest.",
                 ["show uk-espeak@latest", "show 3f9a61c0"], _show)
    sh.add_argument("spec", help="NAME, NAME@VERSION, NAME@TAG or a sha256 prefix")

    rm = _action(sub, parents, "remove", "remove one version, or all with NAME@all",
                 "Remove one version (NAME@all or --all-versions removes every version). Version numbers are "
                 "never reused.", ["remove uk-espeak@2", "remove uk-espeak@all"], _remove)
    rm.add_argument("spec", help="NAME, NAME@VERSION, NAME@TAG, NAME@all")
    rm.add_argument("--all-versions", action="store_true", help="remove every version of the name")

    vf = _action(sub, parents, "verify", "re-hash every file and report corruption",
                 "Re-hash every object and check the index, and check each imported base the experts name "
                 "(<home>/bases/NAME) against the fingerprint recorded at import; exit code 1 if any expert is "
                 "missing, truncated or corrupt, or a base changed. Orphan files (from interrupted writes) are "
                 "listed but harmless.", ["verify", "verify --no-bases"], _verify)
    vf.add_argument("--no-bases", action="store_true", help="skip re-hashing the imported bases (loads each)")

    gc = _action(sub, parents, "gc", "delete orphan object files",
                 "Delete object files no expert refers to (left by interrupted writes or removals), and temporary "
                 "files no write in progress can own: older than --temp-age, or left by a killed process of this "
                 "host. Younger ones are kept, and counted in the output.", ["gc", "gc --now"], _gc)
    gc.add_argument("--temp-age", type=float, default=3600.0, metavar="SECONDS",
                    help="delete temporary files older than this (default 3600)")
    gc.add_argument("--now", action="store_true",
                    help="delete every temporary file now (only when no add or pull is running)")

    dr = _action(sub, parents, "doctor", "rebuild a lost or damaged index from the journal and objects",
                 "Check the index (index.sqlite) against the journal (journal.jsonl, every name, version and tag) "
                 "and repair whichever is behind: a missing or damaged index is rebuilt from the journal and the "
                 "objects' manifests (the damaged file is kept beside it); a journal that lags a healthy index is "
                 "rewritten from it. Run it while nothing else writes to the registry.",
                 ["doctor", "doctor --check", "doctor --rebuild"], _doctor)
    dr.add_argument("--check", action="store_true", help="only report; exit code 1 if a repair is needed")
    dr.add_argument("--rebuild", action="store_true", help="rebuild the index even if it looks healthy")

    tg = _action(sub, parents, "tag", "point a tag at a version",
                 "Point TAG at the version SPEC names (a tag moves from the version that had it).",
                 ["tag uk-espeak@3 best"], _tag)
    tg.add_argument("spec", help="the version to tag")
    tg.add_argument("tag", help="tag name (not a number, latest or all)")

    push = _action(sub, parents, "push", "copy experts to a remote mirror (fsspec URL)",
                   "Copy experts (default: every version) to a mirror at an fsspec URL: file://, s3://, "
                   "memory://, ... The mirror keeps objects/ and index.json.",
                   ["push file:///srv/experts", "push s3://bucket/experts uk-espeak@latest pt-espeak"], _push)
    push.add_argument("url", help="mirror URL")
    push.add_argument("specs", nargs="*", metavar="SPEC", help="experts to push (default: all)")

    pull = _action(sub, parents, "pull", "copy experts from a remote mirror, verifying hashes",
                   "Copy experts (default: all) from a mirror into this registry; every file is re-hashed "
                   "before anything is added.", ["pull file:///srv/experts uk-espeak"], _pull)
    pull.add_argument("url", help="mirror URL")
    pull.add_argument("specs", nargs="*", metavar="SPEC", help="experts on the mirror to pull (default: all)")

    ex = _action(sub, parents, "export", "write an expert for transformers, faster-whisper, PEFT or vLLM",
                 "Export an expert:\n"
                 "  --format hf           the base with the expert merged in, a plain transformers directory\n"
                 "                        (WhisperForConditionalGeneration.from_pretrained(DIR), pipeline(...))\n"
                 "  --format ct2          the same as a CTranslate2 model: faster_whisper.WhisperModel(DIR)\n"
                 "                        (--quantization int8 by default), converted by CTranslate2's converter\n"
                 "  --format peft         adapter_model.safetensors + adapter_config.json for\n"
                 "                        PeftModel.from_pretrained and vLLM's Whisper multi-LoRA (LoRA experts)\n"
                 "  --format safetensors  the expert file itself\n"
                 "lora, task_vector and sparse experts merge; a clsr expert (gated paths beside each feed-forward "
                 "layer) has no plain-Whisper form and is refused: serve it from a pack.",
                 ["export uk-espeak --format peft --out exported/uk-espeak",
                  "export cs-real --format hf --out exported/cs-real-hf",
                  "export cs-real --format ct2 --quantization int8 --out exported/cs-real-ct2",
                  "export uk-espeak@2 --format safetensors --out ."], _export)
    ex.add_argument("spec", help="the expert to export")
    ex.add_argument("--format", choices=["peft", "hf", "ct2", "safetensors"], default="peft",
                    help="output format (default peft)")
    ex.add_argument("--out", required=True, help="output directory (or a .safetensors path for --format safetensors)")
    ex.add_argument("--quantization", default="int8",
                    choices=["int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16", "float32"],
                    help="with --format ct2: stored weight type (default int8, faster-whisper's CPU default)")
    ex.add_argument("--force", action="store_true",
                    help="with hf/ct2: merge even if the imported base's fingerprint differs from the expert's")

    im = _action(sub, parents, "import", "add a PEFT adapter directory or an expert file",
                 "Import an expert file, or a PEFT LoRA adapter directory; a PEFT adapter does not record its "
                 "base's fingerprint or languages, so pass --base and --language.",
                 ["import exported/uk-espeak --name uk-peft --base whisper-base --language uk",
                  "import expert.safetensors --name uk-espeak"], _import)
    im.add_argument("source", help="a PEFT adapter directory or an expert .safetensors file")
    im.add_argument("--name", required=True, help="expert name to store it under")
    im.add_argument("--base", help="base the PEFT adapter was trained on (name, directory or hub id)")
    im.add_argument("--language", help="language code(s) the adapter serves, comma-separated")
    im.add_argument("--tag", action="append", help="tag to point at the new version (repeatable)")
