"""Does a support's cosine with the target foretell what fusing it gains? (issue 16, item 3)

    python benchmarks/fusion_similarity.py                 # every results/real_fusion*.json with its experts here
    python benchmarks/fusion_similarity.py --results real_fusion_cs_twin_soup,real_fusion_cs_ru_soup

Reads the results files of benchmarks/real_fusion.py and finds their experts again: each expert named in a file
is ``<runs>/<name>.safetensors`` (``--runs`` as the recorded command gave it, default runs/real-fusion), a
``LANG=FILE`` support is its FILE. The cosine of the target's task vector with the supports' (summed at equal
weights, the direction both the grid and the interpolation search move along; in the group the run fused:
decoder deltas for ``--support-scope decoder``) and the norm ratio |supports| / |target| are set beside what the
run measured: each support alone on the target's test clips, the best validation change the weight search
found, and the fused expert's test change, all against the target alone (paired 95% intervals).

Writes ``<out>/<name>.{json,md}``, the scatter ``<out>/<name>.png`` (best validation change against the cosine)
and the heatmap of every expert found ``<out>/<name>_matrix.{json,png}``. A results file whose experts are not on
this machine is listed as missing (retrain them with the command it records). Nothing is decoded: seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded, recorded_option  # noqa: E402
from benchmarks.real_fusion import parse_supports  # noqa: E402


def expert_files(results: dict, runs_default: str = "runs/real-fusion") -> dict[str, Path]:
    """Every expert a real_fusion results file names (target first) -> where it is stored, from its command."""
    names = results.get("names") or list(results["rows"]["fused"]["weights"])
    runs = recorded_option(results["command"], "--runs", runs_default)
    given = {f"{lang}-{Path(path).stem}": Path(path)
             for lang, kind, path in parse_supports(recorded_option(results["command"], "--supports", ""))
             if kind == "file"}
    return {name: given.get(name, Path(runs) / f"{name}.safetensors") for name in names}


def pooled_cosine(gram: list[list[float]], target: int, supports: list[int]) -> float:
    """cos(t, s1 + s2 + ...) from the Gram matrix of inner products."""
    inner = sum(gram[target][j] for j in supports)
    norm_s = math.sqrt(max(0.0, sum(gram[i][j] for i in supports for j in supports)))
    norm_t = math.sqrt(gram[target][target])
    return inner / (norm_t * norm_s) if norm_t > 0 and norm_s > 0 else float("nan")


def gram_matrix(sim, group: str) -> list[list[float]]:
    """Inner products <v_i, v_j> of one group from a Similarity's cosines and norms (0 where a side is empty)."""
    cos, norms = sim.cosine[group], sim.norms[group]
    return [[0.0 if cos[i][j] != cos[i][j] else cos[i][j] * norms[i] * norms[j] for j in range(len(norms))]
            for i in range(len(norms))]


def paired(results: dict, name: str) -> dict | None:
    from inference.evaluation import paired_comparison

    rows = results["rows"]
    if name not in rows:
        return None
    return next(iter(paired_comparison(rows[results["target_expert"]], rows[name]).values()), None)


def measure(stems: list[str], out: Path, name: str,
            registry: str | None = None) -> tuple[list[dict], list[str], object]:
    """One row per results file; the experts found and their Similarity (None when fewer than two are here)."""
    from trainers.fusion_plots import write_similarity

    loaded = []
    for stem in stems:
        results = json.loads((out / f"{stem}.json").read_text())
        if "rows" in results:
            loaded.append((stem, results, expert_files(results)))
    files = {}
    for _, _, found in loaded:
        files.update({name: path for name, path in found.items() if path.is_file()})
    labels = list(files)
    sim = (write_similarity([str(p) for p in files.values()], labels, out, f"{name}_matrix", registry)[0]
           if len(labels) >= 2 else None)
    rows = []
    for stem, results, found in loaded:
        names = list(found)
        target, supports = names[0], names[1:]
        scope = results.get("support_scope", "all")
        group = "decoder" if scope == "decoder" else "all"
        missing = [n for n in names if n not in files]
        row = {"results": stem, "target": target, "supports": supports, "scope": scope,
               "search": _search(results["command"]), "missing": missing}
        if not missing and sim is not None:
            idx = [labels.index(n) for n in names]
            for g in ("all", "encoder", "decoder"):
                row[f"cosine_{g}"] = pooled_cosine(gram_matrix(sim, g), idx[0], idx[1:])
            gram = gram_matrix(sim, group)
            row["cosine"] = row[f"cosine_{group}"]
            norm_s = math.sqrt(max(0.0, sum(gram[i][j] for i in idx[1:] for j in idx[1:])))
            row["norm_ratio"] = norm_s / math.sqrt(gram[idx[0]][idx[0]])
        dev = results["dev_wer"]["target_only"]
        mixed = [t for t in results["trials"] if any(w != 0 for w in t["weights"][1:])]
        if mixed and dev is not None:  # the support's best showing (None: --search fixed, no target-alone trial)
            best = min(mixed, key=lambda t: t["wer"])
            row["dev_change"], row["dev_weights"] = best["wer"] / dev - 1, best["weights"]
        row["weights"] = results["rows"]["fused"]["weights"]
        row["chose_target"] = all(w == 0 for w in list(row["weights"].values())[1:])
        row["alone"] = {s: paired(results, s) for s in supports}
        row["fused"] = paired(results, "fused")
        rows.append(row)
    return rows, labels, sim


