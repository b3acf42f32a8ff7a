"""Paired comparisons between any two rows of a stored WER table (a benchmark's results JSON).

The tables print some pairs themselves (KD against its twin, soft gates against hard); this prints any other
pair, on the same held-out utterances, as the tables do: relative change and the paired-bootstrap 95% interval
in WER points (``inference.evaluation.paired_comparison``). No decoding: it reads the stored per-utterance counts.

    python benchmarks/paired_rows.py benchmarks/results/real_distill.json --language nl \\
        clsr-lowrank-both-3-pdd clsr-lowrank-both-3-glr0.01-pdd   # B against A: negative = B better
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
    p.add_argument("rows", nargs="+", metavar="A B", help="pairs of row keys: B is compared against A")
    args = p.parse_args(argv)
    if len(args.rows) % 2:
        p.error("give the row keys in pairs: A B [A B ...]")
    rows = json.loads(Path(args.results).read_text())["rows"]
    for a, b in zip(args.rows[::2], args.rows[1::2]):
        for key in (a, b):
            if key not in rows:
                p.error(f"{args.results} has no row {key!r}; it has {', '.join(sorted(rows))}")
            if not rows[key].get("test", {}).get(args.language, {}).get("utterances"):
                p.error(f"row {key!r} has no per-utterance counts for {args.language!r}")
        change = paired_comparison(rows[a]["test"][args.language], rows[b]["test"][args.language])
        print(f"{b} against {a}: {format_change(next(iter(change.values()), None)) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
