"""How alike the experts of the fusion tables are: cosine similarity of their task vectors (issue 16, item 3).

    python benchmarks/expert_similarity.py --experts \\
        cs-real-100=runs/real-fusion/cs-real-100.safetensors,cs-rest-100=runs/real/cs-rest-100.safetensors

Each ``LABEL=FILE`` (or a registry spec: ``LABEL=cs-real@2``) is read as ``fuse --similarity`` reads it; the
cosines of every pair (``lora_experts.similarity``: encoder deltas, decoder deltas, all) and each delta's
Frobenius norm are written to ``<out>/<name>.{json,md}`` with the heatmap ``<out>/<name>.png``. Nothing is decoded:
seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402


def parse_experts(text: str) -> list[tuple[str, str]]:
    """``"a=x.safetensors,b=cs-real@2"`` -> ``[("a", "x.safetensors"), ("b", "cs-real@2")]``."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        label, sep, spec = item.partition("=")
        if not sep or not label or not spec:
            raise SystemExit(f"--experts: {item!r} is not LABEL=FILE or LABEL=SPEC")
        out.append((label, spec))
    if len(out) < 2:
        raise SystemExit("--experts: give at least two LABEL=FILE items to compare")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", required=True, help="LABEL=FILE (or LABEL=registry spec), comma-separated")
    p.add_argument("--registry", help="registry for specs (default <home>/registry)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="expert_similarity", help="results file stem (default expert_similarity)")
    args = p.parse_args(argv)

    from trainers.fusion_plots import write_similarity

    items = parse_experts(args.experts)
    command = recorded(Path(__file__).name, argv)
    out = Path(args.out)
    sim, png = write_similarity([spec for _, spec in items], [label for label, _ in items], out, args.name,
                                args.registry, {"command": command, "experts": dict(items)})
    md = "\n\n".join(sim.markdown(g) for g in ("all", "decoder", "encoder"))
    md += (f"\n\nCosine similarity of the experts' task vectors (each LoRA delta `scale * B @ A`, summed over the "
           f"modules of the group; 1 on the diagonal), and each delta's Frobenius norm. Command: `{command}`\n")
    (out / f"{args.name}.md").write_text(md)
    print(md)
    print(f"plot: {png}" if png else "(no plot: pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
