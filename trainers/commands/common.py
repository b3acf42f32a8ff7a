"""Small helpers shared by subcommands: tables and comma-separated lists."""

from __future__ import annotations


def split_list(value: str | None) -> list[str] | None:
    """``"de, uk,ru"`` -> ``["de", "uk", "ru"]``; None or empty -> None."""
    if not value:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print rows as an aligned plain-text table (missing values blank)."""
    if not rows:
        print("(none)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
