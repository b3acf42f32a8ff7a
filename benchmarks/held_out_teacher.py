"""The corpus a held-out teacher trains on: the training clips a ``--max-train N`` student does NOT see.

A teacher trained on all training clips has fitted the student's clips too: on them its distribution is close to
the labels (the all-data Dutch expert, teacher-forced on the students' 300 clips: cross-entropy 0.48 nats per token,
top token = transcript on 89.6% of tokens; 0.95 and 77.2% on the validation clips), so KD gives the student
little beyond the labels it already has. DistilWhisper's teacher (whisper-large-v2) never trained on the
student's data. This script writes a corpus whose training split is the rest of the language's training clips
(the same evenly spaced selection ``train --max-train N`` and ``distill --max-train N`` make, left out), with the
same validation and test splits, so that a teacher trained on it scores the students' clips as unseen speech:

    python benchmarks/held_out_teacher.py --data data/fillets --language nl --max-train 300 \\
        --out runs/real/fillets-nl-rest300
    whisper-experts train --data runs/real/fillets-nl-rest300 --language nl --name nl-teacher-rest300 \\
        --epochs 2 --no-test --out runs/real/nl-teacher-rest300.safetensors
    python benchmarks/distill_wer.py ... --teachers 'runs/real/{lang}-teacher-rest300.safetensors'

(``distill_wer.py`` with ``--max-train 300`` then trains its students on exactly the clips this teacher never saw.)

``--score TEACHER ...`` instead measures what each teacher gives a student, teacher-forced on the transcripts: on
the students' training clips and on the validation clips, the mean per-token cross-entropy of the transcript, the
mean probability of the teacher's top token, its mean entropy (nats) and how often its top token is the
transcript's. A teacher that trained on the students' clips is far more confident on them than on unseen speech:

    python benchmarks/held_out_teacher.py --data data/fillets --language nl --max-train 300 \\
        --score runs/real/nl-teacher-all-e2.safetensors runs/real/nl-teacher-rest300.safetensors \\
        --name teacher_confidence
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def held_out(corpus, language: str, max_train: int):
    """``corpus`` with its training split cut to ``language``'s clips outside the ``max_train`` selection; returns
    (the new corpus, how many training clips the students see, how many the teacher gets)."""
    import datasets

    from trainers.data import evenly_spaced

    train = corpus["train"]
    rows = [i for i, lang in enumerate(train["language"]) if lang == language]
    if not rows:
        raise SystemExit(f"the corpus has no {language!r} training clips")
    students = set(evenly_spaced(rows, max_train))
    rest = [i for i in rows if i not in students]
    if not rest:
        raise SystemExit(f"--max-train {max_train} takes all {len(rows)} {language!r} training clips; nothing is "
                         "left for a held-out teacher")
    splits = {split: ds for split, ds in corpus.items()}
    splits["train"] = train.select(rest)
    return datasets.DatasetDict(splits), len(students), len(rest)


def score(data: str, language: str, max_train: int, teachers, base: str = "whisper-base",
          batch_size: int = 16) -> list[dict]:
    """Each teacher (an expert file or registry spec on ``base``, ``base+expert``, or a model directory)
    teacher-forced on the students' training clips and on the validation clips (see the module docstring): one row
    per teacher and split."""
    import torch
    import torch.nn.functional as F

    from distill.teachers import load_teachers
    from registry.bases import load_base
    from trainers.data import IGNORE, ExpertDataModule

    student_base = load_base(base)
    dm = ExpertDataModule(data, student_base.processor, [language], batch_size, max_train=max_train, progress=False)
    dm.setup()
    rows = []
    for spec in teachers:
        bare = "+" in spec or Path(spec).is_dir()  # base+expert, or a model directory alone
        teacher = load_teachers(spec if bare else f"{base}+{spec}", student_base)
        for split, loader in (("students' training clips", dm._loader("train", shuffle=False)),
                              ("validation", dm.val_dataloader())):
            nll = top1 = entropy = hits = n = 0.0
            for batch in loader:
                logits = teacher.logits(batch["input_features"], batch["decoder_input_ids"], batch["language"]).float()
                keep = batch["labels"] != IGNORE
                logp = F.log_softmax(logits, -1)[keep]
                labels = batch["labels"][keep]
                best = logp.max(-1)
                nll += -logp.gather(-1, labels[:, None]).sum().item()
                top1 += best.values.exp().sum().item()
                entropy += -(logp.exp() * logp).sum().item()
                hits += (best.indices == labels).sum().item()
                n += len(labels)
            rows.append({"teacher": spec, "split": split, "clips": len(loader.dataset), "tokens": int(n),
                         "cross_entropy": nll / n, "top1_probability": top1 / n, "entropy": entropy / n,
                         "top1_is_transcript": hits / n})
            print(f"{spec} / {split}: {rows[-1]}", flush=True)
        del teacher  # one teacher in memory at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def score_table(rows: list[dict], command: str) -> str:
    lines = ["| teacher | clips | tokens | cross-entropy (nats) | top-token probability | entropy (nats) | "
             "top token = transcript |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{Path(r['teacher']).name}` on {r['split']} | {r['clips']} | {r['tokens']} | "
                     f"{r['cross_entropy']:.3f} | {r['top1_probability']:.3f} | {r['entropy']:.3f} | "
                     f"{100 * r['top1_is_transcript']:.1f}% |")
    return "\n".join(lines) + f"\n\nTeacher-forced on the transcripts, float32. Command: `{command}`\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the students' corpus")
    p.add_argument("--language", required=True, help="the students' language (one Whisper code)")
    p.add_argument("--max-train", type=int, required=True, help="the students' --max-train")
    p.add_argument("--out", help="where to write the teacher's corpus")
    p.add_argument("--score", nargs="+", metavar="TEACHER",
                   help="instead of writing a corpus, score these teachers (expert files or specs on whisper-base) "
                        "on the students' clips and on validation")
    p.add_argument("--base", default="whisper-base", help="--score: the base the teachers' experts are for")
    p.add_argument("--name", default="teacher_confidence", help="--score's table: benchmarks/results/NAME.{json,md}")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a corpus already")
    args = p.parse_args(argv)
    if args.score:
        import json

        from benchmarks.command import recorded

        rows = score(args.data, args.language, args.max_train, args.score, args.base)
        out = Path(__file__).resolve().parent / "results"
        command = recorded(Path(__file__).name, argv)
        (out / f"{args.name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
        md = score_table(rows, command)
        (out / f"{args.name}.md").write_text(md)
        print(md)
        return 0
    if not args.out:
        p.error("--out is required (or --score)")

    from trainers.corpus.loading import CorpusError, corpus_card, load_corpus, save_corpus

    try:
        corpus, seen, rest = held_out(load_corpus(args.data), args.language, args.max_train)
        card = {**corpus_card(args.data),
                "held_out_teacher": {"from": args.data, "language": args.language,
                                     "students_max_train": args.max_train, "students_clips": seen,
                                     "teacher_clips": rest}}
        save_corpus(corpus, args.out, overwrite=args.overwrite, card=card, progress=False)
    except CorpusError as e:  # a missing or broken corpus, an --out that exists: the message names the fix
        raise SystemExit(f"error: {e}") from None
    print(f"{args.out}: {rest} {args.language} training clips (the {seen} a --max-train {args.max_train} student "
          f"sees are left out); validation and test as in {args.data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
