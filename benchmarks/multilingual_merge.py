"""Many languages in one expert: LoRS vs linear averaging vs TIES vs DARE vs each single expert.

    python benchmarks/multilingual_merge.py                           # uk,pt,nl,ru; ~40 min on 2 CPU cores
    python benchmarks/multilingual_merge.py --languages uk,pt,nl,ru --test-limit 50 \\
        --methods linear,ties,dare_linear,lors
    python benchmarks/multilingual_merge.py --languages ''            # only rewrite the table from the JSON

Per language, a rank-16 language expert trained on 400 synthesized utterances of ``data/<lang>-expert`` (the
corpora of benchmarks/expert_wer.py): the first file found of ``runs/<lang>-expert/expert.safetensors`` (the
experts of that benchmark), ``runs/fusion/<lang>-400.safetensors`` (benchmarks/fusion_low_resource.py), else
one is trained here (decoder-only, into ``runs/multilingual-merge``). Every language's expert is then merged into
ONE expert per method, with the same weights (``1/N`` each, i.e. averaging; TIES: weight 1 each, its disjoint mean
averages by itself) and the methods' default options:

- ``linear``: exact average of the task vectors (LoRA ranks concatenated);
- ``ties``: trim to the top 20% entries, elect signs, disjoint mean;
- ``dare_linear``: drop 50% of entries at random (seeded), rescale, average;
- ``lors``: LoRS-Merging, each expert's delta truncated to half its rank and magnitude-pruned to 50%, averaged.

Each language's test set (the first ``--test-limit`` utterances, held-out sentences and voices) is decoded under
the base, under every single expert and under every merged expert: a language x expert WER matrix
(``inference.language_matrix``, as ``whisper-experts eval --experts`` prints) whose mean column is the number to
compare. Writes ``<out>/<name>.{json,md,png}``; the goal is LoRS >= 5% relative better than
linear averaging on the mean WER, reported as it comes out.

Real speech and tuned merges (issue 16, item 4)::

    python benchmarks/real_fusion.py --supports de:synth,sk:synth --supports-only   # the synthetic experts
    python benchmarks/multilingual_merge.py --languages cs,nl,de,sk --tune --name real_merge --test-limit 100 \\
        --experts cs=runs/real/cs-teacher-all-e2.safetensors,nl=runs/real/nl-teacher-all-e2.safetensors \\
        --experts de=runs/real-fusion/de-espeak.safetensors,sk=runs/real-fusion/sk-espeak.safetensors \\
        --corpora cs=data/fillets,nl=data/fillets,de=data/de-espeak,sk=data/sk-espeak   # 88 min on 2 CPU cores

``--experts LANG=FILE`` takes given expert files, ``--corpora LANG=DIR`` each language's corpus (validation
and test splits). ``--tune`` searches each method's options (and for the averaging methods a scale of the
``1/N`` weights) on the mean validation WER over the first ``--dev-limit`` validation utterances per language
(grids in ``TUNING``), then tests each method at its best setting; the table then also gives the pooled WER
change of each merge against linear with its paired-bootstrap 95% interval on the same test utterances, and
``<name>-tuning.png`` plots every setting tried.

Multi-expert KD against merging and routing (issue 16, item 5)::

    python benchmarks/multilingual_merge.py --languages cs,nl --tune --dev-limit 50 --student --student-epochs 1 \\
        --name real_student --test-limit 100 --runs runs/real-student \\
        --experts cs=runs/real/cs-teacher-all-e2.safetensors,nl=runs/real/nl-teacher-all-e2.safetensors \\
        --corpora cs=data/fillets,nl=data/fillets     # 107 min on 2 CPU cores (docs/results.md)

``--student`` trains one LoRA student (``distill --kind lora``: train's default layout, decoder + encoder layers
3.., rank 16) on the languages' training splits together, each batch scored by its language's expert as
teacher (top-32 log-probabilities cached once), for ``--student-epochs`` epochs at most (best validation WER
kept); cached under ``--runs``. ``--student-file FILE`` takes one already trained. Every table also has the row
``routed: own expert``: each language served by its own expert, as routing by the known language does (built
from the single-expert rows, no extra decoding). Student and routed rows get the same pooled change against
linear as the merges.

Every decoded row (test rows and ``--tune`` trials) is kept under ``<runs>/scores``, keyed by the base, the
expert's tensors, the clips and the decoding options (``benchmarks/scores.py``): run again with one thing
changed (``--student-epochs 3``, another method), only the rows it changes are decoded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402

METHOD_WEIGHTS = {"ties": "ones", "dare_ties": "ones"}  # sign-elected disjoint means average by themselves
# --tune: per method, the grid of (weight scale, options) tried on validation. The scale multiplies the default
# weights (1/N; 1 for TIES); linear at scale 1 is the plain average every other trial is compared with.
TUNING = {
    "linear": [(scale, {}) for scale in (1.0, 1.5, 2.0)],
    "ties": [(1.0, {"density": d}) for d in (0.1, 0.2, 0.5, 0.8)],
    "dare_linear": [(scale, {"drop_rate": r}) for scale in (1.0, 2.0) for r in (0.3, 0.5, 0.7)],
    "lors": [(scale, {"rank_ratio": q, "density": d}) for scale in (1.0, 2.0) for q in (0.25, 0.5, 1.0)
             for d in (0.3, 0.6)],
}
COMPARED = ("merged", "student", "routed")  # rows compared with linear
STUDENT, ROUTED = "student: multi-expert KD", "routed: own expert"
SEARCHED = ("runs/{lang}-expert/expert.safetensors", "runs/fusion/{lang}-400.safetensors",
            "runs/multilingual-merge/{lang}-400.safetensors")


def pairs(text: str | list[str] | None, what: str) -> dict[str, str]:
    """``"cs=A,nl=B"`` (or that option given several times) -> ``{"cs": "A", "nl": "B"}``."""
    if isinstance(text, list):
        text = ",".join(text)
    out = {}
    for item in (x.strip() for x in (text or "").split(",") if x.strip()):
        if "=" not in item:
            raise SystemExit(f"{what}: {item!r} is not LANG=PATH")
        lang, path = item.split("=", 1)
        out[lang.strip()] = path.strip()
    return out


def corpus_of(lang: str, args) -> str:
    from benchmarks.fusion_low_resource import corpus_for

    return pairs(args.corpora, "--corpora").get(lang) or corpus_for(lang, args.seed)


def expert_for(lang: str, args):
    """(language expert, where it came from): a given or existing expert file, else a decoder-only one trained here."""
    from registry.expert_file import load_expert, save_expert
    from trainers.configs import DECODER_RECIPE
    from trainers.train_lora import TrainConfig, train_lora_expert

    given = pairs(args.experts, "--experts").get(lang)
    if given:
        return load_expert(given), given
    for pattern in SEARCHED:
        path = Path(pattern.format(lang=lang))
        if path.is_file():
            return load_expert(path), str(path)
    path = Path(SEARCHED[-1].format(lang=lang))
    cfg = TrainConfig(data=corpus_of(lang, args), languages=(lang,), base=args.base, rank=16, alpha=32.0,
                      epochs=8, lr=1e-3, batch_size=16, patience=3, test=False,
                      run_dir=str(path.parent / f"run-{lang}"), **DECODER_RECIPE)
    expert, _ = train_lora_expert(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_expert(expert, path)
    return expert, str(path)


def student_for(langs, sources: dict, args):
    """(the multi-expert KD student, where it came from): ``--student-file``, or trained here from the language
    experts as teachers on the languages' one corpus (cached by its configuration)."""
    from benchmarks.trained import cached, config_knobs, file_digest, tag
    from registry.expert_file import load_expert
    from trainers.train_distill import DistillConfig, train_distilled

    if args.student_file:
        return load_expert(args.student_file), args.student_file
    corpora = {corpus_of(lang, args) for lang in langs}
    if len(corpora) != 1:
        raise SystemExit(f"--student trains on one corpus holding every language; they are in {sorted(corpora)} "
                         "(give --corpora with one directory for all, or --student-file)")
    runs = Path(args.runs)
    cfg = DistillConfig(data=corpora.pop(), languages=tuple(langs), base=args.base, kind="lora",
                        teachers=tuple(sources[lang] for lang in langs), teacher_cache=str(runs / "teacher-cache"),
                        side="both", encoder_start=-3, rank=16, alpha=32.0, epochs=args.student_epochs,
                        max_train=args.student_max_train, patience=2, test=False, progress=True,
                        run_dir=str(runs / "run-student"))
    name = tag(cfg=config_knobs(cfg), teachers=[file_digest(sources[lang]) for lang in langs])
    path = runs / f"student-{'-'.join(langs)}-{name}.safetensors"
    runs.mkdir(parents=True, exist_ok=True)
    return cached(path, lambda: train_distilled(cfg)[0][0])[0], str(path)


