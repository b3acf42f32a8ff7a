"""The corpus a held-out teacher trains on: the training clips a ``--max-train N`` student does NOT see.

A teacher trained on all training clips has fitted the student's clips too: on them its distribution is close to
the one-hot labels (training loss ~0.25 against ~0.9 on validation for the all-data Dutch expert), so KD gives the
student little beyond the labels it already has. DistilWhisper's teacher (whisper-large-v2) never trained on the
student's data. This script writes a corpus whose training split is the rest of the language's training clips
(the same evenly spaced selection ``train --max-train N`` and ``distill --max-train N`` make, left out), with the
same validation and test splits, so that a teacher trained on it scores the students' clips as unseen speech:

    python benchmarks/held_out_teacher.py --data data/fillets --language nl --max-train 300 \\
        --out runs/real/fillets-nl-rest300
    whisper-experts train --data runs/real/fillets-nl-rest300 --language nl --name nl-teacher-rest300 \\
        --epochs 2 --no-test --out runs/real/nl-teacher-rest300.safetensors
    python benchmarks/distill_wer.py ... --teachers 'runs/real/{lang}-teacher-rest300.safetensors'

(``distill_wer.py`` with ``--max-train 300`` then trains its students on exactly the clips this teacher never saw.)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the students' corpus")
    p.add_argument("--language", required=True, help="the students' language (one Whisper code)")
    p.add_argument("--max-train", type=int, required=True, help="the students' --max-train")
    p.add_argument("--out", required=True, help="where to write the teacher's corpus")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a corpus already")
    args = p.parse_args(argv)

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
