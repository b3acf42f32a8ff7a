"""Is a fusion gain larger than the target's seed-to-seed spread? (issue 16, item 3)

    python benchmarks/seed_spread.py          # real_fusion_cs_twin_seed0, _seed1, _seed2: seconds, nothing decoded
    python benchmarks/seed_spread.py --results real_fusion_cs_twin_seed0,real_fusion_cs_twin_seed1 --name twin2

A 100-clip expert is one draw: retrained with another seed on the same clips, its test WER moved 5% (session 32),
as much as the best fusion gain. This reads ``benchmarks/real_fusion.py`` results of one target trained with
several seeds (``--target-seed``) and fused with the same supports at the same weights fixed beforehand
(``--search fixed --weights``), all scored on the same test clips, made for example by

    python benchmarks/real_fusion.py --target-seed 1 --supports cs=runs/real/cs-rest-100.safetensors \\
        --search fixed --weights 0.6,0.4 --name real_fusion_cs_twin_seed1

and writes ``<out>/<name>.{md,json,png}``:

* per seed, the target alone and the fused expert (WER with its 95% interval) and the fused expert's paired change;
* each seed's target against the first one's: the spread one draw of the target carries;
* over the seeds: per clip, the word errors averaged over the seeds, the target's against the fused expert's,
  with a paired bootstrap over clips (the clips are the sample, the seeds averaged out). This is the comparison
  that says whether fusing helps this recipe, not one lucky or unlucky draw of it;
* where every run has the shrinkage control ``--control`` names (``real_fusion.py --scaled-target``: the target
  alone scaled, ``matched`` at the fused expert's own step along the target, ``scaled`` at the scale each seed's
  validation clips chose), that control per seed and over the seeds, and the fused expert against it: what the
  supports add beyond a smaller step of the target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded, recorded_option  # noqa: E402

DEFAULT = "real_fusion_cs_twin_seed0,real_fusion_cs_twin_seed1,real_fusion_cs_twin_seed2"


def target_seed(results: dict) -> int:
    """The ``--target-seed`` a results file's recorded command ran with (0 when it gave none)."""
    return int(recorded_option(results["command"], "--target-seed", "0"))


def averaged(rows: list[dict]) -> dict:
    """One row whose per-clip word errors are the mean over ``rows`` (the same clips in each)."""
    first = rows[0]["utterances"]
    by_id = [{(u["language"], u["id"]): u for u in r["utterances"]} for r in rows]
    utts = [{**u, "word_errors": sum(b[(u["language"], u["id"])]["word_errors"] for b in by_id) / len(rows)}
            for u in first]
    return {"wer": sum(u["word_errors"] for u in utts) / sum(u["words"] for u in utts), "utterances": utts}


def clips(row: dict) -> set:
    """The (language, id) of every clip a results row scored."""
    return {(u["language"], u["id"]) for u in row["utterances"]}


def finished_results(out: Path, stem: str, make: str) -> dict:
    """``<out>/<stem>.json`` of a finished ``real_fusion.py`` run; refused by path when missing (``make``: the
    command that makes it) or unfinished."""
    path = out / f"{stem}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no such results file (make it with {make})")
    res = json.loads(path.read_text())
    if "rows" not in res:
        raise SystemExit(f"{path}: its run has not finished (no test rows)")
    return res


def load(stems: list[str], out: Path, control: str = "matched") -> list[dict]:
    """The results files, one per seed: target row, fused row, weights; refused unless all score the same clips
    with the same supports at the same weights."""
    runs = []
    for stem in stems:
        res = finished_results(out, stem, "benchmarks/real_fusion.py --target-seed N --search fixed --weights ... "
                               f"--name {stem}")
        target = res["rows"][res["target_expert"]]
        fused = res["rows"]["fused"]
        runs.append({"results": stem, "seed": target_seed(res), "target_expert": res["target_expert"],
                     "target": target, "fused": fused, "weights": list(fused["weights"].values()),
                     "scaled": res["rows"].get(control),
                     "supports": list(fused["weights"])[1:], "language": res["target"],
                     # weights a search of this run chose (on validation clips), not given with --search fixed
                     "searched": "--search fixed" not in res.get("command", "")})
    first = runs[0]
    for run in runs[1:]:
        if any(clips(row) != clips(first["target"]) for row in (run["target"], run["fused"], run["scaled"] or
                                                                  first["target"])):
            raise SystemExit(f"{run['results']} scored other test clips than {first['results']}: seeds compare only "
                             "on the same clips")
        if run["supports"] != first["supports"] or run["weights"] != first["weights"]:
            raise SystemExit(f"{run['results']} fused {run['supports']} at {run['weights']}, {first['results']} "
                             f"{first['supports']} at {first['weights']}: give runs of one fusion recipe")
    if len({r["seed"] for r in runs}) != len(runs):
        raise SystemExit("two results files ran with the same --target-seed: give one per seed")
    return runs