def merged_experts(experts, names, methods, seed: int, settings: dict | None = None):
    """(row label, fused expert, merge info) per method; ``settings``: method -> (weight scale, options)."""
    from lora_experts.merge import fuse_experts

    out = []
    n = len(experts)
    for method in methods:
        scale, options = (settings or {}).get(method, (1.0, {}))
        weights = [scale * (1.0 if METHOD_WEIGHTS.get(method) == "ones" else 1.0 / n)] * n
        t0 = time.time()
        fused, result = fuse_experts(experts, weights, method, names=names, seed=seed, **options)
        info = {"method": method, "weights": weights, "options": result.options, "kind": fused.kind,
                "relative_error": result.relative_error, "merge_seconds": round(time.time() - t0, 2)}
        out.append((f"merged: {method}", fused, info))
    return out


def tune(base, experts, names, methods, dev, seed: int, cache: Path | None = None) -> tuple[dict, list[dict]]:
    """Each method's best (weight scale, options) by mean validation WER over the languages, and every trial
    (a trial decoded before for the same merge and clips is read back from ``cache``)."""
    from benchmarks.scores import cached_report
    from inference.evaluation import DecodeOptions

    best, trials = {}, []
    for method in methods:
        for scale, options in TUNING.get(method, [(1.0, {})]):
            (_, fused, info), = merged_experts(experts, names, [method], seed, {method: (scale, options)})
            report = cached_report(base, fused, dev, DecodeOptions(batch_size=16), cache)
            mean = sum(r.wer for r in report.languages.values()) / len(report.languages)
            trials.append({"method": method, "scale": scale, "options": options, "dev_mean_wer": 100 * mean,
                           "relative_error": info["relative_error"]})
            print(f"tune {method} scale {scale:g} {options}: dev mean WER {100 * mean:.1f}", flush=True)
            if method not in best or mean < best[method][2]:
                best[method] = (scale, options, mean)
    return {m: (s, o) for m, (s, o, _) in best.items()}, trials


