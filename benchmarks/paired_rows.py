"""Paired comparisons between any two rows of a stored WER table (a benchmark's results JSON).

The tables print some pairs themselves (KD against its twin, soft gates against hard); this prints any other
pair, on the same held-out utterances, as the tables do: relative change and the paired-bootstrap 95% interval
in WER points (``inference.evaluation.paired_comparison``). No decoding: it reads the stored per-utterance counts.

    python benchmarks/paired_rows.py benchmarks/results/real_distill.json --language nl \\
        clsr-lowrank-both-3-pdd clsr-lowrank-both-3-glr0.01-pdd   # B against A: negative = B better

A row of another table on the same test clips is named ``OTHER.json:KEY`` (refused unless both rows scored the
same utterances). Rows of the one-language tables of ``real_fusion.py`` (scores at the row's top level, the
language in the table's ``target``) are read too, e.g. ``benchmarks/results/real_fusion.json:cs-real-100``, and
those of ``cut_student.py`` (scores under each language at the row's top level):

    python benchmarks/paired_rows.py benchmarks/results/real_distill_pseudo.json --language nl \\
        benchmarks/results/real_distill_100.json:clsr-lowrank-both-3-attn-glr0.01-gb1-pdd \\
        clsr-lowrank-both-3-kd-attn-glr0.01-gb1-pdd
    python benchmarks/paired_rows.py benchmarks/results/cut_student_nl_dec4.json --language nl base student_kd
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class RowError(ValueError):
    """A row name that does not resolve to per-utterance test counts (the message names it and what exists)."""


class Rows:
    """Rows of results JSONs by name: ``KEY`` of the default table, or ``OTHER.json:KEY`` of another one, each
    read once."""

    def __init__(self, default: str | None, language: str):
        self.default, self.language, self.tables = default, language, {}

    def table(self, path: str) -> dict:
        if path not in self.tables:
            try:
                data = json.loads(Path(path).read_text())
                rows = data["rows"]
                if "target" in data:  # one language's table (real_fusion.py): scores at each row's top level
                    rows = {key: {"label": row.get("label", key), "test": {data["target"]: row}}
                            for key, row in rows.items()}
                elif "languages" in data and not any("test" in row for row in rows.values()):
                    # scores keyed by language at each row's top level (cut_student.py)
                    rows = {key: {"label": row.get("label", key),
                                  "test": {lang: row[lang] for lang in data["languages"] if lang in row}}
                            for key, row in rows.items()}
                self.tables[path] = rows
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise RowError(f"{path}: not a results JSON with rows ({e})") from e
        return self.tables[path]

    def row(self, name: str) -> dict:
        """The named row as stored (its ``label``, and ``test[language]`` with per-utterance counts)."""
        path, key = name.rsplit(":", 1) if ".json:" in name else (self.default, name)
        if path is None:
            raise RowError(f"{name!r}: name a row as FILE.json:KEY")
        rows = self.table(path)
        if key not in rows:
            raise RowError(f"{path} has no row {key!r}; it has {', '.join(sorted(rows))}")
        if not rows[key].get("test", {}).get(self.language, {}).get("utterances"):
            raise RowError(f"row {name!r} has no per-utterance counts for {self.language!r}")
        return rows[key]

    def scores(self, name: str) -> dict:
        """The named row's test scores on the language: ``wer``, ``wer_ci95``, ``utterances`` (counts)."""
        return self.row(name)["test"][self.language]

    def same_clips(self, a: str, b: str) -> None:
        """Refuse two rows scored on different utterances: a paired comparison needs one test set."""
        if {u["id"] for u in self.scores(a)["utterances"]} != {u["id"] for u in self.scores(b)["utterances"]}:
            raise RowError(f"{a} and {b} were scored on different {self.language!r} utterances; "
                           "compare rows of one test set")


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
    rows = Rows(args.results, args.language)
    for a, b in zip(args.rows[::2], args.rows[1::2]):
        try:
            rows.same_clips(a, b)
        except RowError as e:
            p.error(str(e))
        change = paired_comparison(rows.scores(a), rows.scores(b))
        print(f"{b} against {a}: {format_change(next(iter(change.values()), None)) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
