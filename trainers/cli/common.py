"""Small helpers shared by subcommands: tables, comma-separated lists, example configs, shared flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Where a wheel installs examples/*.yaml (pyproject's data-files), so `--config examples/x.yaml` works without a clone.
INSTALLED_EXAMPLES = Path(sys.prefix) / "share" / "whisper-experts" / "examples"


def resolve_config(path: str) -> str:
    """``path`` if it exists; else, for ``examples/NAME`` (or a bare NAME), the example config installed with
    the package; else ``path`` unchanged (the caller reports it missing)."""
    if Path(path).exists():
        return path
    candidate = INSTALLED_EXAMPLES / Path(path).name
    if (path.startswith("examples/") or "/" not in path) and candidate.is_file():
        return str(candidate)
    return path


def resolve_config_args(args: list[str]) -> list[str]:
    """``--config X`` / ``--config=X`` in a LightningCLI argument list, with X passed through :func:`resolve_config`."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def split_list(value: str | None) -> list[str] | None:
    """``"de, uk,ru"`` -> ``["de", "uk", "ru"]``; None or empty -> None."""
    if not value:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def add_clsr_gates_argument(p: argparse.ArgumentParser) -> None:
    """``--clsr-gates hard|soft``: override how CLSR experts use their gates at inference."""
    p.add_argument("--clsr-gates", choices=["hard", "soft"], default=None,
                   help="how CLSR experts use their gates: hard (each token takes the path its gate picks, as in "
                        "DistilWhisper) or soft (every token mixes both paths by sigmoid(G)); default: as each "
                        "expert records (distill --gate-inference)")


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
