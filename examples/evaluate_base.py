"""Evaluate a base Whisper on a freshly synthesized corpus, through the Python API.

    python examples/evaluate_base.py --base whisper-base --languages de,uk --per-language 20 --out /tmp/eval-demo

Steps: synthesize a corpus with espeak-ng (real sentences, held-out test voices), load the base (bundled
name, directory or hub id), decode the test split and print the per-language WER/CER table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry.bases import load_base  # noqa: E402
from trainers.corpus.synth import SynthConfig, synthesize_corpus  # noqa: E402
from inference.evaluation import DecodeOptions, evaluate, utterances_from_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--languages", default="de,uk")
    p.add_argument("--per-language", type=int, default=20)
    p.add_argument("--out", default="eval-demo")
    args = p.parse_args(argv)

    out = Path(args.out)
    corpus = synthesize_corpus(SynthConfig(languages=tuple(args.languages.split(",")),
                                           per_language=args.per_language), out / "corpus", overwrite=True)
    base = load_base(args.base)
    report = evaluate(base.model, base.processor, utterances_from_dataset(corpus["test"]), DecodeOptions())
    print(report.markdown())
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
