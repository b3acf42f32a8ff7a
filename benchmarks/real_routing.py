"""Routing on real recorded speech: whisper-base's language ID, language-ID routing and a learned router
against oracle routing, on a mix of real Czech and Dutch clips and base-served languages.

    python benchmarks/real_routing.py \\
        --expert cs=runs/real/cs-enc3-all/expert.safetensors --expert nl=runs/real/nl-enc3-all/expert.safetensors

The pack holds the real-speech experts (``benchmarks/real_speech.py``). The test mix is ``--per-language``
clips of each expert's language from the real corpus's test split (spread evenly over it), plus
``--others-per-language`` clips of each ``--others`` language, which no expert serves. No real German or
English recordings with transcripts are offline (Fish Fillets' English clips carry no text), so the others
are espeak-ng speech from ``corpus synth``: say so wherever their rows are quoted. The same clips go through:

- **oracle**: each clip with its own language and that language's expert (the base model for the others);
- **language ID**: whisper-base detects each 30 s window's language among all 99 (below ``--threshold`` the
  base model serves it), and the window goes to that language's expert;
- **language ID among the mix**: the same, choosing among the mix's languages only;
- **learned router**: ``router train`` over the pack on the mix's training clips (real train split, synthetic
  train split of the others), routing each window.

Every WER carries its 95% bootstrap interval and every routed row the paired-bootstrap difference to the
oracle on the same clips. Decoding never sees the transcripts (bounded by audio duration). Writes
``benchmarks/results/real_routing.{json,md}``; work files under ``--runs`` (default ``runs/real/routing``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from benchmarks.command import recorded  # noqa: E402

ROUTES = ("language ID", "language ID among the mix", "learned router")


def spread(n_rows: int, n: int | None) -> list[int]:
    """``n`` row indices spread evenly over ``n_rows`` (all when ``n`` is None or at least ``n_rows``)."""
    if n is None or n >= n_rows:
        return list(range(n_rows))
    return [round(i * (n_rows - 1) / max(1, n - 1)) for i in range(n)]


def synthetic_others(languages: list[str], per_language: int, out: Path) -> Path:
    """An espeak-ng corpus of ``languages`` (made once): its test split must hold ``per_language`` clips."""
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    if not (out / "dataset_dict.json").is_file():
        # corpus synth puts about a fifth of each language's utterances in test
        synthesize_corpus(SynthConfig(languages=tuple(languages), per_language=max(40, 5 * per_language), seed=0),
                          out, progress=True)
    return out


def mixed_corpus(real: Path, real_langs: list[str], others: Path, other_langs: list[str], out: Path,
                 max_train: int) -> Path:
    """One corpus with the real languages' and the others' splits (the router trains on one corpus)."""
    import datasets

    from trainers.corpus.loading import load_corpus, save_corpus

    if (out / "dataset_dict.json").is_file():
        return out
    a, b = load_corpus(real), load_corpus(others)
    columns = [c for c in a["train"].column_names if c in b["train"].column_names]
    splits = {}
    for split in ("train", "validation", "test"):
        parts = []
        for corpus, langs in ((a, real_langs), (b, other_langs)):
            ds = corpus[split].select_columns(columns)
            for lang in langs:
                rows = [i for i, x in enumerate(ds["language"]) if x == lang]
                keep = spread(len(rows), max_train if split == "train" else None)
                parts.append(ds.select([rows[i] for i in keep]))
        splits[split] = datasets.concatenate_datasets([p.cast(parts[0].features) for p in parts])
    save_corpus(datasets.DatasetDict(splits), out)
    return out


def scores(refs: list[str], hyps: list[str]) -> dict:
    from inference.confidence import bootstrap_ci, utterance_counts
    from inference.evaluation import normalize

    counts = utterance_counts([normalize(t) for t in refs], [normalize(t) for t in hyps])
    wer = float(counts.word_errors.sum() / max(1, counts.words.sum()))
    return {"wer": wer, "wer_ci95": list(bootstrap_ci(counts.word_errors, counts.words)),
            "word_errors": counts.word_errors.tolist(), "words": counts.words.tolist()}


def run(args) -> dict:
    import numpy as np

    from inference.confidence import paired_bootstrap
    from inference.transcribe import ExpertWhisper
    from registry.bases import load_base
    from registry.expert_file import load_expert
    from registry.packs import create_pack
    from trainers.corpus.loading import load_corpus

    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    experts = dict(spec.split("=", 1) for spec in args.expert)
    real_langs = list(experts)
    other_langs = [x for x in args.others.split(",") if x]
    pack = runs / "pack.safetensors"
    create_pack(pack, {f"{lang}-real": load_expert(path) for lang, path in experts.items()})
    base = load_base(args.base)
    whisper = ExpertWhisper.from_pack(base, pack)

    real = load_corpus(args.data)["test"]
    others_dir = synthetic_others(other_langs, args.others_per_language, runs / "others") if other_langs else None
    others = load_corpus(others_dir)["test"] if others_dir else None
    clips = []  # (language, audio, text, real?)
    for ds, langs, n, is_real in ((real, real_langs, args.per_language, True),
                                  (others, other_langs, args.others_per_language, False)):
        for lang in langs:
            rows = [i for i, x in enumerate(ds["language"]) if x == lang]
            for i in spread(len(rows), n):
                row = ds[rows[i]]
                clips.append((lang, row["audio"], row["text"], is_real))
    audios, truth = [c[1] for c in clips], [c[0] for c in clips]
    print(f"{len(clips)} clips: " + ", ".join(f"{lang} {truth.count(lang)}" for lang in dict.fromkeys(truth)),
          flush=True)

    router = None
    if args.router:
        router = args.router
    elif args.train_router:
        from trainers.train_router import RouterTrainConfig, train_router

        mix = mixed_corpus(Path(args.data), real_langs, others_dir, other_langs, runs / "mix", args.router_max_train)
        cfg = RouterTrainConfig(data=str(mix), languages=tuple(real_langs + other_langs), epochs=args.router_epochs,
                                max_train=args.router_max_train, max_validation=args.router_max_validation,
                                progress=True)
        start = time.perf_counter()
        trained, report = train_router(cfg, base=base)
        router = runs / "router.safetensors"
        trained.save(router)
        print(f"router trained in {time.perf_counter() - start:.0f} s: {report['validation']}", flush=True)

    mix_codes = tuple(real_langs + other_langs)
    variants = [("oracle", dict(language=truth)), ("language ID", dict(language="auto")),
                ("language ID among the mix", dict(language="auto", candidates=mix_codes))]
    if router:
        variants.append(("learned router", dict(language="auto", router=str(router))))
    outputs, seconds = {}, {}
    for label, kw in variants:
        start = time.perf_counter()
        outputs[label] = whisper.transcribe(audios, batch_size=args.batch_size, threshold=args.threshold,
                                            progress=True, **kw)
        seconds[label] = round(time.perf_counter() - start, 1)
        print(f"{label}: {seconds[label]} s", flush=True)

    rows = {}
    for lang in dict.fromkeys(truth):
        idx = [i for i, x in enumerate(truth) if x == lang]
        refs = [clips[i][2] for i in idx]
        row = {"n": len(idx), "real": clips[idx[0]][3], "expert": f"{lang}-real" if lang in experts else None}
        for label in outputs:
            ts = [outputs[label][i] for i in idx]
            row[label] = scores(refs, [t.text for t in ts])
            if label != "oracle":
                row[label]["language_right"] = sum(t.language == lang for t in ts) / len(idx)
                row[label]["own_expert"] = sum(t.expert == row["expert"] for t in ts) / len(idx)
                row[label]["detected"] = sorted({str(t.language) for t in ts})
                row[label]["vs_oracle"] = paired_bootstrap(np.array(row["oracle"]["word_errors"]),
                                                           np.array(row[label]["word_errors"]),
                                                           np.array(row["oracle"]["words"])).as_dict()
        rows[lang] = row
    pooled = {}
    for label in outputs:
        errs = np.array([e for r in rows.values() for e in r[label]["word_errors"]])
        words = np.array([w for r in rows.values() for w in r[label]["words"]])
        pooled[label] = {"wer": float(errs.sum() / words.sum())}
        if label != "oracle":
            ora = np.array([e for r in rows.values() for e in r["oracle"]["word_errors"]])
            pooled[label]["vs_oracle"] = paired_bootstrap(ora, errs, words).as_dict()
    return {"rows": rows, "pooled": pooled, "seconds": seconds, "experts": experts,
            "router": str(router) if router else None, "threshold": args.threshold}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(result: dict, command: str, machine: str) -> str:
    from inference.confidence import format_change, format_ci

    lines = ["Routing on real recorded speech: real Czech and Dutch clips (Fish Fillets NG test levels) with their "
             "real-speech experts in one pack, plus base-served languages (espeak-ng speech: no real recordings "
             "with transcripts are offline). whisper-base, greedy, decoding bounded by audio duration.", "",
             f"Command: `{command}`", "",
             "| language | n | expert | routing | WER % [95% CI] | vs oracle [paired 95% CI] | language right % | "
             "to own expert % | detected |", "|---|---|---|---|---|---|---|---|---|"]
    for lang, r in result["rows"].items():
        o = r["oracle"]
        src = "" if r["real"] else " (espeak-ng)"
        lines.append(f"| {lang}{src} | {r['n']} | {r['expert'] or 'none (base)'} | oracle | "
                     f"{format_ci(o['wer'], o['wer_ci95'])} | | | | |")
        for label in [x for x in ROUTES if x in r]:
            v = r[label]
            lines.append(f"| | | | {label} | {format_ci(v['wer'], v['wer_ci95'])} | {format_change(v['vs_oracle'])} | "
                         f"{100 * v['language_right']:.0f} | {100 * v['own_expert']:.0f} | "
                         f"{', '.join(v['detected'][:8])}{' ...' if len(v['detected']) > 8 else ''} |")
    p = result["pooled"]
    lines += ["", "All clips pooled: oracle " + _pct(p["oracle"]["wer"]) + "%; " + "; ".join(
        f"{label} {_pct(p[label]['wer'])}% ({format_change(p[label]['vs_oracle'])})" for label in ROUTES if label in p)
        + ". Goal: within 5% relative of oracle routing.", "",
        f"Language-ID threshold {result['threshold']}; seconds per variant: "
        + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()) + f". Machine: {machine}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expert", action="append", required=True, metavar="LANG=FILE",
                   help="a real-speech expert and its language (repeat: one per language)")
    p.add_argument("--data", default="data/fillets", help="the real corpus (whisper-experts corpus fetch fillets)")
    p.add_argument("--per-language", type=int, default=100, help="real test clips per expert language (default 100)")
    p.add_argument("--others", default="de,en", help="base-served languages, espeak-ng speech (default de,en)")
    p.add_argument("--others-per-language", type=int, default=40, help="clips per other language (default 40)")
    p.add_argument("--router", help="a trained router file for this pack (default: train one, see --no-router)")
    p.add_argument("--no-router", dest="train_router", action="store_false", help="skip the learned router")
    p.add_argument("--router-epochs", type=int, default=4)
    p.add_argument("--router-max-train", type=int, default=200, help="router training clips per language")
    p.add_argument("--router-max-validation", type=int, default=40)
    p.add_argument("--threshold", type=float, default=0.5, help="language-ID threshold (default 0.5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--runs", default="runs/real/routing")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--table-only", action="store_true", help="only rewrite the table from the stored JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from real_speech import machine

    command = recorded(Path(__file__).name, argv, drop=("--table-only",))
    if args.table_only:
        result = json.loads((out / "real_routing.json").read_text())
    else:
        result = run(args)
        result["machine"] = machine()
        result["command"] = command
        (out / "real_routing.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "real_routing.md").write_text(markdown(result, result.get("command", command),
                                                  result.get("machine", machine())))
    print((out / "real_routing.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