def _pooled(report) -> dict:
    """A report's utterances as one "language" holding them all (ids kept apart per language)."""
    from inference.evaluation import paired_counts

    return {"utterances": [{**u, "language": "all", "id": f"{u['language']}/{u['id']}"}
                           for u in paired_counts(report)]}


def pooled_changes(matrix) -> dict[str, dict]:
    """Per merged row: its pooled test WER against linear's on the same utterances (paired bootstrap over every
    language's utterances together)."""
    from inference.evaluation import paired_comparison

    rows = dict(zip(matrix.labels, matrix.reports))
    if "merged: linear" not in rows:
        return {}
    linear = _pooled(rows["merged: linear"])
    return {label: paired_comparison(linear, _pooled(report))["all"] for label, report in rows.items()
            if label.startswith(COMPARED) and label != "merged: linear"}


def student_vs_routed(matrix) -> dict | None:
    """The student's pooled test WER against routing by the known language (each clip by its own expert), paired
    on the same utterances; None without both rows. Item 5's question: does one student replace the routing?"""
    from inference.evaluation import paired_comparison

    rows = dict(zip(matrix.labels, matrix.reports))
    if not {STUDENT, ROUTED} <= set(rows):
        return None
    return paired_comparison(_pooled(rows[ROUTED]), _pooled(rows[STUDENT]))["all"]


def trial_label(trial: dict) -> str:
    """``"lors x2 rank_ratio=0.5 density=0.3"``: one --tune trial's method, weight scale and options."""
    return " ".join([trial["method"], f"x{trial['scale']:g}", *(f"{k}={v:g}" for k, v in trial["options"].items())])


