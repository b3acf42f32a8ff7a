"""Where a student cut to fewer decoder layers is faster: decoding time against the length of the output.

    python benchmarks/cut_speed.py       # whisper-base against its 4- and 2-layer cuts; ~8 min on 2 CPU cores
    python benchmarks/cut_speed.py --decoder-layers 3 --batch-sizes 1 --tokens 8,64,128

On the 2-5 s test clips of the real corpus a cut student decoded in 0.84-0.98x whisper-base's time although it
runs a third of the decoder layers (docs/results.md, "a smaller student cut from whisper-base"): Whisper's
encoder always runs a whole 30 s window, and a short clip needs few decoder steps. This measures the split. Each
model (``--base`` and its cuts, ``whisper-experts base shrink``'s layer choice, made in memory: speed does not
depend on what the kept layers learned) transcribes the same real clips with greedy ``generate``, language
forced, made to emit exactly N tokens (``min_new_tokens = max_new_tokens = N``), for each N of ``--tokens`` and
each batch size. Models and lengths alternate over ``--rounds`` rounds (one untimed round first) and each cell
is the median, so drift in machine load hits them all. A straight line through each model's times gives its
fixed cost (the encoder and the prompt) and its cost per output token; the cut's speed-up is the ratio of each.

Writes ``<out>/<name>.{json,md,png}``: the times, each cut's time as a fraction of the base's at each length,
the fitted per-token and fixed costs, and a plot of time against output tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402


def parse_ints(text: str, what: str) -> list[int]:
    """``"16,1"`` -> [1, 16]: positive and distinct, returned in increasing order; a clear error otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what} takes comma-separated whole numbers such as 1,16; got {text!r}") from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise SystemExit(f"{what} must be distinct numbers of at least 1, got {text!r}")
    return sorted(values)


def cuts(model, layer_counts: list[int]) -> dict[str, object]:
    """The model cut to each number of decoder layers (``whisper-experts base shrink``'s choice of layers)."""
    from registry.shrink import pick_layers, shrink_model

    total = model.config.decoder_layers
    out = {}
    for keep in layer_counts:
        layers = pick_layers(total, keep)
        out[f"dec{keep}"] = {"layers": layers, "model": shrink_model(model, layers).eval()}
    return out


