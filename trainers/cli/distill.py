"""``whisper-experts distill``: CLSR gated experts (DistilWhisper) or a LoRA student, taught by teachers."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from trainers.cli.common import split_list

DESCRIPTION = """\
Distil language experts from a teacher Whisper.

--kind clsr (DistilWhisper): the base becomes a CLSR Whisper: every feed-forward block keeps its frozen
pretrained path and gets, per language, its own path (--path full: a copy of the FFN, as in the paper;
--path lowrank: a rank --rank delta, ~1-2% of the size) and a per-token gate. Training batches hold one
language each; the loss is CE (label smoothing 0.1) + the gate budget + KD against the teacher
(Jensen-Shannon; weights 0.25 / 0.25 / 0.5 as in the paper, or CE + gate without a teacher). The gate noise
ramps from 0 to 5 so gates harden. Validation WER every epoch with hard gates; each language keeps its best
epoch; one clsr expert per language is tested and stored in the registry (NAME, or NAME-<lang> for several
languages; default <lang>-clsr-kd).

Where the CLSR blocks go: --side both (default, the paper) gates every encoder and decoder FFN; --side decoder
gates the decoder's only and leaves the encoder as it is, so (with a cached teacher, or none) training computes
every utterance's encoder output once and reuses it every epoch instead of running the encoder forward and
backward on 30 s windows at every step: on CPU that is the difference between minutes and hours. --encoder-start
K (with --side both/encoder) gates only encoder layers >= K and caches the input of layer K. The layout is
recorded in each expert; an expert loads only into a CLSR model of the same layout.

--kind lora (LoRA language experts): one LoRA student for all the languages, each batch taught by its
language's teacher, e.g. --teachers uk-espeak,ru-espeak (LoRA experts on the base; their manifests name the
languages, which are the student's unless --languages says otherwise).

Teachers: --teacher BASE (any Whisper the base loader reads: openai/whisper-large-v2, an imported name, a
directory) or BASE+EXPERT (a base with a registry expert applied: lora, task_vector, sparse or clsr). A
teacher must share the student's tokenizer. With --teacher-cache DIR the teacher scores every training utterance once and
its top-k log-probabilities are kept in DIR (keyed by utterance and teacher; later runs reuse them); the
report gives the probability mass the top-k keeps. Without it the teacher runs at every step.

examples:
  whisper-experts distill --base whisper-base --teacher whisper-base+uk-teacher --data data/eu3 \\
      --languages uk,pt,nl --kind clsr
  whisper-experts distill --data data/eu3 --languages uk,pt,nl --kind clsr --path lowrank --rank 16 --name eu3-clsr
  whisper-experts distill --teachers uk-teacher,pt-teacher --teacher-cache cache/teacher --data data/eu3 \\
      --kind clsr --side decoder       # cached encoder outputs: fast on CPU
  whisper-experts distill --teacher openai/whisper-large-v2 --teacher-cache cache/teacher --data data/uk --languages uk
  whisper-experts distill --teachers uk-espeak,ru-espeak --kind lora --data data/uk-ru --name uk-ru-student
  whisper-experts distill --data data/uk --languages uk --max-steps 200 --registry /srv/experts
  whisper-experts distill lightning fit --config examples/lightning_distill_clsr.yaml   # LightningCLI
