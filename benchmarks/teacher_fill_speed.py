"""Cost and fidelity of the teacher cache's one-time pass: float32 against bf16 autocast scoring, same clips, one run.

    python benchmarks/teacher_fill_speed.py                    # whisper-base + the real Czech expert, 48 clips
    python benchmarks/teacher_fill_speed.py --teacher whisper-base --clips 32 --rounds 3
    python benchmarks/teacher_fill_speed.py --data /path/to/tiny-corpus --language uk --teacher /path/to/tiny

A knowledge-distillation run first scores every training utterance with its teachers
(``distill.sources.CachedTeacher``) and keeps their top-k log-probabilities. On a CPU that pass is the longest
part of a KD run (about 1 s per clip for whisper-base on 2 cores). This script fills fresh caches for the first
``--clips`` training clips of ``--data`` in float32 and under bf16 autocast, ``--rounds`` times in alternating
order (so drift in machine load hits both alike), and reports:

- seconds per utterance of each (median over rounds) and their ratio;
- fidelity of bf16 against float32 at the target positions: how often the best token is the same, the mean absolute
  difference of the best token's probability, and the mean probability mass the top-k keeps in each.

Writes ``<out>/teacher_fill_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402

DEFAULT_TEACHER = "runs/real/cs-teacher-all-e2.safetensors"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base", help="student base (the teachers must share its tokenizer)")
    p.add_argument("--teacher", default=DEFAULT_TEACHER,
                   help="teacher spec: an expert file (on --base), BASE+EXPERT, or a base alone (default: the real "
                        "Czech all-data expert on whisper-base)")
    p.add_argument("--data", default="data/fillets", help="corpus (default: the Fish Fillets real-speech corpus)")
    p.add_argument("--language", default="cs")
    p.add_argument("--clips", type=int, default=48, help="training clips scored per fill")
    p.add_argument("--rounds", type=int, default=2, help="alternating fills of each precision")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from benchmarks.real_speech import machine
    from distill.sources import CachedTeacher
    from distill.teacher_cache import TeacherCache
    from distill.teachers import load_teachers
    from registry.bases import load_base
    from trainers.language_batches import DistillDataModule

    base = load_base(args.base, device="cpu")
    teachers = load_teachers([args.teacher], base, device="cpu") if Path(args.teacher).is_file() else \
        load_teachers(args.teacher, base, device="cpu")
    data = DistillDataModule(args.data, base.processor, [args.language], args.batch_size, max_train=args.clips,
                             max_validation=1, progress=False)
    data.setup()
    rows = data.datasets["train"].rows
    work = Path(tempfile.mkdtemp(prefix="teacher-fill-"))
    seconds: dict[str, list[float]] = {"32": [], "bf16": []}
    last: dict[str, CachedTeacher] = {}
    for r in range(args.rounds):
        for precision in (["32", "bf16"] if r % 2 == 0 else ["bf16", "32"]):
            source = CachedTeacher(teachers, TeacherCache(str(work / f"{precision}-{r}"), args.top_k),
                                   batch_size=args.batch_size, progress=False, precision=precision)
            t0 = time.perf_counter()
            source.prepare(rows)
            seconds[precision].append((time.perf_counter() - t0) / len(rows))
            last[precision] = source
    # Fidelity at the target positions, utterance by utterance.
    labels = rows.with_format("numpy", columns=["labels"])["labels"]
    same, diff, mass = 0, [], {"32": [], "bf16": []}
    for i, lab in enumerate(labels):
        keep = np.asarray(lab) != -100
        read = {pr: last[pr].cache.read(last[pr].entries[i]) for pr in last}
        (lp32, ix32), (lp16, ix16) = read["32"], read["bf16"]
        lp32, lp16 = np.asarray(lp32, np.float64)[keep], np.asarray(lp16, np.float64)[keep]
        same += int((np.asarray(ix32)[keep, 0] == np.asarray(ix16)[keep, 0]).sum())
        diff.extend(np.abs(np.exp(lp32[:, 0]) - np.exp(lp16[:, 0])).tolist())
        mass["32"].extend(np.exp(lp32).sum(-1).tolist())
        mass["bf16"].extend(np.exp(lp16).sum(-1).tolist())
    positions = len(diff)
    median = {pr: statistics.median(v) for pr, v in seconds.items()}
    result = {
        "seconds_per_utterance": median, "ratio_bf16_vs_32": median["bf16"] / median["32"], "rounds": seconds,
        "top1_agreement": same / max(positions, 1), "mean_abs_top1_prob_diff": float(np.mean(diff)),
        "mass_kept": {pr: float(np.mean(v)) for pr, v in mass.items()}, "positions": positions,
        "meta": {"base": base.name, "teacher": args.teacher, "data": args.data, "language": args.language,
                 "clips": len(rows), "batch_size": args.batch_size, "top_k": args.top_k, "rounds": args.rounds,
                 "machine": machine(), "threads": torch.get_num_threads()},
        "command": recorded(Path(__file__).name, argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_fill_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"Teacher-cache fill, {result['meta']['clips']} {args.language} training clips of {args.data}, teacher "
          f"`{args.teacher}`, batch {args.batch_size}, top-{args.top_k}; {result['meta']['machine']}, "
          f"{result['meta']['threads']} threads.",
          "", f"Command: `{result['command'].strip()}`", "",
          "| scoring | s per utterance (median of rounds) | vs float32 | top-k mass kept |",
          "|---|---|---|---|",
          f"| float32 | {median['32']:.3f} | 1.00x | {result['mass_kept']['32']:.4f} |",
          f"| bf16 autocast | {median['bf16']:.3f} | {result['ratio_bf16_vs_32']:.2f}x "
          f"| {result['mass_kept']['bf16']:.4f} |",
          "", f"bf16 against float32 over {positions} target positions: the best token agrees at "
          f"{100 * result['top1_agreement']:.1f}% of them; the best token's probability differs by "
          f"{result['mean_abs_top1_prob_diff']:.4f} on average.", ""]
    (out / "teacher_fill_speed.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
