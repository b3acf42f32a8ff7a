"""``whisper-experts train``: train a LoRA (sparse, or fine-tune) language expert and store it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from trainers.cli.common import split_list

DESCRIPTION = """\
Train a LoRA language expert on a frozen base Whisper with Lightning: validation WER every epoch, the
expert with the best validation WER kept (checkpoints hold the expert only), early stopping, CSV and
TensorBoard logs under --run-dir. A decoder-only expert (the default) runs the encoder once per utterance
and trains on cached encoder outputs. The best expert is evaluated on the test split beside the base, then
written to the registry under --name (and to --out if given). On CUDA it trains in bf16-mixed by default;
`--strategy ddp --devices N` trains on N processes (GPUs, or CPU processes with gloo), each on its own share
of the batches, validation WER over the whole validation set, and rank 0 alone tests and stores the expert.

Options can also come from a YAML file (--config); command-line flags override it.

A language the base mishears needs the encoder too: --side both --encoder-start 3 adapts encoder layers 3.. (the
lower ones are frozen and their output cached once). On whisper-base and synthesized speech this took Ukrainian
from 100% to 40% test WER where a decoder-only expert reached 83%. --precision bf16-mixed trains under bfloat16
autocast: the default on CUDA, and faster on CPUs with bfloat16 matrix units (lscpu: amx_bf16).

examples:
  whisper-experts train --base whisper-base --data data/uk --language uk --name uk-espeak
  whisper-experts train --data data/uk --language uk --name uk-small --rank 8 --epochs 5 --max-train 200
  whisper-experts train --data data/uk --language uk --name uk-warm --init-from ru-espeak@latest
  whisper-experts train --config examples/train_lora_uk.yaml
  whisper-experts train --data data/uk --language uk --name uk-enc3 --side both --encoder-start 3 --dropout 0 \
      --precision bf16-mixed
  whisper-experts train --data data/uk --language uk --name uk-ddp --strategy ddp --devices 2
  whisper-experts train --data data/cs-real --data data/cs-espeak:0.5 --language cs --name cs-mix \
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


