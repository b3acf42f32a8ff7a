"""``whisper-experts lightning``: train a LoRA language expert from a LightningCLI YAML config."""

from __future__ import annotations

import argparse
import warnings

DESCRIPTION = """\
Train a LoRA language expert with Lightning's own command line (LightningCLI): the same recipe as
`whisper-experts train`, configured the way Lightning users expect. A YAML config has the sections
model: (base, languages, LoRA and optimizer options), data: (corpus directory, batch size, limits),
trainer: (any Lightning Trainer option: max_epochs, precision, strategy, devices, ...), expert: (the
registry name; the best expert by validation WER is tested and stored there when fitting ends),
checkpoint: and early_stopping: (both watch val_wer). Any value can be overridden with --section.key.

Subcommands: fit (train and store), validate (validation WER of a fresh or warm-started expert).
Everything after `lightning` goes to LightningCLI; `whisper-experts lightning fit --help` lists every option.

examples:
  whisper-experts lightning fit --config examples/lightning_lora_uk.yaml
  whisper-experts lightning fit --config examples/lightning_lora_uk.yaml --model.rank 8 --trainer.max_epochs 2
  whisper-experts lightning fit --config examples/lightning_lora_uk.yaml --print_config   # the full config
  whisper-experts lightning fit --config examples/lightning_lora_uk.yaml --trainer.strategy ddp --trainer.devices 2
  whisper-experts lightning fit --model.languages [uk] --data.data data/uk --expert.name uk-espeak
"""


def _run(args) -> int:
    if not args.args:
        args.parser.print_help()
        return 2
    from trainers.cli.common import resolve_config_args
    from trainers.cli.train import print_test_table
    from trainers.lightning_cli import ExpertLightningCLI

    with warnings.catch_warnings():
        # sys.argv also holds `whisper-experts lightning`; it stays as it is, since DDP re-runs it per rank.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")
        cli = ExpertLightningCLI(args=resolve_config_args(list(args.args)))
    store = cli.expert_callback()
    if cli.trainer.is_global_zero and store.record is not None:
        if store.test_results:
            print_test_table(store.test_results)
        # Not trainer.log_dir: under DDP it is a collective, and the other ranks have finished.
        logs = cli.trainer.logger.log_dir if cli.trainer.logger else cli.trainer.default_root_dir
        print(f"\nstored {store.record.ref} in the registry; best epoch {store.best_epoch} "
              f"(validation WER {100 * store.best_wer:.1f}%); logs in {logs}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("lightning", help="train a LoRA expert from a LightningCLI YAML config",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="fit|validate ...",
                   help="a LightningCLI subcommand and its options (--config FILE, --model.rank 8, --print_config)")
    p.set_defaults(func=_run, parser=p)
