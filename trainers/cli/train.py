"""``whisper-experts train``: train a LoRA (sparse, or fine-tune) language expert and store it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

DESCRIPTION = """\
Train a LoRA language expert on a frozen base Whisper with Lightning: validation WER every epoch, the
expert with the best validation WER kept (checkpoints hold the expert only), early stopping, CSV and
TensorBoard logs under --run-dir. The best expert is evaluated on the test split beside the base, then
written to the registry under --name (and to --out if given). `--strategy ddp --devices N` trains on N
processes (GPUs, or CPU processes with gloo), each on its own share of the batches, validation WER over the
whole validation set, and rank 0 alone tests and stores the expert.

Options can also come from a YAML file (--config): its keys are the flags' names with underscores, as
listed under --config; command-line flags override it. An unknown key is an error.

The default recipe adapts the decoder and the top three encoder layers (--side both --encoder-start -3: layers
3-5 of whisper-base; the lower layers are frozen and their output cached once), LoRA dropout 0, bf16 autocast
where the machine computes bf16 natively (CUDA; CPUs with AMX or AVX512-BF16, lscpu: amx_bf16 / avx512_bf16).
Measured on real Czech recordings (1.2 h): -31% test WER, against -13% for a decoder-only expert
(docs/results.md). --side decoder is the cheap variant: it trains on cached encoder outputs, about 7x faster
per step, and is the right choice when the base hears the language well and only writes it badly.

examples:
  whisper-experts train --base whisper-base --data data/uk --language uk --name uk-espeak
  whisper-experts train --data data/uk --language uk --name uk-small --rank 8 --epochs 5 --max-train 200
  whisper-experts train --data data/uk --language uk --name uk-warm --init-from ru-espeak@latest
  whisper-experts train --config examples/train_lora_uk.yaml
  whisper-experts train --data data/uk --language uk --name uk-dec --side decoder       # the cheap variant
  whisper-experts train --data data/uk --language uk --name uk-ddp --strategy ddp --devices 2
  whisper-experts train --data data/uk --language uk --name uk-espeak \\
      --resume runs/uk-espeak/logs/version_0/checkpoints/last.ckpt    # go on after an interruption
  whisper-experts train --data data/cs-real --data data/cs-espeak:0.5 --language cs --name cs-mix \\
      --spec-augment --speed-perturb 0.9,1.0,1.1
  whisper-experts train --data data/uk --language uk --name uk-sparse --kind sparse --sparsity 0.99
  whisper-experts train --data data/uk --language uk --name uk-ft --kind task_vector --lr 3e-5
  (the same from a LightningCLI config: `whisper-experts lightning --help`)

