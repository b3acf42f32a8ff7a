"""Several fusion recipes of one target side by side: which merge method and options help most? (issue 16, item 3)

    python benchmarks/fusion_variants.py --results real_fusion_cs_synth,real_fusion_cs_synth_ties,\\
real_fusion_cs_synth_ties_d05 --name fusion_variants_cs_synth            # seconds, nothing decoded

Reads ``benchmarks/real_fusion.py`` results of one target expert (the same ``target_expert``, the same test
clips), each fused another way (``--method``, ``--option``, ``--search``), and writes ``<out>/<name>.{md,json,png}``:

* per run, the recipe (method, the chosen options and weights), validation WER of the target alone and of the
  chosen fusion, test WER with its 95% interval, and the paired change against the target alone on the test clips;
* the plot: validation WER against the supports' pooled weight, one curve per run (per option value, for a run
  that searched its options), each run's choice starred: how the recipes compare over the whole search, not only
  at their picks.

Every row is the run's own choice on validation clips; the test clips only score it. A recipe picked because its
test row is the best of several would be chosen on test clips: pick by the validation column.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402
from benchmarks.seed_spread import clips, finished_results  # noqa: E402


def recipe(res: dict) -> str:
    """``ties density=0.5, grid``: the run's method, its chosen options and its search, from its results file."""
    from benchmarks.command import recorded_option
    from trainers.fusion import Trial, best_trial, option_label

    command = res.get("command", "")
    method = recorded_option(command, "--method", "linear")
    trials = res.get("trials", [])
    fused = res["rows"]["fused"]
    options = best_trial([Trial(**t) for t in trials]).options if trials else None
    if options is None:  # a run from before trials kept their options: as given on its command line
        from trainers.cli.fuse import parse_options

        argv = shlex.split(command)
        options = parse_options([b for a, b in zip(argv, argv[1:]) if a == "--option"])
    searched = len({option_label(t.get("options")) for t in trials}) > 1
    scope = recorded_option(command, "--support-scope", "all")
    return (method + (f" {option_label(options)}" if options else "") + (" (searched)" if searched else "")
            + f", {recorded_option(command, '--search', 'bayes')}"
            + ("" if scope == "all" else f", supports' {scope} only")
            + (": the target alone" if fused["label"].endswith("the target alone") else ""))


def load(stems: list[str], out: Path) -> list[dict]:
    """The results files; refused unless all fuse the same target expert and score the same test clips."""
    runs = []
    for stem in stems:
        res = finished_results(out, stem, f"benchmarks/real_fusion.py --name {stem}")
        runs.append({"results": stem, **res})
    first = runs[0]
    for run in runs[1:]:
        if run["target_expert"] != first["target_expert"]:
            raise SystemExit(f"{run['results']} fused target {run['target_expert']}, {first['results']} "
                             f"{first['target_expert']}: recipes compare only on one target expert")
        if clips(run["rows"][run["target_expert"]]) != clips(first["rows"][first["target_expert"]]):
            raise SystemExit(f"{run['results']} scored other test clips than {first['results']}: recipes compare "
                             "only on the same clips")
    return runs


def measure(runs: list[dict], against: str | None = None) -> dict:
    """Per run its recipe, choice and paired change against the target alone (and against the fused row of run
    ``against``, a control, when given)."""
    from inference.evaluation import paired_comparison

    control = None
    if against is not None:
        found = [r for r in runs if r["results"] == against]
        if not found:
            raise SystemExit(f"--against {against}: not one of --results ({', '.join(r['results'] for r in runs)})")
        control = found[0]["rows"]["fused"]
    rows = []
    for run in runs:
        target, fused = run["rows"][run["target_expert"]], run["rows"]["fused"]
        versus = (None if control is None or run["results"] == against
                  else next(iter(paired_comparison(control, fused).values())))
        rows.append({"results": run["results"], "recipe": recipe(run), "supports": list(fused["weights"])[1:],
                     "weights": list(fused["weights"].values()),
                     "dev_target": run["dev_wer"]["target_only"], "dev_fused": run["dev_wer"]["fused"],
                     "target_wer": target["wer"], "wer": fused["wer"], "wer_ci95": fused.get("wer_ci95"),
                     "vs_target": next(iter(paired_comparison(target, fused).values())), "vs_control": versus,
                     "curves": curves(run)})
    target = runs[0]["rows"][runs[0]["target_expert"]]
    return {"language": runs[0]["target"], "target_expert": runs[0]["target_expert"], "n": target["n"],
            "against": against,
            "target_wer": target["wer"], "target_ci95": target.get("wer_ci95"), "runs": rows}


