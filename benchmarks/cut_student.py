"""A smaller student cut from whisper-base, its decoder distilled from whisper-base plus real-speech experts
(issue 16, item 2: DistilWhisper's large-to-small regime, the gap made the other way round).

    python benchmarks/cut_student.py                     # cs,nl; 2 of 6 decoder layers; ~1 h on 2 CPU cores
    python benchmarks/cut_student.py --decoder-layers 3 --name cut_student_dec3
    python benchmarks/cut_student.py --table-only        # rewrite the table from the JSON

The student is ``--base`` cut to ``--decoder-layers`` decoder layers (``whisper-experts base shrink``: the
encoder whole, the kept layers spread from the first to the last, as distil-whisper picks them). Its decoder is
then trained against the teachers (``whisper-experts distill --kind full``): whisper-base with each language's
expert (``--teachers``, default the all-data real experts of docs/results.md), each batch scored by its own
language's teacher through a top-32 cache, on every training clip of the languages (``--max-train`` to cap), at
most ``--epochs`` epochs, the best validation WER kept. Rows, on the same test clips of held-out game levels:

* whisper-base alone, and with each language's expert (routed by the known language: the teachers);
* the cut student untrained, and after KD.

Every WER carries its 95% bootstrap interval; the student rows also the paired change against whisper-base with
the experts. Size is the parameters a request runs through (base, plus the expert where one is applied); speed
is the decoding time of the same test clips relative to whisper-base alone, in the same run.

Writes ``<out>/<name>.{json,md}``; the trained student under ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402


def student_base(args):
    """The cut student, registered as a base (made once)."""
    from registry.bases import BaseNotFoundError, load_base
    from registry.shrink import shrink_base

    name = args.student or f"{Path(args.base).name}-dec{args.decoder_layers.replace(',', '_')}"
    try:
        return load_base(name, device=args.device)
    except BaseNotFoundError:  # not cut yet
        shrink_base(args.base, name, args.decoder_layers)
        return load_base(name, device=args.device)


def distilled(student, teachers: dict[str, str], args):
    """The student's decoder trained against the teachers (``distill --kind full``), cached by configuration;
    with its training minutes and best epoch (recorded in the expert's manifest)."""
    from benchmarks.trained import cached, config_knobs, file_digest, tag
    from trainers.configs import DistillConfig
    from trainers.train_distill import train_distilled

    runs = Path(args.runs)
    langs = list(teachers)
    cfg = DistillConfig(data=args.data, languages=tuple(langs), base=student.name, kind="full",
                        teacher_base=args.base, teachers=tuple(teachers[lang] for lang in langs),
                        teacher_cache=str(runs / "teacher-cache"), side="decoder", lr=args.lr, epochs=args.epochs,
                        patience=args.patience, max_train=args.max_train, batch_size=args.batch_size, test=False,
                        progress=True, run_dir=str(runs / f"run-{student.name}"))
    name = tag(cfg=config_knobs(cfg), student=student.fingerprint,
               teachers=[file_digest(teachers[lang]) for lang in langs])
    runs.mkdir(parents=True, exist_ok=True)
    expert, seconds = cached(runs / f"{student.name}-kd-{name}.safetensors", lambda: train_distilled(cfg)[0][0])
    return expert, {"minutes": round(seconds / 60, 1), "best_epoch": expert.manifest["hyperparameters"]["best_epoch"]}


def scored(base, utterances: dict, experts: dict | None = None) -> dict:
    """Per language: test WER/CER with intervals, decode seconds and per-utterance counts, with that language's
    expert applied where ``experts`` has one."""
    import contextlib

    from inference.evaluation import DecodeOptions, evaluate, paired_counts
    from inference.language_matrix import expert_applied

    out = {}
    for lang, utts in utterances.items():
        expert = (experts or {}).get(lang)
        with expert_applied(base.model, expert) if expert is not None else contextlib.nullcontext():
            report = evaluate(base.model, base.processor, utts, DecodeOptions(batch_size=16), progress=True)
        row = report.languages[lang]
        out[lang] = {"wer": row.wer, "cer": row.cer, "n": row.n, "wer_ci95": list(row.wer_ci or ()),
                     "decode_seconds": row.rtf * row.audio_seconds, "utterances": paired_counts(report)}
    return out


def parameters(model, expert=None) -> int:
    """Parameters a request runs through: the model's, plus a LoRA expert's own (a dense delta adds none)."""
    n = sum(p.numel() for p in model.parameters())
    if expert is not None and expert.kind == "lora":
        n += sum(t.numel() for t in expert.tensors.values())
    return n


def run(args, results: dict, save) -> None:
    from inference.evaluation import utterances_from_dataset
    from registry.bases import load_base
    from registry.expert_file import load_expert
    from trainers.corpus.loading import load_corpus

    langs = [x.strip() for x in args.languages.split(",") if x.strip()]
    teachers = {lang: args.teachers.format(lang=lang) for lang in langs}
    missing = [f for f in teachers.values() if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"teacher expert(s) not found: {', '.join(missing)}; train them with the `whisper-experts "
                         "train ... --epochs 2` lines of docs/results.md, or give --teachers")
    corpus = load_corpus(args.data)
    utterances = {lang: utterances_from_dataset(corpus["test"], [lang], args.test_limit) for lang in langs}
    base = load_base(args.base, device=args.device)
    experts = {lang: load_expert(teachers[lang]) for lang in langs}
    student = student_base(args)
    student_expert, info = distilled(student, teachers, args)
    rows = {}
    rows["base"] = {"label": f"{base.name}", "params": parameters(base.model), **scored(base, utterances)}
    rows["teachers"] = {"label": f"{base.name} + its language's expert (the teachers)",
                        "params": max(parameters(base.model, e) for e in experts.values()),
                        **scored(base, utterances, experts)}
    del base
    rows["student"] = {"label": f"{student.name}, untrained", "params": parameters(student.model),
                       **scored(student, utterances)}
    rows["student_kd"] = {"label": f"{student.name} + its decoder distilled (KD)",
                          "params": parameters(student.model, student_expert), "train_minutes": info["minutes"],
                          **scored(student, utterances, {lang: student_expert for lang in langs})}
    results.update({"languages": langs, "student": student.name, "teachers": teachers, "training": info,
                    "rows": rows})
    save()


def table(results: dict) -> str:
    from inference.confidence import format_change, format_ci
    from inference.evaluation import paired_comparison

    langs, rows = results["languages"], results["rows"]
    base_seconds = sum(rows["base"][lang]["decode_seconds"] for lang in langs)
    head = ("| model | parameters | " + " | ".join(f"{lang} WER % [95% CI]" for lang in langs) + " | "
            + " | ".join(f"{lang} vs the teachers [paired]" for lang in langs) + " | decode time vs base |")
    md = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, r in rows.items():
        cells = [format_ci(r[lang]["wer"], r[lang]["wer_ci95"] or None) for lang in langs]
        changes = ["–" if key in ("base", "teachers") else
                   format_change(paired_comparison(rows["teachers"][lang], r[lang]).get(lang)) for lang in langs]
        speed = sum(r[lang]["decode_seconds"] for lang in langs) / base_seconds
        md.append(f"| {r['label']} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + " | " + " | ".join(changes)
                  + f" | {speed:.2f}x |")
    n = ", ".join(f"{lang} {rows['base'][lang]['n']}" for lang in langs)
    info = results["training"]
    md.append(f"\nTest clips of held-out game levels: {n}; greedy, language forced, bounded by audio duration. "
              f"Student decoder trained {info['minutes']:.0f} min (caches included), best validation epoch "
              f"{info['best_epoch'] + 1}. Command: `{results['command']}`\n")
    return "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--languages", default="cs,nl", help="languages (default cs,nl)")
    p.add_argument("--teachers", default="runs/real/{lang}-teacher-all-e2.safetensors",
                   help="each language's expert on --base ({lang} is replaced)")
    p.add_argument("--base", default="whisper-base", help="the base the student is cut from and the teachers use")
    p.add_argument("--decoder-layers", default="2", help="decoder layers the student keeps: a count or indices")
    p.add_argument("--student", help="the student's base name (default <base>-dec<layers>)")
    p.add_argument("--data", default="data/fillets", help="the real corpus (whisper-experts corpus fetch fillets)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: distill's, 1e-4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-train", type=int, default=None, help="training clips per language (default all)")
    p.add_argument("--test-limit", type=int, default=None, help="test clips per language (default all)")
    p.add_argument("--device", default=None, help="where test decoding runs: cpu, cuda (default: CUDA when "
                   "available, else CPU); training follows Lightning's choice")
    p.add_argument("--runs", default="runs/cut-student", help="the trained student, caches and logs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="cut_student", help="results file stem (default cut_student)")
    p.add_argument("--table-only", action="store_true", help="only rewrite the table from the JSON")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{args.name}.json", out / f"{args.name}.md"
    if args.table_only:
        results = json.loads(json_path.read_text())
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        results = {"command": recorded(Path(__file__).name, argv)}

        def save():
            json_path.write_text(json.dumps(results, indent=2))

        run(args, results, save)
    md_path.write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
