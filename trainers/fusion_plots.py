"""Figures of fusion: the weight search's dev WER against the weights (:func:`plot_search`), and the cosine
similarity of experts' task vectors (:func:`write_similarity`, :func:`plot_similarity`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trainers.fusion import SearchResult, Trial, option_label


def search_panels(result: SearchResult, names: Sequence[str]) -> tuple[list[list[int]], list[str]]:
    """The panels of :func:`plot_search`: groups of expert indices whose weights moved together in every trial,
    and a note for each weight held fixed (at least one panel is always left)."""
    columns = [tuple(t.weights[i] for t in result.trials) for i in range(len(names))]
    panels: dict[tuple, list[int]] = {}
    fixed = []
    # An interpolation (weights summing to 1 in every trial) moves the target against the supports: one panel
    # for the supports says it all, the target's weight is named instead.
    soup = len(names) > 1 and len(set(columns[0])) > 1 and all(abs(sum(t.weights) - 1) < 1e-6 for t in result.trials)
    for i, col in enumerate(columns):
        if soup and i == 0:
            fixed.append(f"{names[0]} at 1 - the supports' weight")
        elif len(set(col)) == 1:
            fixed.append(f"{names[i]} fixed at {col[0]:g}")
        else:
            panels.setdefault(col, []).append(i)
    if not panels:  # nothing varied (one trial): show the first weight anyway
        return [[0]], fixed[1:]
    return list(panels.values()), fixed


def plot_search(result: SearchResult, names: Sequence[str], path: str, title: str = "") -> str:
    """PNG of dev WER against the weights: one panel per weight the search varied, the chosen trial marked.

    Experts whose weights moved together in every trial (a grid's pooled support weight) share a panel; a
    weight the search held fixed (the target's 1 in a grid) gets none and is named in the title instead.
    A shrinkage control (``result.control``: the target alone scaled) gets its own last panel, and its best
    dev WER is a dotted line across the search's panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, fixed = search_panels(result, names)
    # Searched method options (a density per run of the weight search): one curve per combination.
    # Labelled by the options that vary (density=0.5), not those every trial shares.
    keys = {k for t in result.trials for k in (t.options or {})}
    varying = [k for k in sorted(keys) if len({repr((t.options or {}).get(k)) for t in result.trials}) > 1]
    curves: dict[str, list[Trial]] = {}
    for t in result.trials:
        curves.setdefault(option_label({k: (t.options or {}).get(k) for k in varying}), []).append(t)
    if len(curves) == 1:
        curves = {"": result.trials}
    panels = len(groups) + bool(result.control)
    fig, axes = plt.subplots(1, panels, figsize=(max(7.0, 4.5 * panels), 3.6), squeeze=False, sharey=True)
    control = result.control_best
    for ax, group in zip(axes[0], groups):
        if control is not None:
            ax.axhline(100 * control.wer, color="grey", linestyle=":",
                       label=f"{names[0]} alone x {control.weights[0]:g} (best scaled)")
        for label, trials in curves.items():
            xs = [t.weights[group[0]] for t in trials]
            pairs = sorted(zip(xs, [100 * t.wer for t in trials]))
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], "o-" if len(set(xs)) == len(xs) else "o",
                    alpha=0.7, **({"label": label} if label else {}))
        best = {k: (result.best.options or {}).get(k) for k in varying}
        chosen = "chosen" + (f" ({option_label(best)})" if len(curves) > 1 else "")
        ax.plot([result.best.weights[group[0]]], [100 * result.best.wer], "r*", markersize=14, label=chosen)
        ax.set_xlabel("weight of " + " = ".join(names[i] for i in group))
        ax.grid(alpha=0.3)
    if control is not None:  # the shrinkage control: the target alone at each scale, no support
        ax = axes[0][-1]
        pairs = sorted((t.weights[0], 100 * t.wer) for t in result.control)
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], "s-", color="grey", alpha=0.8)
        ax.plot([control.weights[0]], [100 * control.wer], "k*", markersize=12, label="best scaled target")
        ax.set_xlabel(f"scale of {names[0]} alone (no support)")
        ax.set_title("shrinkage control", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("dev WER %")
    axes[0][0].legend()
    head = title or "fusion weight search"
    fig.suptitle(head + (f"\n({', '.join(fixed)})" if fixed else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_similarity(specs: Sequence[str], labels: Sequence[str], out: Path, stem: str,
                     registry: str | None = None, extra: dict | None = None):
    """Compare the experts named by ``specs`` (files or registry specs), write ``<out>/<stem>.json`` (``extra``
    first) and the heatmap ``<out>/<stem>.png``; what ``fuse --similarity`` and benchmarks/expert_similarity.py do.

    Returns:
        (the :class:`~lora_experts.similarity.Similarity`, the PNG's path or None without matplotlib).
    """
    import json

    from lora_experts.similarity import expert_similarity
    from registry.lookup import open_expert

    sim = expert_similarity([open_expert(spec, registry)[0] for spec in specs], list(labels))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({**(extra or {}), **sim.as_dict()}, indent=2))
    try:
        return sim, plot_similarity(sim, str(out / f"{stem}.png"))
    except ImportError:
        return sim, None


def plot_similarity(sim, path: str, title: str = "") -> str:
    """PNG heatmaps of a :class:`~lora_experts.similarity.Similarity`: encoder, decoder and all deltas, each
    cell's cosine written in it and each expert's delta norm on the diagonal (where the cosine is 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("encoder", "decoder", "all") if any(x > 0 for x in sim.norms[g])]
    n = len(sim.names)
    side = max(3.2, 0.75 * n + 1.2)
    fig, axes = plt.subplots(1, len(groups), figsize=(side * len(groups) + 1.5, side + 0.8), squeeze=False,
                             sharey=True, layout="constrained")
    for k, (ax, group) in enumerate(zip(axes[0], groups)):
        image = ax.imshow(sim.cosine[group], vmin=-1, vmax=1, cmap="RdBu_r")
        for i in range(n):
            for j in range(n):
                value = sim.cosine[group][i][j]
                text = ("–" if value != value else f"{value:.2f}") if i != j else f"|Δ|\n{sim.norms[group][i]:.2g}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if i == j else "black")
        ax.set_xticks(range(n), sim.names, rotation=45, ha="right", fontsize=8)
        if k == 0:
            ax.set_yticks(range(n), sim.names, fontsize=8)
        ax.set_title(f"{group} deltas")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="cosine")
    fig.suptitle(title or "cosine similarity of the experts' task vectors (diagonal: each delta's norm)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