def curves(run: dict) -> dict[str, list[list[float]]]:
    """Option label -> [[pooled support weight, validation WER], ...] of a run's search trials."""
    from trainers.fusion import option_label

    out: dict[str, list[list[float]]] = {}
    for t in run.get("trials", []):
        out.setdefault(option_label(t.get("options")), []).append([sum(t["weights"][1:]), t["wer"]])
    return out


def table(m: dict, command: str) -> str:
    from inference.confidence import format_change, format_ci

    against = m.get("against")
    extra = f" vs {against} [paired 95% CI] |" if against else ""
    md = ["| recipe | supports at weights (target first) | validation WER %: target alone -> fused | test WER %: "
          "target alone | fused [95% CI] | vs the target alone [paired 95% CI] |" + extra + " results |",
          "|---|---|---|---|---|---|" + ("---|" if against else "") + "---|"]
    for r in m["runs"]:
        before = "–" if r["dev_target"] is None else f"{100 * r['dev_target']:.1f}"
        weights = ", ".join(f"{w:.2f}" for w in r["weights"])
        versus = format_change(r["vs_control"]) if r.get("vs_control") else "–"
        control = f" {versus} |" if against else ""
        md.append(f"| {r['recipe']} | {', '.join(r['supports'])} at ({weights}) | {before} -> "
                  f"{100 * r['dev_fused']:.1f} | {100 * r['target_wer']:.1f} | {format_ci(r['wer'], r['wer_ci95'])} | "
                  f"{format_change(r['vs_target'])} |{control} {r['results']} |")
    retrained = len({r["target_wer"] for r in m["runs"]}) > 1
    note = (f" The target expert ({m['target_expert']}) was retrained between some runs (same clips and seed; its "
            "test WER differs slightly): each change is against its own run's target." if retrained else "")
    md.append(f"\nTest: {m['n']} real {m['language']} clips, the same for every row; each row is its run's choice on "
              "validation clips (a grid's weights, a searched option's value; a `fixed` row's weights were given "
              "beforehand), the test clips only score it."
              f"{note} Command: `{command}`\n")
    return "\n".join(md)


def plot(m: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in m["runs"]:
        # The recipe without its search: "ties density=1.0, supports' decoder only"
        parts = r["recipe"].split(": ")[0].split(", ")
        rest = "".join(f", {x}" for x in parts[2:])
        for label, points in r["curves"].items():
            if len(points) < 2:
                continue
            points = sorted(points)
            name = parts[0] + rest if len(r["curves"]) == 1 else f"{parts[0].split(' ')[0]} {label}{rest}"
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", alpha=0.75, label=name)
        ax.plot([sum(r["weights"][1:])], [100 * r["dev_fused"]], "*", markersize=13, color="red")
    ax.set_xlabel("weight of the supports (pooled)")
    ax.set_ylabel("validation WER %")
    ax.set_title(f"{m['language']} ({m['target_expert']}): validation WER by recipe (red stars: each run's choice)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="real_fusion.py results stems of one target, comma-separated")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where the results files are")
    p.add_argument("--name", default="fusion_variants", help="output stem (default fusion_variants)")
    p.add_argument("--against", help="one of --results, a control: every other fused row's paired change against "
                                     "its fused row too (same clips)")
    args = p.parse_args(argv)
    stems = [s.strip() for s in args.results.split(",") if s.strip()]
    if len(stems) < 2:
        p.error("--results: give at least two results files (one per recipe)")
    out = Path(args.out)
    m = measure(load(stems, out), args.against)
    md = table(m, recorded(Path(__file__).name, argv))
    (out / f"{args.name}.json").write_text(json.dumps(m, indent=2))
    (out / f"{args.name}.md").write_text(md)
    plot(m, out / f"{args.name}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
