"""The ``whisper-experts`` command line.

Each subcommand lives in ``trainers/cli/<name>.py`` and adds itself with ``register(subparsers)``,
setting ``func`` (``args -> exit code``). Errors the user can fix (bad paths, unknown languages, corrupt
files) are printed as one ``error:`` line with exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

COMMANDS = ["quickstart", "base", "corpus", "train", "lightning", "fuse", "eval", "registry", "pack",
            "router", "transcribe", "serve", "distill"]

EPILOG = """\
examples:
  whisper-experts quickstart                      # import whisper-base, synthesize a corpus, print baseline WER
  whisper-experts base import                     # convert the bundled whisper-base into Hugging Face format
  whisper-experts corpus synth --languages de,uk --per-language 40 --out data/de-uk
  whisper-experts train --data data/de-uk --language uk --name uk-espeak
  whisper-experts lightning fit --config examples/lightning_lora_uk.yaml   # the same with LightningCLI
  whisper-experts eval --base whisper-base --data data/de-uk --split test --expert uk-espeak@latest
  whisper-experts registry list --language uk
  whisper-experts pack create --base whisper-base --languages uk,pt,nl --out packs/eu3.safetensors
  whisper-experts router train --pack packs/eu3.safetensors --data data/eu4 --languages uk,pt,nl,de --out r.safetensors
  whisper-experts transcribe a.wav b.mp3 --pack packs/eu3.safetensors --language auto --format json
  whisper-experts serve --pack packs/eu3.safetensors --port 8000     # OpenAI's transcription API, batched

Run `whisper-experts COMMAND --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whisper-experts",
        description="Parameter-efficient language experts for Whisper: bases, corpora, LoRA expert training, "
                    "evaluation, fusion, packs and transcription with each utterance routed to its expert.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--home", metavar="DIR",
                        help="project home (imported bases, registry); default $WHISPER_EXPERTS_HOME or "
                             "~/.cache/whisper-experts")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"trainers.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    if args.home:
        os.environ["WHISPER_EXPERTS_HOME"] = args.home
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False  # Lightning prints its own INFO lines; don't print them twice
    if not args.debug:
        # transformers repeats generation-config notices on every generate() call; keep the terminal readable.
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        # Lightning (2.6) flattens batches with torch's LeafSpec, which torch 2.13 deprecates: a FutureWarning
        # on every fit that names Lightning's code and asks nothing of the user.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, LookupError, OSError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2

