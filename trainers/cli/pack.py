"""``whisper-experts pack``: put N experts for one base into one file, and read its table of contents."""

from __future__ import annotations

import argparse
import json

from trainers.cli.common import print_table, split_list
from trainers.cli.registry import _fmt_params, _fmt_size, open_registry

DESCRIPTION = """\
A pack is N experts for one base in one .safetensors file (tensors namespaced per expert, a manifest listing
each expert's registry version, kind, languages and manifest, and the base's fingerprints). Loading a pack
attaches every expert to one Whisper in one call (inference.packs.load_pack), so that each utterance of a batch
is routed to its own expert. Packs hold the kinds an expert bank routes: lora, sparse and clsr experts (CLSR
experts cannot share a pack with LoRA or sparse experts that adapt fc1/fc2); other kinds are refused, saying
why and what to do instead.

examples:
  whisper-experts pack create --base whisper-base --languages uk,pt,nl --out packs/eu3.safetensors
  whisper-experts pack create --experts uk-espeak,pt-espeak@2 --out packs/uk-pt.safetensors
  whisper-experts pack create --base whisper-base --languages uk,pt --kind sparse --out packs/sparse.safetensors
  whisper-experts pack inspect packs/eu3.safetensors
"""

FORMATTER = argparse.RawDescriptionHelpFormatter


def _print_contents(info) -> None:
    print(f"pack     {info.path}  ({_fmt_size(info.size)}, {len(info.experts)} expert(s), format "
          f"{info.format_version}, created {info.created or '?'})")
    print(f"base     {info.base.get('name')}  fingerprint {info.base.get('fingerprint')}  tokenizer "
          f"{info.base.get('tokenizer_fingerprint')}")
    print_table([{"name": e.name, "ref": e.ref or "(not stored)", "kind": e.kind, "languages": ",".join(e.languages),
                  "rank": e.rank or "", "params": _fmt_params(e.parameters), "tensors": e.tensors,
                  "sha256": (e.sha256 or "")[:12]} for e in info.experts],
                ["name", "ref", "kind", "languages", "rank", "params", "tensors", "sha256"])


def _create(args) -> int:
    from inference.attach import check_routable
    from registry.packs import create_pack

    experts, languages = split_list(args.experts) or [], split_list(args.languages) or []
    if not experts and not languages:
        raise ValueError("name the experts to pack: --experts NAME[,NAME...] or --base BASE --languages CODES")
    reasons: dict[str, str] = {}
    info = create_pack(args.out, experts, registry=open_registry(args), base=args.base, languages=languages,
                       kind=None if args.kind == "any" else args.kind, latest=args.latest, reasons=reasons,
                       check=lambda name, expert: check_routable(name, expert.kind, "pack create",
                                                                 "of --experts, or choose --kind"))
    for language, why in reasons.items():
        print(f"{language}: {why}")
    print(f"wrote {info.path}")
    _print_contents(info)
    return 0


def _inspect(args) -> int:
    from registry.packs import inspect_pack

    info = inspect_pack(args.file)
    if args.json:
        entries = [{k: v for k, v in vars(e).items() if args.manifests or k != "manifest"} for e in info.experts]
        print(json.dumps({"path": str(info.path), "size": info.size, "format_version": info.format_version,
                          "created": info.created, "base": info.base, "experts": entries},
                         indent=2, sort_keys=True, ensure_ascii=False))
    else:
        _print_contents(info)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("pack", help="bundle experts for one base into one file; inspect packs",
                              description=DESCRIPTION, formatter_class=FORMATTER)
    sub = p.add_subparsers(dest="pack_command", metavar="ACTION", required=True)

    c = sub.add_parser("create", help="write a pack from registry experts", formatter_class=FORMATTER,
                       description="Write a pack: for each of --languages the expert serving it on --base that "
                                   "is tagged 'prod', else the one with the best stored test WER for the "
                                   "language, else the latest (--latest: always the latest); and/or the experts "
                                   "--experts names (registry specs), in that order. The output says which "
                                   "expert each language got and why. Every expert must be for the same base."
                                   "\n\nexamples:\n"
                                   "  whisper-experts registry tag uk-real@3 prod   # what packs should take\n"
                                   "  whisper-experts pack create --base whisper-base --languages uk,pt,nl "
                                   "--out packs/eu3.safetensors\n"
                                   "  whisper-experts pack create --experts uk-espeak,pt-espeak --out packs/uk-pt"
                                   ".safetensors")
    c.add_argument("--out", required=True, help="the pack file to write (.safetensors)")
    c.add_argument("--base", help="base the experts were trained on (name or fingerprint prefix); needed with "
                                  "--languages, a check with --experts")
    c.add_argument("--languages", help="comma-separated Whisper codes: for each, the expert tagged 'prod', else "
                                       "the best stored test WER, else the latest")
    c.add_argument("--latest", action="store_true", help="with --languages: take each language's latest expert "
                                                         "(ignore 'prod' tags and scores)")
    c.add_argument("--experts", help="comma-separated registry specs: NAME, NAME@VERSION, NAME@TAG")
    c.add_argument("--kind", default="lora", help="kind of expert --languages selects: lora (default), sparse, "
                                                  "clsr, or 'any' (the latest of any kind)")
    c.add_argument("--registry", metavar="DIR", help="registry directory (default <home>/registry)")
    c.set_defaults(func=_create)

    i = sub.add_parser("inspect", help="print a pack's table of contents", formatter_class=FORMATTER,
                       description="Print a pack's base and experts (from its header; tensor data is not read)."
                                   "\n\nexamples:\n  whisper-experts pack inspect packs/eu3.safetensors\n"
                                   "  whisper-experts pack inspect packs/eu3.safetensors --json --manifests")
    i.add_argument("file", help="a pack .safetensors file")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--manifests", action="store_true", help="with --json: include each expert's full manifest")
    i.set_defaults(func=_inspect)