def _config_from_args(args):
    from trainers.train_full import FullTrainConfig
    from trainers.train_lora import TrainConfig
    from trainers.train_sparse import SparseTrainConfig

    values = {}
    if args.config:
        import yaml

        from trainers.cli.common import resolve_config

        loaded = yaml.safe_load(Path(resolve_config(args.config)).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of option: value")
        known = {f.name for f in dataclasses.fields(SparseTrainConfig)} | {"name", "language", "out", "tags",
                                                                             "kind"}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{args.config}: unknown option(s) {', '.join(unknown)}; "
                             "see `whisper-experts train --help`")
        values.update(loaded)
    for key in ("base", "rank", "alpha", "dropout", "side", "encoder_start", "lr", "schedule", "warmup_steps",
                "weight_decay", "label_smoothing", "epochs", "max_steps", "batch_size", "accumulate",
                "precision", "seed", "max_train", "max_validation", "patience", "init_from", "run_dir",
                "strategy", "devices", "test_limit", "cache_dir", "name", "out", "kind", "sparsity", "mask_scope",
                "mask_score", "sparse_lr", "mask_from", "spec_freq_masks", "spec_freq_width", "spec_time_masks",
                "spec_time_width", "spec_time_ratio", "noise_snr_db", "noise_kind", "noise_dir"):
        v = getattr(args, key, None)
        if v is not None:
            values[key] = v
    if args.data:
        values["data"] = args.data if len(args.data) > 1 else args.data[0]
        if len(args.data) > 1:  # several --data replace a config's extra_data too
            values.pop("extra_data", None)
    if args.spec_augment:
        values["spec_augment"] = True
    if args.speed_perturb:
        values["speed_perturb"] = _floats(args.speed_perturb, "--speed-perturb")
    if args.language:
        values["language"] = args.language
    if args.targets:
        values["target_modules"] = tuple(split_list(args.targets))
    if args.no_cross_attention:
        values["cross_attention"] = False
    if args.cross_attention_kv:
        values["cross_attention_kv"] = True
    if args.quiet:
        values["progress"] = False
    languages = values.pop("languages", None) or split_list(values.pop("language", None))
    name, out = values.pop("name", None), values.pop("out", None)
    values.pop("tags", None)
    if not values.get("data"):
        raise ValueError("no --data corpus given")
    from trainers.corpus_mix import CorpusSpec, split_data_args

    # --data A --data B:0.5 (or a config's `data: [A, B:0.5]`): the first is the target, the rest train too
    values["data"], weight, extra = split_data_args(values["data"])
    if weight != 1.0:
        values["data_weight"] = weight
    listed = values.get("extra_data") or ()
    extra = tuple(str(s) for s in ([listed] if isinstance(listed, str) else listed)) + extra
    for spec in extra:
        CorpusSpec.parse(spec)  # every weight checked before any work
    if extra:
        values["extra_data"] = extra
    if isinstance(values.get("speed_perturb"), (str, int, float)):  # a config's `speed_perturb: 0.9,1.0,1.1`
        values["speed_perturb"] = _floats(str(values["speed_perturb"]), "speed_perturb")
    if "speed_perturb" in values:
        values["speed_perturb"] = tuple(float(f) for f in values["speed_perturb"] or ())
    if not languages:
        raise ValueError("no --language given (e.g. --language uk, or --language uk,ru for one expert serving both)")
    if not name:
        raise ValueError("no --name given for the expert (e.g. --name uk-espeak)")
    values.setdefault("run_dir", str(Path("runs") / name))
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    kind = values.pop("kind", None) or "lora"
    sparse_only = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if kind != "sparse" and sparse_only:
        raise ValueError(f"{', '.join(sparse_only)} only apply to sparse experts; add --kind sparse")
    config = {"sparse": SparseTrainConfig, "task_vector": FullTrainConfig}.get(kind, TrainConfig)
    return config(languages=tuple(languages), **values), name, out


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in split_list(text) or ())
    except ValueError:
        raise ValueError(f"{flag} {text}: expected comma-separated numbers, e.g. 0.9,1.0,1.1") from None


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

    cfg, name, out = _config_from_args(args)
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
        record = Registry(args.registry).add(expert, name)
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
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a LoRA (or sparse, or fine-tune) language expert",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what")
    g.add_argument("--config", help="YAML file of options (keys as below, with underscores)")
    g.add_argument("--base", help="base model (default whisper-base)")
    g.add_argument("--data", action="append", metavar="DIR[:WEIGHT]",
                   help="corpus directory; repeat to train on several corpora (see 'several corpora' below). The "
                        "first is the target: validation and test use it alone")
    g.add_argument("--language", help="language code(s) the expert serves, comma-separated")
    g.add_argument("--name", help="expert name in the registry, e.g. uk-espeak")
    g.add_argument("--out", help="also write the expert file here")
    g.add_argument("--registry", help="registry directory (default <home>/registry)")
    g.add_argument("--init-from", dest="init_from", help="warm start from this expert (registry spec or file)")
    g.add_argument("--kind", choices=["lora", "sparse", "task_vector"],
                   help="expert kind (default lora; sparse, task_vector (a fine-tune): see above)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 32)")
    g.add_argument("--dropout", type=float, help="LoRA dropout (default 0.05)")
    g.add_argument("--targets", help="linear layers: q_proj,k_proj,v_proj,out_proj,fc1,fc2 (default all)")
    g.add_argument("--side", choices=["decoder", "encoder", "both"], help="where to adapt (default decoder)")
    g.add_argument("--encoder-start", dest="encoder_start", type=int,
                   help="with --side both/encoder: adapt encoder layers from this index up only; the frozen "
                        "layers below are cached, so steps cost only the top layers (default 0: all)")
    g.add_argument("--no-cross-attention", action="store_true", help="leave the decoder's cross-attention alone")
    g.add_argument("--cross-attention-kv", action="store_true",
                   help="also adapt cross-attention k/v (acts on all encoder frames: ~2x slower steps)")
    g = p.add_argument_group("sparse (--kind sparse)")
    g.add_argument("--sparsity", type=float, help="fraction of the phase-1 matrices' entries left unchanged "
                                                   "(default 0.99: 1%% trained)")
    g.add_argument("--mask-scope", dest="mask_scope", choices=["global", "per_matrix"],
                   help="rank entries over all matrices together (default) or in each matrix alone")
    g.add_argument("--mask-score", dest="mask_score", choices=["magnitude", "gradient"],
                   help="mask by |delta| (default) or by |grad * delta| over a few training batches")
    g.add_argument("--sparse-lr", dest="sparse_lr", type=float, help="phase-2 learning rate (default 1e-4)")
    g.add_argument("--mask-from", dest="mask_from",
                   help="take the mask from this expert's delta (registry spec or file) instead of phase 1")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"], help="decay after warm-up (default linear)")
    g.add_argument("--warmup-steps", dest="warmup_steps", type=int, help="warm-up steps (default 10)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--label-smoothing", dest="label_smoothing", type=float, help="(default 0)")
    g.add_argument("--epochs", type=int, help="maximum epochs (default 10)")
    g.add_argument("--max-steps", dest="max_steps", type=int, help="stop after N optimizer steps")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="utterances per batch (default 16)")
    g.add_argument("--accumulate", type=int, help="gradient accumulation steps (default 1)")
    g.add_argument("--precision", help="Lightning precision (default bf16-mixed on CUDA, 32-true on CPU)")
    g.add_argument("--patience", type=int, help="early-stopping patience in epochs (default 3)")
    g.add_argument("--seed", type=int, help="seed (default 0)")
    g.add_argument("--strategy", help="Lightning strategy, e.g. ddp (one process per device; default auto)")
    g.add_argument("--devices", help="Lightning devices, e.g. 2 (GPUs, or CPU processes without one; default auto)")
    g = p.add_argument_group("data")
    g.add_argument("--max-train", dest="max_train", type=int, help="at most N training utterances per language")
    g.add_argument("--max-validation", dest="max_validation", type=int, help="at most N validation utterances")
    g.add_argument("--test-limit", dest="test_limit", type=int, help="at most N test utterances per language")
    g.add_argument("--cache-dir", dest="cache_dir", help="encoder-output cache directory (default <data>/.cache)")
    g.add_argument("--run-dir", dest="run_dir", help="logs and checkpoints (default runs/<name>)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("augmentation (training rows only; all off by default; see 'augmentation' below)")
    g.add_argument("--spec-augment", dest="spec_augment", action="store_true",
                   help="SpecAugment time and frequency masks on each training batch (on the cached activations "
                        "when the encoder side is cached)")
    g.add_argument("--spec-freq-masks", dest="spec_freq_masks", type=int, help="frequency masks per utterance "
                                                                               "(default 2)")
    g.add_argument("--spec-freq-width", dest="spec_freq_width", type=int,
                   help="widest frequency mask in mel bins (default 27)")
    g.add_argument("--spec-time-masks", dest="spec_time_masks", type=int, help="time masks per utterance (default 2)")
    g.add_argument("--spec-time-width", dest="spec_time_width", type=int,
                   help="widest time mask in 10 ms frames (default 100)")
    g.add_argument("--spec-time-ratio", dest="spec_time_ratio", type=float,
                   help="and at most this fraction of the utterance (default 0.05)")
    g.add_argument("--speed-perturb", dest="speed_perturb", metavar="FACTORS",
                   help="speed factors, e.g. 0.9,1.0,1.1: a resampled copy of the training set per factor other "
                        "than 1, featurized and cached once (3x the cache and the steps per epoch)")
    g.add_argument("--noise-snr-db", dest="noise_snr_db", type=float,
                   help="add a noisy copy of the training set at this SNR in dB (a featurized, cached copy)")
    g.add_argument("--noise-kind", dest="noise_kind", choices=["white", "pink"], help="generated noise (default pink)")
    g.add_argument("--noise-dir", dest="noise_dir", help="mix in excerpts of these noise recordings instead")
    p.set_defaults(func=_run)
