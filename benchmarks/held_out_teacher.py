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

``--pseudo-label TEACHER --labeled N`` writes the students' corpus for KD on unlabeled clips: the training split
is the ``--max-train`` selection, in which only the ``--labeled N`` selection (the same evenly spaced clips a
``--max-train N`` student sees; a subset of the larger selection) keeps its human transcripts, and every other clip
carries TEACHER's transcript instead (decoded from the audio alone, greedy, with the clip's language forced and
the duration bound: the references are not read; its ``source`` says ``pseudo-label:<teacher>``). Clips whose
decoding hit the repetition guard are left out (their transcripts are cut loops). A student trained on it with
``--max-train`` = the clips kept sees N human transcripts plus the teacher's on the rest: sequence-level KD
(Kim & Rush 2016; distil-whisper's pseudo-labels) on speech nobody labelled for it. The teacher must not have
trained on those clips (the held-out teacher above did not):

    python benchmarks/held_out_teacher.py --data data/fillets --language nl --max-train 300 --labeled 100 \\
        --pseudo-label runs/real/nl-teacher-rest300.safetensors --out runs/real/fillets-nl-pseudo100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def language_rows(train, language: str) -> list[int]:
    """The indices of ``language``'s clips in a training split (refused by name when it has none)."""
    rows = [i for i, lang in enumerate(train["language"]) if lang == language]
    if not rows:
        raise SystemExit(f"the corpus has no {language!r} training clips")
    return rows


def held_out(corpus, language: str, max_train: int):
    """``corpus`` with its training split cut to ``language``'s clips outside the ``max_train`` selection; returns
    (the new corpus, how many training clips the students see, how many the teacher gets)."""
    import datasets

    from trainers.data import evenly_spaced

    train = corpus["train"]
    rows = language_rows(train, language)
    students = set(evenly_spaced(rows, max_train))
    rest = [i for i in rows if i not in students]
    if not rest:
        raise SystemExit(f"--max-train {max_train} takes all {len(rows)} {language!r} training clips; nothing is "
                         "left for a held-out teacher")
    splits = {split: ds for split, ds in corpus.items()}
    splits["train"] = train.select(rest)
    return datasets.DatasetDict(splits), len(students), len(rest)


def pseudo_labelled(corpus, language: str, max_train: int, labeled: int, teacher: str, base: str = "whisper-base",
                    batch_size: int = 16, progress: bool = True):
    """``corpus`` with its training split cut to ``language``'s ``max_train`` selection, in which the clips outside
    the ``labeled`` selection carry ``teacher``'s transcripts (see the module docstring); returns (the new corpus,
    a summary: clip counts and the pseudo-labels' WER/CER against the human transcripts they replace, measured
    after decoding, for the record only)."""
    import datasets

    from inference.evaluation import DecodeOptions, evaluate, utterances_from_dataset
    from inference.language_matrix import expert_applied
    from registry.bases import load_base
    from registry.expert_file import check_compatible, load_expert
    from trainers.data import evenly_spaced

    if labeled >= max_train:
        raise SystemExit(f"--labeled {labeled} must be smaller than --max-train {max_train}: the clips between them "
                         "are the ones the teacher labels")
    train = corpus["train"]
    rows = language_rows(train, language)
    selected = evenly_spaced(rows, max_train)
    human = set(evenly_spaced(rows, labeled))
    if not human <= set(selected):  # evenly spaced selections nest when the larger is a multiple of the smaller
        raise SystemExit(f"the --labeled {labeled} clips are not all among the --max-train {max_train} ones; pick "
                         "--max-train a multiple of --labeled")
    unlabeled = [i for i in selected if i not in human]
    student_base = load_base(base)
    expert = load_expert(teacher)
    check_compatible(expert.manifest, student_base, what=f"teacher {teacher} (--pseudo-label)")
    utterances = utterances_from_dataset(train.select(unlabeled), [language])
    with expert_applied(student_base.model, expert):
        report = evaluate(student_base.model, student_base.processor, utterances,
                          DecodeOptions(batch_size=batch_size), progress=progress).as_dict()
    by_id = {u["id"]: u for u in report["utterances"]}
    label = f"pseudo-label:{Path(teacher).name}"
    keep, texts, sources = [], [], []
    for i in selected:
        row = train[i]
        if i not in human:
            decoded = by_id[str(row["id"])]
            if decoded["loop_cut"] or not decoded["hypothesis"].strip():  # a cut loop, or nothing: left out
                continue
            row = {**row, "text": decoded["hypothesis"].strip(), "source": label}
        keep.append(i)
        texts.append(row["text"])
        sources.append(row["source"])
    kept = train.select(keep)
    kept = kept.remove_columns(["text", "source"]).add_column("text", texts).add_column("source", sources)
    splits = {split: ds for split, ds in corpus.items()}
    splits["train"] = kept.cast(train.features)  # the corpus's column order and types
    cut = len(selected) - len(keep)
    rates = report["languages"][language]
    summary = {"language": language, "teacher": teacher, "labeled": len(human), "pseudo_labelled": len(keep) -
               len(human), "left_out_loops": cut, "training_clips": len(keep),
               "pseudo_label_wer": rates["wer"], "pseudo_label_cer": rates["cer"],
               "pseudo_label_wer_ci95": rates.get("wer_ci95")}
    return datasets.DatasetDict(splits), summary


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
    p.add_argument("--pseudo-label", metavar="TEACHER", help="write the students' corpus instead: the --max-train "
                   "selection, with TEACHER's transcripts (an expert file on --base) on the clips outside the "
                   "--labeled selection")
    p.add_argument("--labeled", type=int, help="--pseudo-label: how many clips keep their human transcripts")
    args = p.parse_args(argv)
    if (args.pseudo_label is None) != (args.labeled is None):
        p.error("--pseudo-label and --labeled go together")
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

    if args.pseudo_label:
        try:
            corpus, summary = pseudo_labelled(load_corpus(args.data), args.language, args.max_train, args.labeled,
                                              args.pseudo_label, args.base)
            card = {**corpus_card(args.data), "pseudo_labels": {"from": args.data, **summary}}
            save_corpus(corpus, args.out, overwrite=args.overwrite, card=card, progress=False)
        except CorpusError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"{args.out}: {summary['training_clips']} {args.language} training clips, {summary['labeled']} with "
              f"human transcripts, {summary['pseudo_labelled']} with the teacher's (their WER against the human "
              f"ones {100 * summary['pseudo_label_wer']:.1f}%; {summary['left_out_loops']} left out: repetition "
              "loops); validation and test as in " + args.data)
        return 0
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
