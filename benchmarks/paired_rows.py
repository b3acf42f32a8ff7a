"""Paired comparisons between any two rows of a stored WER table (a benchmark's results JSON).

The tables print some pairs themselves (KD against its twin, soft gates against hard); this prints any other
pair, on the same held-out utterances, as the tables do: relative change and the paired-bootstrap 95% interval
in WER points (``inference.evaluation.paired_comparison``). No decoding: it reads the stored per-utterance counts.

    python benchmarks/paired_rows.py benchmarks/results/real_distill.json --language nl \\
        clsr-lowrank-both-3-pdd clsr-lowrank-both-3-glr0.01-pdd   # B against A: negative = B better

A row of another table on the same test clips is named ``OTHER.json:KEY`` (refused unless both rows scored the
same utterances):

    python benchmarks/paired_rows.py benchmarks/results/real_distill_pseudo.json --language nl \\
        benchmarks/results/real_distill_100.json:clsr-lowrank-both-3-attn-glr0.01-gb1-pdd \\
        clsr-lowrank-both-3-kd-attn-glr0.01-gb1-pdd
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from inference.confidence import format_change
    from inference.evaluation import paired_comparison

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a results JSON with rows[KEY]['test'][LANGUAGE] holding per-utterance counts")
    p.add_argument("--language", required=True, help="the test language to compare on")
    p.add_argument("rows", nargs="+", metavar="A B", help="pairs of row keys: B is compared against A; a row of "
                   "another table on the same test clips as OTHER.json:KEY")
    args = p.parse_args(argv)
    if len(args.rows) % 2:
        p.error("give the row keys in pairs: A B [A B ...]")
    tables: dict[str, dict] = {}

    def row(name: str) -> dict:
        """``KEY`` of the results file, or ``OTHER.json:KEY`` of another one: its test scores on the language."""
        path, key = name.rsplit(":", 1) if ".json:" in name else (args.results, name)
        if path not in tables:
            try:
                tables[path] = json.loads(Path(path).read_text())["rows"]
            except (OSError, ValueError, KeyError) as e:
                p.error(f"{path}: not a results JSON with rows ({e})")
        rows = tables[path]
        if key not in rows:
            p.error(f"{path} has no row {key!r}; it has {', '.join(sorted(rows))}")
        scores = rows[key].get("test", {}).get(args.language, {})
        if not scores.get("utterances"):
            p.error(f"row {name!r} has no per-utterance counts for {args.language!r}")
        return scores

    for a, b in zip(args.rows[::2], args.rows[1::2]):
        first, second = row(a), row(b)
        if {u["id"] for u in first["utterances"]} != {u["id"] for u in second["utterances"]}:
            p.error(f"{a} and {b} were scored on different {args.language!r} utterances; compare rows of one test set")
        change = paired_comparison(first, second)
        print(f"{b} against {a}: {format_change(next(iter(change.values()), None)) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