"""

LIGHTNING = """\
Train CLSR experts with Lightning's own command line (LightningCLI): the same recipe as
`whisper-experts distill --kind clsr`, from a YAML config with the sections model: (base, languages, path,
teacher, loss weights, optimizer), data: (corpus, batch size), trainer: (any Lightning Trainer option),
expert: (registry name; each language's best epoch is tested and stored when fitting ends), checkpoint: and
early_stopping: (both watch val_wer). Any value can be overridden with --section.key.

examples:
  whisper-experts distill lightning fit --config examples/lightning_distill_clsr.yaml
  whisper-experts distill lightning fit --config examples/lightning_distill_clsr.yaml --model.path lowrank \\
      --trainer.max_epochs 2
  whisper-experts distill lightning fit --config examples/lightning_distill_clsr.yaml --print_config
"""

# DistillConfig fields the command fills itself (lists, or flags named otherwise); every other field is copied
# from the argparse value of the same name when it is given.
DERIVED = ("languages", "teachers", "progress", "test")


def _config_from_args(args):
    from dataclasses import fields

    from trainers.train_distill import DistillConfig

    values = {f.name: getattr(args, f.name) for f in fields(DistillConfig)
              if f.name not in DERIVED and getattr(args, f.name, None) is not None}
    if not values.get("data"):
        raise ValueError("no --data corpus given")
    values["languages"] = tuple(split_list(args.languages) or ())
    values["teachers"] = tuple(split_list(args.teachers) or ())
    if args.quiet:
        values["progress"] = False
    if args.no_test:
        values["test"] = False
    values.setdefault("run_dir", str(Path("runs") / (args.name or f"distill-{values.get('kind', 'clsr')}")))
    return DistillConfig(**values)


def _print_test(test: dict) -> None:
    print("\n| language | n | base WER % | expert WER % | base CER % | expert CER % |\n|---|---|---|---|---|---|")
    for lang, row in test["expert"].items():
        b = test["base"][lang]
        print(f"| {lang} | {row['n']} | {100 * b['wer']:.1f} | {100 * row['wer']:.1f} | {100 * b['cer']:.1f} | "
              f"{100 * row['cer']:.1f} |")


def _run(args) -> int:
    if args.mode == "lightning":
        return _run_lightning(args)
    from registry.expert_file import save_expert
    from registry.records import validate_name
    from registry.store import Registry
    from trainers.clsr_experts import expert_names
    from trainers.train_distill import train_distilled

    cfg = _config_from_args(args)
    # A bad name is refused before training, not after.
    if cfg.kind == "clsr" and cfg.languages:
        expert_names(args.name, cfg.languages, cfg.has_teacher)
    elif args.name:
        validate_name(args.name)
    experts, report = train_distilled(cfg)
    if report.get("rank", 0) != 0:
        return 0  # --strategy ddp: rank 0 stores and reports
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    registry = Registry(args.registry)
    if cfg.kind == "clsr":
        names = expert_names(args.name, [e.languages[0] for e in experts], cfg.has_teacher)
    else:
        names = {experts[0].languages[0]: args.name or f"{'-'.join(experts[0].languages)}-distilled"}
    for expert in experts:
        name = names[expert.languages[0]]
        save_expert(expert, run_dir / f"{name}.safetensors")
        print(f"stored {registry.add(expert, name).ref} in the registry")
    teacher = report.get("teacher") or {}
    if "mass_kept" in teacher:
        m = teacher["mass_kept"]
        print(f"teacher cache: top-{teacher['k']} keeps {100 * m['mean']:.1f}% of the teacher's probability mass on "
              f"average (min {100 * m['min']:.1f}%); {teacher['computed']} utterances scored, "
              f"{teacher['reused']} reused")
    if "test" in report:
        _print_test(report["test"])
    print(f"\nlogs, report.json and expert files in {run_dir}")
    return 0


def _run_lightning(args) -> int:
    if not args.args:
        args.lightning_parser.print_help()
        return 2
    from trainers.cli.common import resolve_config_args
    from trainers.distill_lightning import DistillLightningCLI

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")
        cli = DistillLightningCLI(args=resolve_config_args(list(args.args)))
    store = cli.expert_callback()
    if cli.trainer.is_global_zero and store.records:
        if store.test_results:
            _print_test(store.test_results)
        print(f"\nstored {', '.join(r.ref for r in store.records)} in the registry")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="distil CLSR gated experts or a LoRA student from teachers",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_run, mode="flags")
    modes = p.add_subparsers(dest="mode_command", metavar="lightning")
    lp = modes.add_parser("lightning", help="the same from a LightningCLI YAML config", description=LIGHTNING,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    lp.add_argument("args", nargs=argparse.REMAINDER, metavar="fit|validate ...",
                    help="a LightningCLI subcommand and its options (--config FILE, --model.path lowrank, "
                         "--print_config)")
    lp.set_defaults(mode="lightning", lightning_parser=lp)
    g = p.add_argument_group("what")
    g.add_argument("--data", help="corpus directory")
    g.add_argument("--languages", help="student languages, comma-separated (default with --teachers: theirs)")
    g.add_argument("--base", help="student base model (default whisper-base)")
    g.add_argument("--kind", choices=["clsr", "lora"], help="student: clsr gated experts (default) or one LoRA")
    g.add_argument("--name", help="registry name (clsr: NAME-<lang> when several languages)")
    g.add_argument("--registry",
                   help="registry directory for teacher experts and the results (default <home>/registry)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", help="one teacher for all languages: BASE or BASE+EXPERT, e.g. whisper-base+uk-teacher")
    g.add_argument("--teachers", help="one teacher per language: EXPERT or BASE+EXPERT, comma-separated")
    g.add_argument("--teacher-base", dest="teacher_base", help="base of --teachers experts (default: --base)")
    g.add_argument("--teacher-cache", dest="teacher_cache", help="cache the teacher's top-k log-probabilities here")
    g.add_argument("--top-k", dest="top_k", type=int, help="log-probabilities kept per position (default 32)")
    g.add_argument("--kd", choices=["js", "kl"], help="KD loss (default js)")
    g.add_argument("--temperature", type=float, help="KD temperature (default 1)")
    g.add_argument("--ce-weight", dest="ce_weight", type=float, help="default 0.25 with a teacher, 1 without")
    g.add_argument("--gate-weight", dest="gate_weight", type=float, help="default 0.25 with a teacher, 1 without")
    g.add_argument("--kd-weight", dest="kd_weight", type=float, help="default 0.5")
    g.add_argument("--label-smoothing", dest="label_smoothing", type=float, help="(default 0.1)")
    g = p.add_argument_group("student")
    g.add_argument("--path", choices=["full", "lowrank"], help="clsr language path (default full)")
    g.add_argument("--side", choices=["both", "decoder", "encoder"],
                   help="FFN blocks the student adapts (default clsr: both, as the paper; lora: decoder). decoder "
                        "leaves the encoder alone, so training caches encoder outputs once (with a cached teacher or "
                        "none) instead of running the encoder at every step: far faster on CPU")
    g.add_argument("--encoder-start", dest="encoder_start", type=int,
                   help="with --side both/encoder: adapt encoder layers >= K only; the input of layer K is cached "
                        "(default 0)")
    g.add_argument("--rank", type=int, help="clsr lowrank / LoRA rank (default 16)")
    g.add_argument("--alpha", type=float, help="lowrank / LoRA alpha (default 32)")
    g.add_argument("--gate-budget", dest="gate_budget", type=float, help="target fraction of open gates (0.5)")
    g.add_argument("--max-noise", dest="max_noise", type=float, help="final gate noise scale (default 5)")
    g.add_argument("--path-dropout", dest="path_dropout", type=float,
                   help="dropout on a language path's output in training (default 0.3, DistilWhisper's)")
    g.add_argument("--shared-only-prob", dest="shared_only_prob", type=float,
                   help="per layer call in training, run only the shared path with this probability (default 0.2)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 full paths, 1e-3 lowrank/LoRA)")
    g.add_argument("--gate-lr", dest="gate_lr", type=float,
                   help="clsr: the gates' peak learning rate (default: --lr). On short runs a gate trained at a "
                        "full path's 1e-4 stays near G = 0 and its hard decision is noise; try 1e-3")
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"], help="decay after warm-up")
    g.add_argument("--warmup-steps", dest="warmup_steps", type=int, help="warm-up steps (default 10)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--epochs", type=int, help="maximum epochs (default 10)")
    g.add_argument("--max-steps", dest="max_steps", type=int, help="stop after N optimizer steps")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="utterances per batch (default 16)")
    g.add_argument("--accumulate", type=int, help="gradient accumulation steps (default 1)")
    g.add_argument("--precision", help="Lightning precision (default bf16-mixed on CUDA, 32-true on CPU)")
    g.add_argument("--patience", type=int, help="early-stopping patience in epochs (default 3)")
    g.add_argument("--seed", type=int, help="seed (default 0)")
    g.add_argument("--strategy", help="Lightning strategy, e.g. ddp (default auto)")
    g.add_argument("--devices", help="Lightning devices (default auto)")
    g = p.add_argument_group("data")
    g.add_argument("--max-train", dest="max_train", type=int, help="at most N training utterances per language")
    g.add_argument("--max-validation", dest="max_validation", type=int, help="at most N validation utterances")
    g.add_argument("--test-limit", dest="test_limit", type=int, help="at most N test utterances per language")
    g.add_argument("--no-test", dest="no_test", action="store_true", help="skip the test-split evaluation")
    g.add_argument("--val-max-new-tokens", dest="val_max_new_tokens", type=int, help="validation decoding bound")
    g.add_argument("--cache-dir", dest="cache_dir",
                   help="encoder cache directory for a student that leaves the encoder (or its lower layers) alone "
                        "(default <data>/.cache)")
    g.add_argument("--run-dir", dest="run_dir", help="logs, checkpoints, report (default runs/<name>)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
