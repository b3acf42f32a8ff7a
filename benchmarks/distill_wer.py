"""CLSR gated experts with and without distillation vs a LoRA expert at equal data (issue 5's acceptance table).

    python benchmarks/distill_wer.py                         # uk,pt students, nl,ru untouched (~1 h, see below)
    python benchmarks/distill_wer.py --path lowrank          # add CLSR rows with rank-16 low-rank paths
    python benchmarks/distill_wer.py --side both             # the paper's layout (encoder too: ~8x slower on CPU)
    python benchmarks/distill_wer.py --gate-lr 1e-3          # CLSR rows whose gates train at 1e-3
    python benchmarks/distill_wer.py --gate-budget 1         # CLSR rows whose gate budget pulls every gate open
    python benchmarks/distill_wer.py --path lowrank --path-dropout 0   # CLSR rows without language-path dropout
    python benchmarks/distill_wer.py --path lowrank --gate-warmup 0.3 --path-dropout-ramp 0.3  # gates held open,
                                                                       # path dropout ramped in, over 30% of steps
    python benchmarks/distill_wer.py --path lowrank --decoder-lr 1e-4  # CLSR decoder-side paths at 1e-4
    python benchmarks/distill_wer.py --path lowrank --gate-inference soft  # the same students, decoded with soft
                                                                       # gates (paths mixed by sigmoid(G))
    python benchmarks/distill_wer.py --path lowrank --validate-gates soft  # students whose best epoch is chosen
                                                                       # (and that are decoded) with soft gates
    python benchmarks/distill_wer.py --languages ''          # only rewrite the table from the JSON
    python benchmarks/distill_wer.py --base whisper-base-dec4-kd --teacher-base whisper-base ...
                                              # students on a base cut from the teachers' (cut_student.py's)

    # smoke test: a tiny random Whisper and 8 utterances per language (teachers trained on the fly)
    python -c "from tests.tiny import make_tiny_whisper; make_tiny_whisper('runs/tiny-whisper')"
    whisper-experts corpus synth --languages uk,pt,nl,ru --per-language 8 --out data/tiny4
    python benchmarks/distill_wer.py --base runs/tiny-whisper --data data/tiny4 --teachers 'runs/smoke/{lang}-t' \\
        --max-train 4 --epochs 1 --test-limit 1 --batch-size 4 --path full,lowrank --work runs/smoke --out runs/smoke

Setup, the same for every row: whisper-base; per student language (``--languages``, default uk,pt) the corpus
``data/<lang>-expert`` (400 train / 30 validation / 50 test utterances, seed 1, the corpora of
benchmarks/expert_wer.py; made if missing) or one ``--data`` corpus holding every language; the students see the
first ``--max-train`` (120) training utterances of each language, all validation and test utterances.

Rows:

* base: whisper-base alone;
* LoRA: one rank-16 decoder LoRA expert per language on its 120 utterances (best validation epoch). One expert
  per language, not one for both: a CLSR student also gives every language its own parameters (path and gate)
  trained on that language's batches only, so this is the like-for-like baseline;
* CLSR without KD / CLSR + KD: a path and gate per language (``--path full``: a copy of each FFN, the paper;
  ``--path lowrank``: a rank-16 delta), on the decoder's FFNs by default (``--side decoder``: trains on cached
  encoder outputs; ``--side both`` is the paper's layout), loss CE + gate budget, or DistilWhisper's
  0.25 (CE + gate) + 0.5 JS against the teacher through a top-32 cache. Each language is trained in its own run;
  its path and gate get gradients from its batches only, so this equals one run with one-language batches
  except for the learning-rate schedule and early stopping, which then follow each language;
* teacher: whisper-base + a LoRA expert per language trained on all 400 utterances (``--teachers``, default the
  files benchmarks/expert_wer.py leaves in ``runs/<lang>-expert/expert.safetensors``; trained here, rank-16
  decoder LoRA, when missing), i.e. better than the student on the language.

Test WER/CER (normalized, ``inference.evaluation``) of each student language, and of the untouched languages
(``--untouched``, default the stored table's, nl,ru for a new one; corpora ``data/<lang>-expert``): under CLSR they
take the shared path (no language selected), under LoRA each student language's expert is applied to them (the
table shows the mean over those experts, the JSON each one); the teacher is not run on them. Parameters stored per
language (the expert file) and active per token (the base's plus what the expert adds to a token's forward, at
most: LoRA all its matrices; CLSR the gates, plus the deltas of low-rank paths; a full path replaces the FFN it
copies). Training minutes per row (summed over the languages). Trained experts and timings are kept under
``--work`` and reused, and every finished row is written to ``<out>/distill_wer.{json,md}`` at once, so a rerun
resumes. The base's and the teachers' test scores are kept under ``<work>/decoded/`` too, keyed by the model and
the clips' audio and references, so another table on the same test clips (``--data`` a pseudo-labelled copy of the
corpus, ``--max-train`` another size) reuses them instead of decoding again.

Cost (whisper-base, defaults, 2 CPU cores). Measured training steps (batch 16, 48 target tokens, forward +
backward + AdamW) while another benchmark shared the cores: decoder-only CLSR on cached encoder outputs 12-13 s
(full paths; low-rank 9-14 s), a decoder LoRA step 18 s, CLSR on every FFN (``--side both``, the encoder run
forward and backward on 30 s windows) 99 s. On idle cores a decoder LoRA step takes ~2.6 s, so a decoder-only
CLSR step ~2 s. Per language and row: 8 steps per epoch, at most 10 epochs, with 30 validation utterances
decoded per epoch: ~5-7 min; test decoding ~35 s per 50 utterances; the teacher cache ~1 min per language.
Estimate for the default run (uk,pt; base, reused teachers, LoRA, CLSR, CLSR + KD): ~1 h on idle cores, 3-5 h
while the cores are shared; ``--side both`` multiplies the CLSR training time by ~8.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402
from benchmarks.decoded import Evaluator  # noqa: E402
from benchmarks.distill_table import split, table  # noqa: E402
from benchmarks.trained import cached, tag  # noqa: E402


def corpus_for(lang: str, args) -> str:
    """The corpus of ``lang``: ``--data``, or ``data/<lang>-expert`` (made as benchmarks/expert_wer.py makes it)."""
    if args.data:
        return args.data
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    path = Path(f"data/{lang}-expert")
    if not (path / "dataset_dict.json").is_file():
        total = 480
        synthesize_corpus(SynthConfig(languages=(lang,), per_language=total, train_fraction=400 / total,
                                      validation_fraction=30 / total, test_fraction=50 / total, seed=args.seed), path)
    return str(path)


def lora_config(lang: str, args, run_dir: Path, max_train):
    """The LoRA run: ``--lora-recipe decoder`` (the decoder-only recipe this table began with) or ``default``
    (``train``'s default: decoder + the top three encoder layers, bf16 where native)."""
    from trainers.configs import DECODER_RECIPE
    from trainers.train_lora import TrainConfig

    recipe = DECODER_RECIPE if args.lora_recipe == "decoder" else {}
    return TrainConfig(data=corpus_for(lang, args), languages=(lang,), base=args.base, rank=args.rank,
                       alpha=2.0 * args.rank, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       max_train=max_train, patience=args.patience, seed=args.train_seed, test=False,
                       progress=False, run_dir=str(run_dir), **recipe)


def lora_knobs(args) -> dict:
    """Cache-key knobs of the LoRA recipe (none for the decoder recipe: its experts keep their old names)."""
    return {} if args.lora_recipe == "decoder" else {"recipe": args.lora_recipe}


def teacher_file(lang: str, args, work: Path) -> tuple[Path, float | None]:
    """The teacher expert of ``lang`` (``--teachers``; trained on the whole training split when missing)."""
    from trainers.train_lora import train_lora_expert

    given = Path(args.teachers.format(lang=lang))
    if given.is_file():
        return given, None
    if args.teacher_base:  # teachers are trained on --base here; one for another base must be given
        raise SystemExit(f"teacher {given} (--teachers) not found: with --teacher-base {args.teacher_base}, give "
                         f"an expert file trained on {args.teacher_base} (whisper-experts train --base ...)")
    cfg = lora_config(lang, args, work / f"run-{lang}-teacher", None)  # all training utterances
    name = tag(base=args.base, data=cfg.data, e=args.epochs, r=args.rank, **lora_knobs(args))
    path = work / f"{lang}-teacher-{name}.safetensors"
    _, seconds = cached(path, lambda: train_lora_expert(cfg)[0])
    return path, seconds


def lora_student(lang: str, args, work: Path):
    from trainers.train_lora import train_lora_expert

    cfg = lora_config(lang, args, work / f"run-{lang}-lora", args.max_train)
    name = tag(base=args.base, data=cfg.data, n=args.max_train, e=args.epochs, lr=args.lr, r=args.rank,
               s=args.train_seed, **lora_knobs(args))
    return cached(work / f"{lang}-lora-{name}.safetensors", lambda: train_lora_expert(cfg)[0])


def variant(args) -> tuple[str, str, dict]:
    """The CLSR knobs this run sets away from the recipe's defaults (gate and decoder-path learning rates, path
    dropout and what it drops, attention paths), as a row-key / run-directory suffix (``-glr0.001-pd0``,
    ``-attn``), a label part and cache-key knobs; ('', '', {}) for none.
    Runs at the defaults keep the names and cache keys they had before these options existed."""
    from distill.clsr import ClsrConfig
    from trainers.configs import DistillConfig

    suffix, label, knobs = off_default((
        ("glr", args.gate_lr, None, "gate lr"), ("pd", args.path_dropout, ClsrConfig().path_dropout, "path dropout"),
        ("dlr", args.decoder_lr, None, "decoder lr"), ("gw", args.gate_warmup, 0.0, "gate warm-up"),
        ("pdr", args.path_dropout_ramp, 0.0, "path dropout ramp"),
        ("gb", args.gate_budget, DistillConfig.gate_budget, "gate budget")), ", ")
    if args.attention:  # gated paths on the attention projections too
        suffix, label, knobs = "-attn" + suffix, ", FFN + attention" + label, {"attn": 1, **knobs}
    if args.path_dropout_on != "output":  # path dropout on the low-rank delta alone
        suffix, label, knobs = suffix + "-pdd", label + ", path dropout on the delta", {**knobs, "pdd": 1}
    if args.validate_gates != "hard":  # the best epoch by validation WER under soft gates (the expert records it)
        suffix, label, knobs = suffix + "-vsoft", label + ", best epoch by soft gates", {**knobs, "vg": "soft"}
    return suffix, label, knobs


def decode_gates(args) -> tuple[str, str, str]:
    """How the CLSR rows are decoded (``--gate-inference``, default the students' own: ``--validate-gates``), with
    the row-key suffix and label part of decoding otherwise than validated (``-soft``: students validated with
    hard gates, decoded with soft ones)."""
    mode = args.gate_inference or args.validate_gates
    if mode == args.validate_gates:
        return mode, "", ""
    return mode, f"-{mode}", f", {mode} gates at inference"


def off_default(entries, sep: str, prefix: str = "") -> tuple[str, str, dict]:
    """``(key, value, default, label)`` entries whose value is not the default, as a suffix (``-pd0``), a label
    part (``<sep>path dropout 0``) and cache-key knobs (``prefix + key``)."""
    knobs = [(key, value, what) for key, value, default, what in entries if value != default]
    return ("".join(f"-{k}{v:g}" for k, v, _ in knobs), "".join(f"{sep}{w} {v:g}" for _, v, w in knobs),
            {prefix + k: v for k, v, _ in knobs})


def kd_variant(args) -> tuple[str, str, dict]:
    """The KD loss knobs this run sets away from the recipe's (KD weight 0.5, temperature 1), as :func:`variant`
    gives them: a ``-kd`` marker suffix (``-w2-t2``), a label part and cache-key knobs. Only KD rows carry them,
    so the CLSR row without KD keeps its name and cache."""
    return off_default((("w", args.kd_weight, None, "weight"), ("t", args.temperature, 1.0, "T")), " ", "kd")


def layout_suffix(args) -> str:
    """The run-directory suffix of a CLSR layout other than the default decoder-only one (``-both3``,
    ``-encoder3``), so that runs of two layouts keep their own logs."""
    return "" if args.side == "decoder" else f"-{args.side}{args.encoder_start}"


def clsr_student(lang: str, args, work: Path, path: str, teacher: Path | None):
    """A CLSR student; in float32 beside the decoder LoRA recipe (as the synthetic tables were measured), else at
    the machine's default precision."""
    from trainers.configs import DECODER_RECIPE
    from trainers.train_distill import DistillConfig, train_distilled

    kd = teacher is not None
    kd_suffix, _, kd_knobs = kd_variant(args) if kd else ("", "", {})
    marker = "-kd" + kd_suffix if kd else ""
    cfg = DistillConfig(data=corpus_for(lang, args), languages=(lang,), base=args.base, kind="clsr", path=path,
                        rank=args.rank, alpha=2.0 * args.rank, side=args.side, encoder_start=args.encoder_start,
                        attention=args.attention, teachers=(str(teacher),) if kd else (),
                        teacher_base=args.teacher_base if kd else None,
                        teacher_cache=str(work / "teacher-cache") if kd else None,
                        lr=args.clsr_lr, gate_lr=args.gate_lr, decoder_lr=args.decoder_lr,
                        path_dropout=args.path_dropout, path_dropout_on=args.path_dropout_on,
                        gate_inference=args.validate_gates, gate_warmup=args.gate_warmup, gate_budget=args.gate_budget,
                        path_dropout_ramp=args.path_dropout_ramp, epochs=args.epochs,
                        kd_weight=args.kd_weight if kd else None, temperature=args.temperature if kd else 1.0,
                        precision=DECODER_RECIPE["precision"] if args.lora_recipe == "decoder" else None,
                        batch_size=args.batch_size, max_train=args.max_train,
                        patience=args.patience, seed=args.train_seed, test=False, progress=False,
                        run_dir=str(work / f"run-{lang}-clsr-{path}{marker}{variant(args)[0]}"
                                             f"{layout_suffix(args)}"))
    knobs = dict(base=args.base, data=cfg.data, n=args.max_train, e=args.epochs, lr=args.clsr_lr, p=path, r=args.rank,
                 side=args.side, k=args.encoder_start, t=str(teacher), s=args.train_seed, **variant(args)[2],
                 **kd_knobs, **({"tb": args.teacher_base} if kd and args.teacher_base else {}))
    return cached(work / f"{lang}-clsr-{path}{'-kd' if kd else ''}-{tag(**knobs)}.safetensors",
                  lambda: train_distilled(cfg)[0][0])


def _precision(experts) -> str | None:
    """The Lightning precision the experts trained at, as their manifests record it (``bf16-mixed``, ``32-true``;
    several joined by ``/``; None for files from before CLSR manifests recorded it)."""
    found = sorted({p for e in experts if (p := e.manifest.get("hyperparameters", {}).get("precision"))})
    return "/".join(found) or None


def run(args, results: dict, work: Path, save) -> None:
    from distill.clsr import ClsrConfig, parameters_active_per_token

    langs, untouched, rows = split(args.languages), split(args.untouched), results["rows"]
    ev = Evaluator(args, work, corpus_for)
    total = ev.parameters()
    results["base_parameters"] = total

    def done(key):  # the teacher is not run on the untouched languages
        return key in rows and set(rows[key]["test"]) >= set(langs) and (
            key == "teacher" or set(rows[key]["untouched"]) >= set(untouched))

    if not done("base"):
        rows["base"] = {"label": f"{Path(args.base).name} (no expert)", "test": {l: ev.stored(l) for l in langs},
                        "untouched": {l: ev.stored(l) for l in untouched}, "stored": {}, "active": total,
                        "minutes": None}
        save()
    from registry.expert_file import check_compatible, load_expert

    teachers = {lang: teacher_file(lang, args, work) for lang in langs}
    # The teachers' base: the students' own, or --teacher-base (a student cut from it: benchmarks/cut_student.py)
    tev = Evaluator(argparse.Namespace(**{**vars(args), "base": args.teacher_base}), work, corpus_for) \
        if args.teacher_base else ev
    for path, _ in teachers.values():  # a teacher for another base (e.g. the defaults with a --base) is refused
        check_compatible(load_expert(path).manifest, tev.base, what=f"teacher {path} (--teachers)")
    if not done("teacher"):
        experts = {lang: load_expert(path) for lang, (path, _) in teachers.items()}
        utt = {lang: e.manifest.get("data", {}).get("utterances") for lang, e in experts.items()}
        on = f"{Path(args.teacher_base).name} " if args.teacher_base else "base "
        rows["teacher"] = {"label": f"teacher: {on}+ LoRA on {'/'.join(str(n) for n in set(utt.values()))} utt.",
                           "test": {l: tev.stored(l, teachers[l][0]) for l in langs}, "untouched": {},
                           "stored": {l: e.num_parameters for l, e in experts.items()},
                           "active": tev.parameters() + max(e.num_parameters for e in experts.values()),
                           "minutes": _minutes([s for _, s in teachers.values()]),
                           "files": {l: str(p) for l, (p, _) in teachers.items()}}
        save()
    if not done("lora") and not args.no_lora:
        trained = {lang: lora_student(lang, args, work) for lang in langs}
        per_expert = {lang: {u: ev.with_expert(e, u) for u in untouched} for lang, (e, _) in trained.items()}
        where = "decoder" if args.lora_recipe == "decoder" else "train's default recipe (enc -3.. + dec)"
        rows["lora"] = {"label": f"LoRA r{args.rank} {where}, one per language",
                        "test": {l: ev.with_expert(trained[l][0], l) for l in langs},
                        "untouched": {u: _mean([per_expert[l][u] for l in langs]) for u in untouched},
                        "untouched_per_expert": per_expert,
                        "stored": {l: e.num_parameters for l, (e, _) in trained.items()},
                        "active": total + max(e.num_parameters for e, _ in trained.values()),
                        "minutes": _minutes([s for _, s in trained.values()]),
                        "precision": _precision(e for e, _ in trained.values())}
        save()
    for path in args.path:
        config = ClsrConfig(kind=path, rank=args.rank, side=args.side, encoder_start=args.encoder_start,
                            attention=args.attention)
        where = {"both": f"enc {args.encoder_start}.. + dec", "decoder": "decoder",
                 "encoder": f"enc {args.encoder_start}.. only"}[args.side]
        for kd in (False,) if args.no_kd else (True,) if args.kd_only else (False, True):
            suffix, label_part, _ = variant(args)
            kd_suffix, kd_label, _ = kd_variant(args)
            gates, decode_suffix, decode_label = decode_gates(args)  # decoded otherwise than validated: own rows
            suffix, label_part = suffix + decode_suffix, label_part + decode_label
            plain = f"clsr-{path}-{args.side}-{args.encoder_start}" + suffix
            key = f"clsr-{path}-{args.side}-{args.encoder_start}" + ("-kd" + kd_suffix if kd else "") + suffix
            if done(key):
                continue
            trained = {lang: clsr_student(lang, args, work, path, teachers[lang][0] if kd else None)
                       for lang in langs}
            test, kept = ev.clsr({l: e for l, (e, _) in trained.items()}, langs, untouched, gates)
            label = f"CLSR {path} ({where}{label_part}) " + (f"+ KD (JS{kd_label}, teacher)" if kd else "without KD")
            rows[key] = {"label": label,
                         "test": test, "untouched": kept,
                         "stored": {l: e.num_parameters for l, (e, _) in trained.items()},
                         "active": total + parameters_active_per_token(ev.base.model.config, config),
                         "minutes": _minutes([s for _, s in trained.values()]),
                         "precision": _precision(e for e, _ in trained.values()),
                         "hyperparameters": next(iter(trained.values()))[0].manifest["hyperparameters"],
                         **({"without_kd": plain} if kd else {})}
            save()


def record_pseudo_labels(results: dict) -> bool:
    """Copy the ``pseudo_labels`` record of the students' corpus card (``benchmarks/held_out_teacher.py
    --pseudo-label`` writes it: how many training clips carry human transcripts, how many the teacher's) into
    ``results``, so that the table says which labels the students had; True when it changed ``results``."""
    from trainers.corpus.loading import corpus_card

    data = results.get("setup", {}).get("data")
    found = corpus_card(data).get("pseudo_labels") if data and Path(data).is_dir() else None
    if not found or results.get("pseudo_labels") == found:
        return False
    results["pseudo_labels"] = found
    return True


def _minutes(seconds) -> float | None:
    return None if any(s is None for s in seconds) else round(sum(seconds) / 60, 1)


def _mean(rows: list[dict]) -> dict:
    return {"wer": sum(r["wer"] for r in rows) / len(rows), "cer": sum(r["cer"] for r in rows) / len(rows),
            "n": rows[0]["n"]}


def main(argv=None) -> int:
    from trainers.configs import DistillConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--languages", default="uk,pt", help="student languages ('' only rewrites the table)")
    p.add_argument("--untouched", default=None, help="languages not trained, evaluated under every model (default: "
                   "the stored table's, so a new row joins it; nl,ru for a new table)")
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--teacher-base", default=None, help="the teachers' base when it is not --base (a larger "
                   "Whisper; --base then a student cut from it, as benchmarks/cut_student.py makes); --teachers "
                   "must then name existing expert files of that base")
    p.add_argument("--data", help="one corpus with every language (default data/<lang>-expert per language)")
    p.add_argument("--teachers", default="runs/{lang}-expert/expert.safetensors",
                   help="teacher expert file per language, a pattern with {lang}; trained on the whole training "
                        "split when missing")
    p.add_argument("--max-train", type=int, default=120, help="student training utterances per language")
    p.add_argument("--path", default="full", type=split,
                   help="CLSR paths, comma-separated: full (default), lowrank, or full,lowrank")
    p.add_argument("--side", default="decoder", choices=["decoder", "both", "encoder"], help="CLSR layout")
    p.add_argument("--encoder-start", type=int, default=0, help="with --side both/encoder: CLSR encoder layers >= K")
    p.add_argument("--attention", action="store_true", help="CLSR paths and gates on the attention projections of "
                   "the same layers too (self q/k/v/out, cross q/out: what the LoRA recipe adapts beside fc1/fc2)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank, and CLSR low-rank rank")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate")
    p.add_argument("--clsr-lr", type=float, default=None, help="CLSR learning rate (default: the recipe's)")
    p.add_argument("--gate-lr", type=float, default=None, help="CLSR gates' learning rate (default: --clsr-lr)")
    p.add_argument("--gate-budget", type=float, default=DistillConfig.gate_budget, help="CLSR gate budget: the "
                   "target mean gate over every gate value of a batch, encoder frames included (default %(default)s, "
                   "the paper's training scripts; 1 drives every gate open)")
    p.add_argument("--decoder-lr", type=float, default=None,
                   help="CLSR decoder-side paths' learning rate (default: --clsr-lr)")
    p.add_argument("--path-dropout", type=float, default=0.3, help="CLSR language-path dropout (default 0.3, the "
                   "recipe's)")
    p.add_argument("--path-dropout-on", default="output", choices=["output", "delta"], help="CLSR path dropout on "
                   "the path's whole output (default, the recipe's) or on its low-rank delta alone")
    p.add_argument("--gate-warmup", type=float, default=0.0, help="CLSR gates held open at first, released over "
                   "this fraction of the steps (default 0, the recipe's)")
    p.add_argument("--path-dropout-ramp", type=float, default=0.0, help="CLSR path dropout raised from 0 over this "
                   "fraction of the steps (default 0)")
    p.add_argument("--validate-gates", default="hard", choices=["hard", "soft"], help="CLSR gates in validation, "
                   "which picks the best epoch, and recorded in the students (distill --gate-inference): hard "
                   "(default, the paper's: each token takes one path) or soft (paths mixed by sigmoid(G), as in "
                   "training)")
    p.add_argument("--gate-inference", default=None, choices=["hard", "soft"], help="CLSR gates when decoding "
                   "(default: --validate-gates); otherwise than validated: rows of their own, the students reused")
    p.add_argument("--no-kd", action="store_true", help="CLSR rows without KD only (their KD rows on a later run)")
    p.add_argument("--kd-only", action="store_true", help="CLSR rows with KD only (their rows without KD on a later "
                   "run)")
    p.add_argument("--no-lora", action="store_true", help="no LoRA row (on a later run)")
    p.add_argument("--kd-weight", type=float, help="KD loss weight of the KD rows (default 0.5, the recipe's)")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature of the KD rows (default 1)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--test-limit", type=int, default=None, help="test utterances per language (default all)")
    p.add_argument("--seed", type=int, default=1, help="corpus seed (default 1, as benchmarks/expert_wer.py)")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--lora-recipe", default="decoder", choices=["decoder", "default"],
                   help="the LoRA rows' and trained teachers' recipe: decoder only in float32 (default; this table's "
                        "first runs; the CLSR rows then train in float32 too), or train's default (decoder + top "
                        "three encoder layers, bf16 where native)")
    p.add_argument("--device", default=None, help="where test decoding runs: cpu, cuda (default: CUDA when "
                   "available, else CPU); training always follows Lightning's choice")
    p.add_argument("--name", default="distill_wer", help="results file stem: <out>/<name>.{json,md}")
    p.add_argument("--work", default="runs/distill-wer", help="experts, caches and training logs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    if args.no_kd and args.kd_only:
        p.error("--no-kd and --kd-only leave no CLSR row; use one of them")
    if unknown := [x for x in args.path if x not in ("full", "lowrank")]:
        p.error(f"--path: unknown {', '.join(unknown)}; use full, lowrank or full,lowrank")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results_path = out / f"{args.name}.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.untouched is None:  # a row added to a table keeps its untouched languages (else the table restarts)
        args.untouched = results.get("setup", {}).get("untouched", "nl,ru")
    if args.languages:
        setup = {"languages": args.languages, "untouched": args.untouched, "base": args.base, "data": args.data,
                 "max_train": args.max_train, "epochs": args.epochs, "test_limit": args.test_limit,
                 **({"lora_recipe": args.lora_recipe} if args.lora_recipe != "decoder" else {}),
                 **({"teacher_base": args.teacher_base} if args.teacher_base else {})}
        if {k: v for k, v in results.get("setup", {}).items() if k != "commands"} != setup:
            if results:
                print(f"{results_path}: another setup; starting a new table")
            results = {"setup": {**setup, "commands": []}, "rows": {}}
        command = recorded(Path(__file__).name, argv)
        if command not in results["setup"]["commands"]:
            results["setup"]["commands"].append(command)

        def save():
            results_path.write_text(json.dumps(results, indent=2))

        run(args, results, work, save)
    if not results:
        print(f"no results in {results_path} yet")
        return 1
    if record_pseudo_labels(results):  # a corpus of benchmarks/held_out_teacher.py --pseudo-label: say so
        results_path.write_text(json.dumps(results, indent=2))
    md = table(results)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
