"""Baseline WER/CER of the bundled whisper-base on a synthesized multilingual corpus.

    python benchmarks/baseline_wer.py                       # 12 languages x 50 test utterances (~10 min on 2 CPU cores)
    python benchmarks/baseline_wer.py --languages de,uk --test-per-language 10 --out /tmp/bl

Synthesizes (or reuses) the corpus under --corpus, decodes the test split greedily with each utterance's
language token forced, and writes ``<out>/baseline_wer.json``, ``baseline_wer.md`` (the README's table) and
``baseline_wer.png`` (WER and CER per language).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402

LANGUAGES = "en,es,de,it,ru,uk,bg,cs,pt,nl,fa,tr"


def plot(report: dict, path: Path) -> None:
    """Bar chart of normalized WER and CER per language from a report dict (``EvalReport.as_dict()``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = report["languages"]
    langs = sorted(rows)
    x = range(len(langs))
    wer = [100 * rows[lang]["wer"] for lang in langs]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.bar([i - 0.2 for i in x], wer, 0.4, label="WER")
    ax.bar([i + 0.2 for i in x], [100 * rows[lang]["cer"] for lang in langs], 0.4, label="CER")
    ax.set_xticks(list(x), langs)
    ax.set_ylim(0, 1.25 * max(wer))
    ax.set_ylabel("%")
    ax.set_title(f"{report['meta'].get('base', 'base')} on synthesized speech (test split, normalized)")
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--languages", default=LANGUAGES)
    p.add_argument("--test-per-language", type=int, default=50, help="test utterances per language (default 50)")
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--corpus", default="data/baseline-corpus", help="corpus directory (reused if present)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--no-repetition-guard", dest="repetition_guard", action="store_false",
                   help="decode without the repetition guard (to measure what it changes)")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from <out>/baseline_wer.json")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads((Path(args.out) / "baseline_wer.json").read_text()), Path(args.out) / "baseline_wer.png")
        return 0

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate() repeats config notices on every call

    from inference.evaluation import DecodeOptions, evaluate, utterances_from_dataset
    from registry.bases import load_base
    from trainers.corpus.loading import load_corpus
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    languages = [x.strip() for x in args.languages.split(",") if x.strip()]
    corpus_dir = Path(args.corpus)
    if (corpus_dir / "dataset_dict.json").is_file():
        corpus = load_corpus(corpus_dir)
    else:
        # Half of each language's sentences go to test so that test_per_language is reached with few sentences.
        per_language = 2 * args.test_per_language
        cfg = SynthConfig(languages=tuple(languages), per_language=per_language, train_fraction=0.4,
                          validation_fraction=0.1, test_fraction=0.5, seed=args.seed)
        corpus = synthesize_corpus(cfg, corpus_dir)
    utterances = utterances_from_dataset(corpus["test"], languages, args.test_per_language)

    torch.set_num_threads(os.cpu_count() or 1)
    base = load_base(args.base)
    t0 = time.time()
    report = evaluate(base.model, base.processor, utterances, DecodeOptions(batch_size=args.batch_size,
                                                                             repetition_guard=args.repetition_guard))
    elapsed = time.time() - t0
    report.meta.update({
        "base": base.name, "base_fingerprint": base.fingerprint, "corpus": str(corpus_dir), "split": "test",
        "seconds": round(elapsed, 1), "machine": f"{platform.processor() or platform.machine()}, "
                                                  f"{os.cpu_count()} CPU threads, torch {torch.__version__}",
        "command": recorded(Path(__file__).name, argv),
    })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "baseline_wer.json").write_text(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    table = report.markdown()
    mean_wer = sum(r.wer for r in report.languages.values()) / len(report.languages)
    mean_cer = sum(r.cer for r in report.languages.values()) / len(report.languages)
    md = (f"{table}\n| **mean** | {sum(r.n for r in report.languages.values())} | {100 * mean_wer:.1f} | "
          f"{100 * mean_cer:.1f} | | | |\n\nDecoding bound: {report.guard.split(';')[0]} (per language). "
          f"{len(utterances)} utterances decoded in {elapsed:.0f} s on {report.meta['machine']}.\n")
    (out / "baseline_wer.md").write_text(md)
    print(md)
    plot(report.as_dict(), out / "baseline_wer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