def measure(runs: list[dict]) -> dict:
    from inference.evaluation import paired_comparison

    def change(a, b):
        return next(iter(paired_comparison(a, b).values()))

    per_seed = [{"results": r["results"], "seed": r["seed"], "target_expert": r["target_expert"],
                 "target_wer": r["target"]["wer"], "target_ci95": r["target"].get("wer_ci95"),
                 "fused_wer": r["fused"]["wer"], "fused_ci95": r["fused"].get("wer_ci95"),
                 "fused_vs_target": change(r["target"], r["fused"]),
                 "target_vs_first": None if i == 0 else change(runs[0]["target"], r["target"])}
                for i, r in enumerate(runs)]
    mean_target, mean_fused = averaged([r["target"] for r in runs]), averaged([r["fused"] for r in runs])
    control = None
    if all(r["scaled"] for r in runs):  # the shrinkage control, its scale chosen on each seed's validation clips
        for s, r in zip(per_seed, runs):
            s.update(control_scale=r["scaled"].get("scale"), control_wer=r["scaled"]["wer"],
                     control_ci95=r["scaled"].get("wer_ci95"), fused_vs_control=change(r["scaled"], r["fused"]))
        mean_control = averaged([r["scaled"] for r in runs])
        control = {"control_label": runs[0]["scaled"]["label"].split("(")[-1].rstrip(")")}
        control.update({"control_wer": mean_control["wer"], "control_vs_target": change(mean_target, mean_control),
                   "fused_vs_control": change(mean_control, mean_fused)})
    return {"language": runs[0]["language"], "supports": runs[0]["supports"], "weights": runs[0]["weights"],
            "searched_by": [r["seed"] for r in runs if r["searched"]],
            "n": len(runs[0]["target"]["utterances"]), "per_seed": per_seed,
            "mean": {"target_wer": mean_target["wer"], "fused_wer": mean_fused["wer"],
                     "fused_vs_target": change(mean_target, mean_fused), **(control or {})}}


def table(m: dict, command: str) -> str:
    from inference.confidence import format_change, format_ci

    mean = m["mean"]
    ctl = "control_wer" in mean  # the shrinkage control in every run
    md = ["| target seed | target alone: test WER % [95% CI] | its change against the first seed's | fused: test WER % "
          "[95% CI] | fused against its target [paired 95% CI] |"
          + (" control: the target scaled (scale), test WER % | fused against the control [paired 95% CI] |"
             if ctl else ""), "|---|---|---|---|---|" + ("---|---|" if ctl else "")]
    for s in m["per_seed"]:
        md.append(f"| {s['seed']} ({s['target_expert']}) | {format_ci(s['target_wer'], s['target_ci95'])} | "
                  f"{format_change(s['target_vs_first']) or '–'} | {format_ci(s['fused_wer'], s['fused_ci95'])} | "
                  f"{format_change(s['fused_vs_target'])} |"
                  + (f" ({s['control_scale']:g}) {format_ci(s['control_wer'], s['control_ci95'])} | "
                     f"{format_change(s['fused_vs_control'])} |" if ctl else ""))
    md.append(f"| **mean of {len(m['per_seed'])} seeds** | {100 * mean['target_wer']:.1f} | – | "
              f"{100 * mean['fused_wer']:.1f} | **{format_change(mean['fused_vs_target'])}** |"
              + (f" {100 * mean['control_wer']:.1f} ({format_change(mean['control_vs_target'])} against the "
                 f"target) | **{format_change(mean['fused_vs_control'])}** |" if ctl else ""))
    spread = [s["target_wer"] for s in m["per_seed"]]
    weights = ", ".join(f"{w:.2f}" for w in m["weights"])
    searched = m.get("searched_by") or []
    chosen = (f"chosen by seed {', '.join(map(str, searched))}'s search on validation clips and fixed for the other "
              "seeds" if searched else "fixed beforehand")
    md.append(f"\nTest: {m['n']} real {m['language']} clips, the same for every row. Fused: the target with "
              f"{', '.join(m['supports'])} at weights ({weights}), {chosen} (target first). The target "
              f"alone spans {100 * min(spread):.1f} to {100 * max(spread):.1f} over the seeds. Mean row: per clip, "
              "the word errors averaged over the seeds, paired bootstrap over clips. "
              + ("Control: the target alone scaled, nothing added (`real_fusion.py --scaled-target`); its scale "
                 f"per seed: {mean.get('control_label', '')}. " if ctl else "")
              + f"Command: `{command}`\n")
    return "\n".join(md)


def plot(m: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ctl = "control_wer" in m["mean"]
    keys = ["target_wer"] + (["control_wer"] if ctl else []) + ["fused_wer"]
    xs = list(range(len(keys)))
    for s in m["per_seed"]:
        ax.plot(xs, [100 * s[k] for k in keys], "o-", label=f"seed {s['seed']}")
    ax.plot(xs, [100 * m["mean"][k] for k in keys], "ks--", lw=2, label="mean of the seeds")
    ax.set_xticks(xs, ["target alone"] + (["target scaled\n(control)"] if ctl else []) + ["fused"])
    ax.set_xlim(-0.3, xs[-1] + 0.3)
    ax.set_ylabel("test WER %")
    ax.set_title(f"{m['language']}: the target per seed, alone and fused\nwith {', '.join(m['supports'])}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=DEFAULT,
                   help="real_fusion.py results stems, one per target seed, comma-separated (default: "
                        "the Czech target with the Czech twin at seeds 0, 1, 2)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where the results files are")
    p.add_argument("--name", default="seed_spread", help="output stem (default seed_spread)")
    p.add_argument("--control", default="matched", choices=["matched", "scaled"],
                   help="the shrinkage control compared, where every run has it (real_fusion.py --scaled-target): "
                        "matched, the target at the fused expert's own step (default), or scaled, at the scale "
                        "validation chose")
    args = p.parse_args(argv)
    stems = [s.strip() for s in args.results.split(",") if s.strip()]
    if len(stems) < 2:
        p.error("--results: give at least two results files (one per target seed)")
    out = Path(args.out)
    m = measure(load(stems, out, args.control))
    md = table(m, recorded(Path(__file__).name, argv))
    (out / f"{args.name}.json").write_text(json.dumps(m, indent=2))
    (out / f"{args.name}.md").write_text(md)
    plot(m, out / f"{args.name}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
