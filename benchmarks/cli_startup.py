"""Start-up time of the command line: `whisper-experts --help` (and a few subcommands' help) beside
`python -c pass`, in one run, as ratios.

    python benchmarks/cli_startup.py            # 10 runs each, median wall time
    python benchmarks/cli_startup.py --runs 30

Goal (issue: fast start): `whisper-experts --help` under 1 s. No command's `--help` imports torch or
transformers (tests/test_packaging.py checks that); this measures what is left. Writes
``benchmarks/results/cli_startup.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "whisper-experts --help": [sys.executable, "-m", "trainers.cli", "--help"],
    "whisper-experts train --help": [sys.executable, "-m", "trainers.cli", "train", "--help"],
    "whisper-experts registry export --help": [sys.executable, "-m", "trainers.cli", "registry", "export", "--help"],
    "whisper-experts transcribe --help": [sys.executable, "-m", "trainers.cli", "transcribe", "--help"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):  # interleaved, so a busy moment hurts every command alike
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    python = statistics.median(times["python -c pass"])
    rows = ["| command | median s | vs python -c pass |", "|---|---|---|"]
    results = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        results[name] = {"median_s": round(med, 4), "runs": len(ts), "ratio": round(med / python, 2)}
        rows.append(f"| `{name}` | {med:.3f} | {med / python:.1f}x |")
    md = (f"Command: `python benchmarks/cli_startup.py --runs {args.runs}` ({args.runs} interleaved runs each, "
          f"median wall time)\n\n" + "\n".join(rows) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_startup.json").write_text(json.dumps(results, indent=2))
    (out / "cli_startup.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
