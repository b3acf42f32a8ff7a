"""``whisper-experts distill``: CLSR gated experts (DistilWhisper), a LoRA student or a full student, taught by
teachers."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

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
K (with --side both/encoder) gates only encoder layers >= K and caches the input of layer K (-3: the top three
layers, as train's LoRA recipe adapts). --attention gates the attention projections of the same layers too
(self-attention q/k/v/out, cross-attention q/out; each its own gate and path: what LoRA adapts beside the FFN).
The layout is recorded in each expert; an expert loads only into a CLSR model of the same layout.

--kind lora (LoRA language experts): one LoRA student for all the languages, each batch taught by its
language's teacher, e.g. --teachers uk-espeak,ru-espeak (LoRA experts on the base; their manifests name the
languages, which are the student's unless --languages says otherwise).

--kind full (distil-whisper's student): the student's own weights in the region (--side decoder by default;
both with --encoder-start K) are trained against the teachers (lr 1e-4), and stored as a task_vector expert
of the student base. This is how a student cut from a larger Whisper (`whisper-experts base shrink`) relearns
the shared weights it lost, before language experts are trained on it.

Teachers: --teacher BASE (any Whisper the base loader reads: openai/whisper-large-v2, an imported name, a
directory) or BASE+EXPERT (a base with a registry expert applied: lora, task_vector, sparse or clsr). A teacher
must share the student's tokenizer. With --teacher-cache DIR the teacher scores every training utterance once
and its top-k log-probabilities are kept in DIR (keyed by utterance, teacher and precision; later runs reuse
them); the report gives the probability mass the top-k keeps. That pass runs in the run's --precision, so under
bf16 autocast by default where the machine computes bf16 natively (measured on 2 CPU cores: 2.1x faster than
float32, the best token unchanged at 99.2% of positions; benchmarks/teacher_fill_speed.py). Without a cache the
teacher runs at every step.

Options can also come from a YAML file (--config): its keys are the flags' names with underscores; flags given
override it. The same options drive `distill lightning` (model.gate_dropout, data.batch_size, ...).

examples:
  whisper-experts distill --base whisper-base --teacher whisper-base+uk-teacher --data data/eu3 \\
      --languages uk,pt,nl --kind clsr
  whisper-experts distill --data data/eu3 --languages uk,pt,nl --kind clsr --path lowrank --rank 16 --name eu3-clsr
  whisper-experts distill --teachers uk-teacher,pt-teacher --teacher-cache cache/teacher --data data/eu3 \\
      --kind clsr --side decoder       # cached encoder outputs: fast on CPU
  whisper-experts distill --teacher openai/whisper-large-v2 --teacher-cache cache/teacher --data data/uk --languages uk
  whisper-experts distill --teachers uk-espeak,ru-espeak --kind lora --data data/uk-ru --name uk-ru-student
  whisper-experts distill --data data/uk --languages uk --max-steps 200 --registry /srv/experts
  whisper-experts distill ... --resume runs/<name>/logs/version_0/checkpoints/last.ckpt   # after an interruption
  whisper-experts base shrink whisper-base --decoder-layers 2 --name whisper-base-dec2
  whisper-experts distill --base whisper-base-dec2 --teacher-base whisper-base --teachers cs-real,nl-real \\
      --teacher-cache cache/teacher --kind full --data data/fillets --name dec2-student
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

def options():
    """The command's flags and ``--config`` keys: the fields of :class:`trainers.configs.DistillConfig`."""
    from trainers.configs import DistillConfig
    from trainers.options import Flag, RecipeOptions

    return RecipeOptions("whisper-experts distill", DistillConfig,
                         flags={"progress": Flag(("--quiet",), const=False, help="no progress bars"),
                                "run_dir": Flag(default="runs/<name>"), "resume": Flag(metavar="CKPT")},
                         keys={"name": str, "tags": tuple[str, ...]})


def _read(args):
    """(the run's config, the options that are not its fields: name, tags), from ``--config`` and the flags."""
    from trainers.configs import DistillConfig

    values = options().values(args)
    given = {"name": args.name, "tags": tuple(args.tag) if args.tag else None}
    values.update({k: v for k, v in given.items() if v is not None})
    extras = {k: values.pop(k, None) for k in ("name", "tags")}
    if not values.get("data"):
        raise ValueError("no --data corpus given")
    values.setdefault("run_dir", str(Path("runs") / (extras["name"] or f"distill-{values.get('kind', 'clsr')}")))
    return DistillConfig(**values), extras


def _config_from_args(args):
    return _read(args)[0]


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

    cfg, extras = _read(args)
    name, tags = extras["name"], extras["tags"] or ()
    # A bad name is refused before training, not after.
    if cfg.kind == "clsr" and cfg.languages:
        expert_names(name, cfg.languages, cfg.has_teacher)
    elif name:
        validate_name(name)
    experts, report = train_distilled(cfg)
    if report.get("rank", 0) != 0:
        return 0  # --strategy ddp: rank 0 stores and reports
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    registry = Registry(cfg.registry)
    if cfg.kind == "clsr":
        names = expert_names(name, [e.languages[0] for e in experts], cfg.has_teacher)
    else:
        names = {experts[0].languages[0]: name or f"{'-'.join(experts[0].languages)}-distilled"}
    for expert in experts:
        stored = names[expert.languages[0]]
        save_expert(expert, run_dir / f"{stored}.safetensors")
        print(f"stored {registry.add(expert, stored, tags=tags).ref} in the registry")
    teacher = report.get("teacher") or {}
    if "mass_kept" in teacher:
        m = teacher["mass_kept"]
        print(f"teacher cache: top-{teacher['k']} keeps {100 * m['mean']:.1f}% of the teacher's probability mass on "
              f"average (min {100 * m['min']:.1f}%); {teacher['computed']} utterances scored, "
              f"{teacher['reused']} reused")
    if "test" in report:
        _print_test(report["test"])
    print(f"\nlogs, report.json and expert files in {run_dir}")
    if report.get("checkpoint"):
        print(f"best epoch's Lightning checkpoint: {report['checkpoint']}")
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
    opts = options()
    g = p.add_argument_group("what")
    g.add_argument("--config", help=opts.config_help({"--tag": "tags"}))
    opts.add(g, "data", "languages", "base", "kind")
    g.add_argument("--name", help="registry name (clsr: NAME-<lang> when several languages)")
    g.add_argument("--tag", action="append", help="registry tag to point at the stored version(s) (repeatable)")
    opts.add(g, "registry")
    opts.add(p.add_argument_group("teacher"), "teacher", "teachers", "teacher_base", "teacher_cache", "top_k", "kd",
             "temperature", "ce_weight", "gate_weight", "kd_weight", "label_smoothing")
    opts.add(p.add_argument_group("student"), "path", "side", "encoder_start", "attention", "rank", "alpha",
             "gate_hidden", "gate_dropout", "gate_budget", "max_noise", "gate_warmup", "path_dropout",
             "path_dropout_on", "path_dropout_ramp", "shared_only_prob", "gate_inference")
    opts.add(p.add_argument_group("optimization"), "lr", "gate_lr", "decoder_lr", "schedule", "warmup_steps",
             "weight_decay", "epochs", "max_steps", "batch_size", "accumulate", "precision", "patience", "seed",
             "strategy", "devices")
    opts.add(p.add_argument_group("data"), "max_train", "max_validation", "test", "test_limit", "val_max_new_tokens",
             "cache_encoder", "cache_dir", "run_dir", "progress")
    opts.add_rest(p)