def generate_seconds(model, features, tokens: int, language: str) -> float:
    """Seconds for greedy ``generate`` to emit exactly ``tokens`` tokens for each input in ``features``."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_features=features, language=language, task="transcribe",
                             min_new_tokens=tokens, max_new_tokens=tokens, do_sample=False, num_beams=1)
    seconds = time.perf_counter() - start
    if out.shape[-1] < tokens:  # the prompt may be returned too; never fewer tokens than asked
        raise RuntimeError(f"generate emitted {out.shape[-1]} tokens, asked for {tokens}")
    return seconds


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``: (a, b). One distinct x gives (y, 0)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def measure(models: dict[str, object], features_by_batch: dict[int, object], tokens: list[int], rounds: int,
            language: str, progress: bool = True) -> dict:
    """Median seconds per (model, batch, tokens), over ``rounds`` timed rounds after one untimed one."""
    from tqdm.auto import tqdm

    cells = [(m, b, n) for b in features_by_batch for n in tokens for m in models]
    times: dict[tuple, list[float]] = {c: [] for c in cells}
    bar = tqdm(total=(rounds + 1) * len(cells), desc="generate", unit="run", disable=not progress)
    for r in range(rounds + 1):
        for m, b, n in cells:
            seconds = generate_seconds(models[m], features_by_batch[b], n, language)
            if r:  # round 0 pays the one-off costs (allocator growth, kernel choice) untimed
                times[(m, b, n)].append(seconds)
            bar.update()
    bar.close()
    out = {}
    for m in models:
        out[m] = {}
        for b in features_by_batch:
            med = {n: statistics.median(times[(m, b, n)]) for n in tokens}
            fixed, per_token = fit_line([float(n) for n in tokens], [med[n] for n in tokens])
            out[m][str(b)] = {"seconds": {str(n): med[n] for n in tokens},
                              "all_seconds": {str(n): times[(m, b, n)] for n in tokens},
                              "fixed_s": fixed, "per_token_s": per_token}
    return out


def table(results: dict) -> str:
    """The Markdown table: seconds per length and model, each cut as a fraction of the base, the fitted costs."""
    names = list(results["models"])
    base = names[0]
    t = results["times"]
    label = {m: results["models"][m]["label"] for m in names}
    head = "| batch | output tokens | " + " | ".join(f"{label[m]} s" for m in names) + " |"
    md = [head, "|" + "---|" * (head.count("|") - 1)]

    def line(b, what, value, scale=1.0, digits=2):
        """One row: ``value(model)`` for each model (times ``scale``), the cuts also as a fraction of the base."""
        ref = value(base)
        cells = [f"{scale * value(m):.{digits}f}" + ("" if m == base else f" ({value(m) / ref:.2f}x)")
                 for m in names]
        return f"| {b} | {what} | " + " | ".join(cells) + " |"

    for b in map(str, results["batch_sizes"]):
        for n in map(str, results["tokens"]):
            md.append(line(b, n, lambda m: t[m][b]["seconds"][n]))
        md.append(line(b, "fixed cost (fit)", lambda m: t[m][b]["fixed_s"]))
        md.append(line(b, "per token, ms (fit)", lambda m: t[m][b]["per_token_s"], 1000.0, 1))
    layers = "; ".join(f"{label[m]}: decoder layers {results['models'][m]['layers']}" for m in names[1:])
    md.append(f"\nMedian of {results['rounds']} timed rounds (one untimed round first), greedy `generate` made to "
              f"emit exactly N tokens, language forced ({results['language']}), real clips of {results['data']} "
              f"padded to Whisper's 30 s window (their transcripts: {results['transcript_tokens_median']:g} tokens, "
              f"median); {layers}; {results['threads']} threads, {results['device']}. "
              f"Fixed cost and per-token cost: a straight line through each model's times. "
              f"Command: `{results['command']}`\n")
    return "\n".join(md)


def plot(results: dict, path: Path) -> None:
    """Seconds against output tokens, one line per model, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = results["batch_sizes"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.8), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for m, info in results["models"].items():
            ts = results["times"][m][str(b)]
            ax.plot(results["tokens"], [ts["seconds"][str(n)] for n in results["tokens"]], marker="o",
                    label=info["label"])
        ax.set_title(f"batch {b}")
        ax.set_xlabel("output tokens per clip")
        ax.set_ylabel("seconds per batch")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Decoding time against output length: where fewer decoder layers pay off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def clip_features(processor, data: str, language: str, count: int):
    """Log-mel features of the first ``count`` test clips of ``language`` in the corpus at ``data``, and the median
    length in tokens of that language's test transcripts (what a clip of this corpus asks of the decoder)."""
    from inference.evaluation import utterances_from_dataset
    from trainers.corpus.loading import load_corpus

    test = load_corpus(data)["test"]
    utts = utterances_from_dataset(test, [language], count)
    if len(utts) < count:
        raise SystemExit(f"{data} has {len(utts)} {language} test clips; --batch-sizes asks for {count}")
    texts = [t for t, lang in zip(test["text"], test["language"]) if lang == language]
    lengths = [len(processor.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    features = processor.feature_extractor([u.audio for u in utts], sampling_rate=16000,
                                           return_tensors="pt").input_features
    return features, statistics.median(lengths)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base", help="the base model the cuts are made from")
    p.add_argument("--decoder-layers", default="4,2", help="the cuts: decoder layers each keeps (default 4,2)")
    p.add_argument("--tokens", default="8,48,96,160", help="output lengths N, comma-separated")
    p.add_argument("--batch-sizes", default="1,16", help="clips per generate call, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one untimed round)")
    p.add_argument("--data", default="data/fillets", help="the real corpus (whisper-experts corpus fetch fillets)")
    p.add_argument("--language", default="cs", help="the clips' language, forced in decoding")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="cut_speed", help="results file stem (default cut_speed)")
    p.add_argument("--table-only", action="store_true", help="only rewrite the table and plot from the JSON")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / args.name
    if args.table_only:
        results = json.loads(stem.with_suffix(".json").read_text())
    else:
        if args.rounds < 1:
            raise SystemExit("--rounds must be at least 1")
        layer_counts = parse_ints(args.decoder_layers, "--decoder-layers")[::-1]
        tokens = parse_ints(args.tokens, "--tokens")
        batches = parse_ints(args.batch_sizes, "--batch-sizes")
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        from registry.bases import load_base

        base = load_base(args.base, device="cpu")
        limit = base.model.config.max_target_positions - 8
        if tokens[-1] > limit:
            raise SystemExit(f"--tokens goes up to {tokens[-1]}; {base.name} emits at most {limit} after its prompt")
        models = {"base": {"label": base.name, "layers": list(range(base.model.config.decoder_layers)),
                           "model": base.model.eval()}}
        for key, info in cuts(base.model, layer_counts).items():
            models[key] = {"label": f"{base.name}-{key}", **info}
        features, typical = clip_features(base.processor, args.data, args.language, batches[-1])
        times = measure({k: v["model"] for k, v in models.items()}, {b: features[:b] for b in batches}, tokens,
                        args.rounds, args.language)
        results = {"command": recorded(Path(__file__).name, argv, drop=("--table-only",)),
                   "models": {k: {"label": v["label"], "layers": v["layers"],
                                  "parameters": sum(q.numel() for q in v["model"].parameters())}
                              for k, v in models.items()},
                   "tokens": tokens, "batch_sizes": batches, "rounds": args.rounds, "language": args.language,
                   "data": args.data, "transcript_tokens_median": typical, "threads": torch.get_num_threads(),
                   "device": "CPU", "times": times}
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text(table(results))
    plot(results, stem.with_suffix(".png"))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