def plot_trials(results: dict, path: str) -> str | None:
    """PNG of the --tune trials: each setting's mean validation WER as a bar, grouped by method, the plain average's
    as a dashed line, each method's best (the setting tested) darker."""
    trials = results.get("trials")
    if not trials:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(t["method"] for t in trials))
    best = {m: min((t for t in trials if t["method"] == m), key=lambda t: t["dev_mean_wer"]) for m in methods}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7.5, 0.28 * len(trials) + 1.4))
    for i, t in enumerate(trials):
        color = colors[methods.index(t["method"]) % len(colors)]
        ax.barh(i, t["dev_mean_wer"], color=color, alpha=1.0 if t is best[t["method"]] else 0.45)
        ax.text(t["dev_mean_wer"], i, f" {t['dev_mean_wer']:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(len(trials)), [trial_label(t) for t in trials], fontsize=7)
    ax.invert_yaxis()
    plain = next((t["dev_mean_wer"] for t in trials if t["method"] == "linear" and t["scale"] == 1.0), None)
    if plain is not None:
        ax.axvline(plain, color="grey", linestyle="--", linewidth=1, label=f"plain average {plain:.1f}")
        ax.legend(fontsize=8, loc="lower right")
    low = min(t["dev_mean_wer"] for t in trials)
    ax.set_xlim(max(0.0, low - 10), max(t["dev_mean_wer"] for t in trials) + 9)
    ax.set_xlabel(f"mean validation WER % over {', '.join(results['languages'])} "
                  f"({results.get('dev_limit', '?')} utterances each)")
    ax.set_title("merge settings tried (darker: each method's best, the one tested)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(results: dict) -> str:
    """Markdown: rows (base, single experts, merged experts) x languages of test WER %, mean, and vs linear."""
    from inference.confidence import format_change

    langs, rows = results["languages"], results["rows"]
    linear = next((r["mean_wer"] for r in rows if r["label"] == "merged: linear"), None)
    lines = ["| expert | " + " | ".join(langs) + " | mean WER % | vs linear |", "|" + "---|" * (len(langs) + 3)]
    for r in rows:
        cells = [f"**{w:.1f}**" if lang in r["own"] else f"{w:.1f}" for lang, w in zip(langs, r["wer"])]
        rel = f"{100 * (r['mean_wer'] / linear - 1):+.1f}%" if linear and r["label"].startswith(COMPARED) else ""
        if r["label"] in results.get("pooled_vs_linear", {}):
            rel += f" (pooled {format_change(results['pooled_vs_linear'][r['label']])})"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['mean_wer']:.1f} | {rel} |")
    n = ", ".join(f"{lang} {k}" for lang, k in zip(langs, results["n"]))
    text = "\n".join(lines) + (f"\n\nNormalized test WER %, test utterances per language: {n}. Bold: the expert's "
                               "own language(s).\n")
    if results.get("tuned"):
        text += ("\nEach merge at its best setting on validation (mean WER over the languages, first "
                 f"{results['dev_limit']} validation utterances each): "
                 + "; ".join(f"{m}: weights x{s:g}" + (f", {o}" if o else "") for m, (s, o) in results["tuned"].items())
                 + f" ({len(results['trials'])} trials).\n")
    if results.get("student"):
        text += f"\nStudent: one LoRA taught by the language experts ({results['student']}).\n"
    if results.get("student_vs_routed"):
        text += ("\nStudent against routing by the known language (pooled over every language's clips, paired): "
                 f"{format_change(results['student_vs_routed'])}.\n")
    if results.get("command"):
        text += f"\nCommand: `{results['command']}`\n"
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--languages", default="uk,pt,nl,ru", help="languages to merge (default uk,pt,nl,ru)")
    p.add_argument("--methods", default="linear,ties,dare_linear,lors", help="merge methods to compare")
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--test-limit", type=int, default=30, help="test utterances per language (default 30)")
    p.add_argument("--seed", type=int, default=1, help="corpus seed (default 1, as benchmarks/expert_wer.py)")
    p.add_argument("--experts", action="append",
                   help="given expert files, LANG=FILE,... (repeatable; others: found or trained as above)")
    p.add_argument("--corpora", action="append",
                   help="corpora, LANG=DIR,... (repeatable; default data/<lang>-expert, synthesized if missing)")
    p.add_argument("--tune", action="store_true", help="search each method's options on validation (TUNING)")
    p.add_argument("--dev-limit", type=int, default=30, help="--tune: validation utterances per language")
    p.add_argument("--student", action="store_true", help="add a LoRA student taught by the experts (multi-expert KD)")
    p.add_argument("--student-file", help="a student already trained (implies --student)")
    p.add_argument("--student-epochs", type=int, default=2, help="--student: epochs at most (default 2)")
    p.add_argument("--student-max-train", type=int, default=None, help="--student: training clips per language")
    p.add_argument("--runs", default="runs/multilingual-merge",
                   help="trained experts, students, their logs and the decoded rows (scores/)")
    p.add_argument("--name", default="multilingual_merge", help="results file stem (default multilingual_merge)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.name}.json"
    langs = [x.strip() for x in args.languages.split(",") if x.strip()]
    if not langs:
        results = json.loads(json_path.read_text())
        (out / f"{args.name}.md").write_text(table(results))
        plot_trials(results, str(out / f"{args.name}-tuning.png"))
        print(table(results))
        return 0

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from benchmarks.scores import cached_report
    from inference.evaluation import DecodeOptions, utterances_from_dataset
    from inference.language_matrix import language_matrix, plot_matrix
    from registry.bases import load_base
    from trainers.corpus.loading import load_corpus

    experts, sources = [], {}
    for lang in langs:
        expert, source = expert_for(lang, args)
        experts.append(expert)
        sources[lang] = source
    names = [f"{lang}-expert" for lang in langs]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    utterances, dev = [], []
    for lang in langs:
        corpus = load_corpus(corpus_of(lang, args))
        utterances += utterances_from_dataset(corpus["test"], [lang], limit=args.test_limit)
        dev += utterances_from_dataset(corpus["validation"], [lang], limit=args.dev_limit)
    base = load_base(args.base, device="cpu")
    cache = Path(args.runs) / "scores"  # decoded rows: a rerun with one row changed decodes only that row
    settings, trials = tune(base, experts, names, methods, dev, args.seed, cache) if args.tune else (None, [])
    merged = merged_experts(experts, names, methods, args.seed, settings)
    rows = [(f"single: {lang}", e) for lang, e in zip(langs, experts)] + [(label, e) for label, e, _ in merged]
    opts = DecodeOptions(batch_size=16)

    spent = [0.0]  # seconds this run spent decoding (rows read back from the cache cost next to nothing)

    def decode(expert):
        t = time.time()
        report = cached_report(base, expert, utterances, opts, cache, progress=True)
        spent[0] += time.time() - t
        return report

    student_source = None
    if args.student or args.student_file:
        for expert in [None, *(e for _, e in rows)]:  # decoded and kept before the student's long training
            decode(expert)
        student, student_source = student_for(langs, sources, args)
        rows.append((STUDENT, student))
    matrix = language_matrix(base.model, base.processor, utterances, rows, opts, decode=decode).routed()
    data = matrix.as_dict()
    results = {"languages": data["languages"], "n": data["n"], "experts": sources,
               "merges": [info for _, _, info in merged], "decode_seconds": round(spent[0]),
               "rows": [{"label": label, "own": own, "wer": wer, "cer": cer, "mean_wer": mean}
                        for label, own, wer, cer, mean in zip(data["rows"], data["own_languages"], data["wer"],
                                                              data["cer"], data["mean_wer"])],
               "pooled_vs_linear": pooled_changes(matrix),
               **({"student_vs_routed": vs} if (vs := student_vs_routed(matrix)) else {}),
               "command": recorded(Path(__file__).name, argv)}
    if args.tune:
        results.update(tuned=settings, trials=trials, dev_limit=args.dev_limit)
    if student_source:
        results["student"] = student_source
    json_path.write_text(json.dumps(results, indent=2))
    (out / f"{args.name}.md").write_text(table(results))
    plot_matrix(matrix, str(out / f"{args.name}.png"), title=f"test WER %: {', '.join(langs)} merged")
    plot_trials(results, str(out / f"{args.name}-tuning.png"))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
