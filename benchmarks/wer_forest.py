"""Rows of one or more stored WER tables on one picture: each row's test WER with its 95% interval, and its paired
change against a reference row on the same clips (a forest plot). No decoding: it reads the stored per-utterance
counts, as ``paired_rows.py`` does.

Rows are named ``FILE.json:KEY``, optionally ``=LABEL`` (otherwise the row's own label); ``--against`` names the
reference. Prints the same figures as a markdown table, and draws the plot with ``--out``:

    R=benchmarks/results; K=clsr-lowrank-both-3-kd-attn-glr0.01-gb1-pdd
    python benchmarks/wer_forest.py --language nl --against "$R/real_distill_100.json:lora" \\
        "$R/real_distill_100.json:lora=LoRA, 100 labeled" "$R/real_distill_pseudo.json:$K=CLSR + KD, +200 unlabeled" \\
        --out "$R/real_kd_overview.png"

A row scored on other clips than the reference is refused (a paired change needs one test set).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paired_rows import RowError, Rows  # noqa: E402


def forest(rows: Rows, names: list[str], labels: list[str | None], against: str) -> list[dict]:
    """Each named row's WER, interval and paired change against ``against`` (fractions), in the order given."""
    from inference.evaluation import paired_comparison

    out = []
    for name, label in zip(names, labels):
        rows.same_clips(against, name)
        scores = rows.scores(name)
        change = None if name == against else next(iter(paired_comparison(rows.scores(against), scores).values()))
        out.append({"name": name, "label": label or rows.row(name).get("label", name), "wer": scores["wer"],
                    "ci95": scores.get("wer_ci95"), "change": change, "n": len(scores["utterances"])})
    return out


def verdict(change: dict | None) -> str:
    """``reference`` (no change), ``better`` / ``worse`` (the paired interval lies wholly below / above zero), or
    ``level`` (it holds zero)."""
    if change is None:
        return "reference"
    low, high = change["ci95"]
    return "better" if high < 0 else "worse" if low > 0 else "level"


def markdown(points: list[dict], language: str, reference: str) -> str:
    from inference.confidence import format_change, format_ci

    lines = [f"| row | {language} WER % [95% CI] | vs {reference} [paired 95% CI] |", "|---|---|---|"]
    lines += [f"| {p['label']} | {format_ci(p['wer'], p['ci95'])} | {format_change(p['change']) or '–'} |"
              for p in points]
    return "\n".join(lines) + f"\n\nTest WER % (normalized) on the same {points[0]['n']} {language} utterances.\n"


def plot(points: list[dict], path: str, language: str, reference: str, title: str | None = None) -> str:
    """PNG: one line per row, its WER as a dot and its 95% interval as a bar; the reference's WER dashed; green
    where the paired interval lies wholly below zero (better than the reference), red wholly above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inference.confidence import format_change

    fig, ax = plt.subplots(figsize=(9, 0.42 * len(points) + 1.5))
    for i, p in enumerate(points):
        low, high = p["ci95"] or (p["wer"], p["wer"])
        c = p["change"]
        color = {"reference": "black", "better": "tab:green", "worse": "tab:red", "level": "grey"}[verdict(c)]
        ax.errorbar(100 * p["wer"], i, xerr=[[100 * (p["wer"] - low)], [100 * (high - p["wer"])]], fmt="o",
                    color=color, capsize=3)
        ax.annotate(f"{100 * p['wer']:.1f}  {format_change(c) or 'reference'}", (1.01, i),
                    xycoords=("axes fraction", "data"), va="center", fontsize=8)
    ref = next((p for p in points if p["change"] is None), None)
    if ref is not None:
        ax.axvline(100 * ref["wer"], color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(points)), [p["label"] for p in points], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{language} test WER % on {points[0]['n']} utterances, 95% interval "
                  f"(right: paired change against {reference})")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", metavar="FILE.json:KEY[=LABEL]", help="the rows to show, top to bottom")
    p.add_argument("--language", required=True, help="the test language")
    p.add_argument("--against", required=True, metavar="FILE.json:KEY",
                   help="the reference row every other is compared with (paired, on the same clips)")
    p.add_argument("--out", help="write the plot to this PNG")
    p.add_argument("--title", help="the plot's title")
    args = p.parse_args(argv)
    names, labels = zip(*((r.split("=", 1) + [None])[:2] for r in args.rows))
    rows = Rows(None, args.language)
    try:
        points = forest(rows, list(names), list(labels), args.against)
    except RowError as e:
        p.error(str(e))
    reference = next((p["label"] for p in points if p["name"] == args.against), None) or args.against
    print(markdown(points, args.language, reference), end="")
    if args.out:
        print(f"plot: {plot(points, args.out, args.language, reference, args.title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