def _search(command: str) -> str:
    return recorded_option(command, "--search", "bayes")


def table(rows: list[dict], command: str) -> str:
    from inference.confidence import format_change

    def cos(row, g):
        value = row.get(f"cosine_{g}")
        return "–" if value is None or value != value else f"{value:+.3f}"

    md = ["| results | target | supports (scope) | cosine all / enc / dec | norm ratio | support alone on the "
          "target's test | validation, the best weights with the support | the search's choice on test |",
          "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["target"], -(r.get("cosine") or -2))):
        sup = ", ".join(r["supports"]) + ("" if r["scope"] == "all" else f" ({r['scope']})")
        sims = ("missing: " + ", ".join(r["missing"])) if r["missing"] else " / ".join(
            cos(r, g) for g in ("all", "encoder", "decoder"))
        ratio = f"{r['norm_ratio']:.2f}" if "norm_ratio" in r else "–"
        alone = "; ".join(format_change(c) or "–" for c in r["alone"].values())
        dev = ("weights fixed beforehand" if r["search"] == "fixed" else "–" if "dev_change" not in r
               else f"{100 * r['dev_change']:+.1f}% at ("
               + ", ".join(f"{w:.2f}" for w in r["dev_weights"]) + f"), {r['search']} search")
        chosen = "the target alone" if r["chose_target"] else format_change(r["fused"]) or "–"
        md.append(f"| {r['results']} | {r['target']} | {sup} | {sims} | {ratio} | {alone} | {dev} | {chosen} |")
    md.append("\nCosine: the target's task vector against the supports' sum (in the fused group); norm ratio: "
              "|supports| / |target|. Validation: the lowest WER among the search's trials that give the supports "
              "any weight (weights target first), against the target alone on the search's own clips. Test "
              "changes are relative to the target expert alone on the same clips (paired 95% intervals in WER "
              f"points). Command: `{command}`\n")
    return "\n".join(md)


def plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    colors = {"cs": "tab:blue", "nl": "tab:orange"}
    for r in rows:
        if r.get("cosine") is None or r["cosine"] != r["cosine"] or "dev_change" not in r:
            continue
        marker = {"interpolate": "s", "grid": "o"}.get(r["search"], "^")
        lang = r["target"].split("-")[0]
        ax.scatter(r["cosine"], 100 * r["dev_change"], marker=marker, color=colors.get(lang, "tab:gray"), s=45)
        # a LANG=FILE support is named LANG-<file stem>: cs-cs-rest-100 reads cs-rest-100
        label = "+".join(s[len(lang) + 1:] if s.startswith(f"{lang}-{lang}-") else s for s in r["supports"])
        ax.annotate(f"{label} ({r['search']}{', dec' if r['scope'] == 'decoder' else ''})",
                    (r["cosine"], 100 * r["dev_change"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.margins(x=0.2)
    ax.axhline(-10, color="tab:red", ls="--", lw=1, label="goal: -10%")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("cosine(target, supports) of the fused deltas")
    ax.set_ylabel("validation WER change vs the target alone (%),\nbest weights that use the supports")
    ax.set_title("support-language fusion on real speech: similarity against gain\n"
                 "(circles: grid search, squares: interpolation; blue: Czech target, orange: Dutch)", fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", help="results file stems in --out, comma-separated (default every real_fusion*)")
    p.add_argument("--registry", help="registry for specs (default <home>/registry)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="fusion_similarity", help="results file stem (default fusion_similarity)")
    args = p.parse_args(argv)

    out = Path(args.out)
    stems = ([s.strip() for s in args.results.split(",") if s.strip()] if args.results
             else sorted(f.stem for f in out.glob("real_fusion*.json")))
    if not stems:
        p.error(f"no real_fusion*.json in {out} (made by benchmarks/real_fusion.py)")
    for stem in stems:
        if not (out / f"{stem}.json").is_file():
            p.error(f"--results {stem}: no {out / stem}.json (made by benchmarks/real_fusion.py --name {stem})")
    command = recorded(Path(__file__).name, argv)
    rows, labels, _ = measure(stems, out, args.name, args.registry)
    (out / f"{args.name}.json").write_text(json.dumps({"command": command, "experts": labels, "rows": rows},
                                                      indent=2))
    md = table(rows, command)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    png = plot(rows, out / f"{args.name}.png")
    print(f"plot: {png}" if png else "(no plot: pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