several corpora: --data A --data B:0.5 trains on both. A weight (default 1) is a repeat factor per epoch: each
epoch draws round(WEIGHT x the corpus's training utterances), every utterance floor(WEIGHT) or ceil(WEIGHT) times
(0.5: a different random half each epoch; 2: each twice). Validation, test and early stopping use the FIRST corpus
(the target) alone; a further corpus must hold at least one of the --language codes.

augmentation: --spec-augment masks each training batch on the fly (never validation or test): log-mel time and
frequency masks, or, when the encoder side is cached, time and channel masks on the cached activations.
--speed-perturb 0.9,1.0,1.1 and --noise-snr-db 20 change the audio, so they happen before the features and the
cache: each is an extra copy of the training set, featurized and cached once (speed 0.9/1.0/1.1 triples the
cache, the one-time encoder pass and the steps per epoch; noise adds one more copy). All are seeded by --seed.

--kind sparse trains a sparse sub-network expert in two phases: a LoRA expert as above (phase 1), whose delta's
largest entries (the top 1 - sparsity fraction) become the mask; then, from the base again, only those entries of
the weights themselves are fine-tuned (phase 2, learning rate --sparse-lr), keeping the best epoch by validation
WER. --mask-from EXPERT takes the mask from an existing expert's delta instead of phase 1.

--kind task_vector fine-tunes the weight matrices themselves (the linear layers a LoRA expert with the same
--side/--encoder-start/--targets would adapt, and their biases) and stores "fine-tuned - base" as a task_vector
expert: the input of task arithmetic as its paper used it (full fine-tunes of small Whispers). Use a learning
rate near 1e-5..1e-4 (default 3e-5); --rank/--alpha/--dropout do not apply.
"""


KINDS = ("lora", "sparse", "task_vector")


def options():
    """The command's flags and ``--config`` keys: the fields of the recipes' configs (LoRA, sparse, fine-tune)."""
    from trainers.configs import FullTrainConfig, SparseTrainConfig, TrainConfig
    from trainers.options import Flag, RecipeOptions

    return RecipeOptions(
        "whisper-experts train", TrainConfig,
        {"--kind sparse": SparseTrainConfig, "--kind task_vector": FullTrainConfig},
        flags={"languages": Flag(("--language",)), "target_modules": Flag(("--targets",)),
               "progress": Flag(("--quiet",), const=False, help="no progress bars"),
               "run_dir": Flag(default="runs/<name>"), "speed_perturb": Flag(metavar="FACTORS"),
               "resume": Flag(metavar="CKPT")},
        custom={"data": "--data", "extra_data": "--data DIR[:WEIGHT]", "data_weight": "--data DIR:WEIGHT"},
        keys={"data": tuple[str, ...], "name": str, "out": str, "registry": str, "tags": tuple[str, ...],
              "kind": typing.Literal[KINDS]},
        aliases={"language": "languages"})


def _read(args):
    """(the run's config, the options that are not its fields: name, out, registry, tags), from ``--config`` and
    the flags (which override it)."""
    from trainers.configs import FullTrainConfig, SparseTrainConfig, TrainConfig
    from trainers.corpus_mix import CorpusSpec, split_data_args

    values = options().values(args)
    given = {"name": args.name, "out": args.out, "registry": args.registry, "kind": args.kind,
             "tags": tuple(args.tag) if args.tag else None}
    values.update({k: v for k, v in given.items() if v is not None})
    if args.data:
        values["data"] = tuple(args.data)
        if len(args.data) > 1:  # several --data replace a config's extra_data too
            values.pop("extra_data", None)
    extras = {k: values.pop(k, None) for k in ("name", "out", "registry", "tags")}
    kind = values.pop("kind", None) or "lora"
    if not values.get("data"):
        raise ValueError("no --data corpus given")
    # --data A --data B:0.5 (or a config's `data: [A, B:0.5]`): the first is the target, the rest train too
    values["data"], weight, extra = split_data_args(values["data"])
    if weight != 1.0:
        values["data_weight"] = weight
    extra = tuple(values.get("extra_data") or ()) + extra
    for spec in extra:
        CorpusSpec.parse(spec)  # every weight checked before any work
    if extra:
        values["extra_data"] = extra
    if not values.get("languages"):
        raise ValueError("no --language given (e.g. --language uk, or --language uk,ru for one expert serving both)")
    if not extras["name"]:
        raise ValueError("no --name given for the expert (e.g. --name uk-espeak)")
    values.setdefault("run_dir", str(Path("runs") / extras["name"]))
    config = {"sparse": SparseTrainConfig, "task_vector": FullTrainConfig}.get(kind, TrainConfig)
    foreign = [k for k in values if k not in {f.name for f in dataclasses.fields(config)}]
    if foreign:
        owner = next(k for k, cls in (("sparse", SparseTrainConfig), ("task_vector", FullTrainConfig))
                     if foreign[0] in {f.name for f in dataclasses.fields(cls)})
        raise ValueError(f"{', '.join(foreign)} only apply to {owner} experts; add --kind {owner}")
    return config(**values), extras


def _config_from_args(args):
    """(the run's config, the expert's name, --out)."""
    cfg, extras = _read(args)
    return cfg, extras["name"], extras["out"]


def print_test_table(test: dict) -> None:
    """The base's and the expert's test-split WER/CER per language, as a Markdown table."""
    from inference.confidence import format_change, format_ci

    print("\n| language | n | base WER % [95% CI] | expert WER % [95% CI] | change [95% CI] | base CER % | "
          "expert CER % |\n|---|---|---|---|---|---|---|")
    for lang, row in test["expert"].items():
        b, change = test["base"][lang], format_change(test.get("paired", {}).get(lang))
        print(f"| {lang} | {row['n']} | {format_ci(b['wer'], b.get('wer_ci95'))} | "
              f"{format_ci(row['wer'], row.get('wer_ci95'))} | {change} | {100 * b['cer']:.1f} | "
              f"{100 * row['cer']:.1f} |")


def _run(args) -> int:
    from registry.expert_file import save_expert
    from trainers.train_full import FullTrainConfig, train_full_expert
    from trainers.train_lora import train_lora_expert
    from trainers.train_sparse import SparseTrainConfig, train_sparse_expert

    from registry.home import ensure_writable

    cfg, extras = _read(args)
    name, out = extras["name"], extras["out"]
    ensure_writable(Path(cfg.run_dir), "the training run (logs, expert file)", hint="pass another --run-dir")
    train = train_sparse_expert if isinstance(cfg, SparseTrainConfig) else \
        train_full_expert if isinstance(cfg, FullTrainConfig) else train_lora_expert
    expert, report = train(cfg)
    if report.get("rank", 0) != 0:
        return 0  # --strategy ddp: every rank holds the same expert; rank 0 writes it and reports
    run_dir = Path(cfg.run_dir)
    save_expert(expert, run_dir / "expert.safetensors")
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    if out:
        save_expert(expert, out)
    try:
        from registry.store import Registry
    except ImportError:  # registry store not available in this build
        Registry = None
    if Registry is not None:
        record = Registry(extras["registry"]).add(expert, name, tags=extras["tags"] or ())
        print(f"stored {record.ref} in the registry")
    if "test" in report:
        print_test_table(report["test"])
    if "size" in report:  # a sparse expert
        print(f"\nsparse expert: {report['size']['entries']:,} entries (sparsity "
              f"{100 * expert.manifest['hyperparameters']['sparsity_achieved']:.2f}%), "
              f"{report['size']['file_bytes']:,} bytes on disk")
    if "parameters" in report:  # a fine-tune
        print(f"\ntask_vector expert: {report['parameters']:,} fine-tuned parameters")
    print(f"\nbest epoch {report['best_epoch']} (validation WER {100 * report['best_val_wer']:.1f}%); "
          f"expert file {run_dir / 'expert.safetensors'}; logs in {run_dir}")
    if report.get("checkpoint"):
        print(f"best epoch's Lightning checkpoint: {report['checkpoint']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a LoRA (or sparse, or fine-tune) language expert",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    opts = options()
    g = p.add_argument_group("what")
    g.add_argument("--config", help=opts.config_help({"--tag": "tags", "--data": "data (a list for several)"}))
    opts.add(g, "base")
    g.add_argument("--data", action="append", metavar="DIR[:WEIGHT]",
                   help="corpus directory; repeat to train on several corpora (see 'several corpora' below). The "
                        "first is the target: validation and test use it alone")
    opts.add(g, "languages")
    g.add_argument("--name", help="expert name in the registry, e.g. uk-espeak")
    g.add_argument("--tag", action="append", help="registry tag to point at the stored version (repeatable)")
    g.add_argument("--out", help="also write the expert file here")
    g.add_argument("--registry", help="registry directory (default <home>/registry)")
    opts.add(g, "init_from")
    g.add_argument("--kind", choices=list(KINDS),
                   help="expert kind (default lora; sparse, task_vector (a fine-tune): see above)")
    opts.add(p.add_argument_group("LoRA"), "rank", "alpha", "dropout", "target_modules", "side", "encoder_start",
             "cross_attention", "cross_attention_kv")
    opts.add(p.add_argument_group("sparse (--kind sparse)"), "sparsity", "mask_scope", "mask_score", "score_batches",
             "sparse_lr", "mask_from")
    opts.add(p.add_argument_group("fine-tune (--kind task_vector)"), "biases")
    opts.add(p.add_argument_group("optimization"), "lr", "schedule", "warmup_steps", "weight_decay",
             "label_smoothing", "epochs", "max_steps", "batch_size", "accumulate", "precision", "patience", "seed",
             "strategy", "devices")
    opts.add(p.add_argument_group("data"), "max_train", "max_validation", "test", "test_limit", "val_max_new_tokens",
             "cache_encoder", "cache_dir", "run_dir", "progress")
    opts.add(p.add_argument_group("augmentation (training rows only; all off by default; see 'augmentation' below)"),
             "spec_augment", "spec_freq_masks", "spec_freq_width", "spec_time_masks", "spec_time_width",
             "spec_time_ratio", "speed_perturb", "noise_snr_db", "noise_kind", "noise_dir")
    opts.add_rest(p)
    p.set_defaults(func=_run)
