"""Support-language fusion for a low-resource target on real speech (issue 16, item 3).

    python benchmarks/real_fusion.py                                 # cs-100 real + sk, pl, cs synthetic + nl real
    python benchmarks/real_fusion.py --supports sk:synth,pl:synth    # only the related languages
    python benchmarks/real_fusion.py --supports de:synth,cs=runs/real/cs.safetensors --target nl --name real_fusion_nl
    python benchmarks/real_fusion.py --supports sk:synth,pl:synth --method ties --option density=1.0 \\
        --search grid --trials 6 --name real_fusion_cs_skpl_ties_ctl   # TIES; the shrinkage controls are on by default
    python benchmarks/real_fusion.py --supports cs:synth-domain --method ties --option density=1.0 \\
        --search grid --trials 6 --name real_fusion_cs_domain_ties   # synthetic Czech of the training levels' text
    python benchmarks/real_fusion.py --supports cs:synth-domain --synth-per-language 1200 \\
        --domain-train-fraction 0.85 --method ties --option density=1.0 --search grid --trials 6 \\
        --name real_fusion_cs_domain_full_ties        # all of that text, 85% of it in the support's train split
    python benchmarks/real_fusion.py --table-only                    # rewrite the table (and plot) from the JSON
    python benchmarks/real_fusion.py --supports de:synth,sk:synth --supports-only  # only train those experts
    python benchmarks/real_fusion.py --supports ru:asterisk --search grid --trials 6 --name real_fusion_cs_ru
                                                                     # real Russian phone prompts as the support
    python benchmarks/real_fusion.py --target-seed 1 --supports cs=runs/real/cs-rest-100.safetensors \\
        --search fixed --weights 0.6,0.4 --name real_fusion_cs_twin_seed1
                                                      # the target retrained with seed 1, weights chosen before

Target: ``--target`` (cs) with only ``--target-train`` (100) real training clips of the Fish Fillets corpus
(``--data``, made by ``whisper-experts corpus fetch fillets``); validation and test clips are its real ones
(whole held-out game levels). Supports (``--supports``, comma-separated):

* ``LANG:synth``: an expert trained on an espeak-ng corpus of LANG (``<synth-dir>/<LANG>-espeak``,
  ``--synth-per-language`` utterances over 70/10/20 splits, made here if missing), validated on its own
  synthetic validation split;
* ``LANG:synth-domain``: the same, but espeak-ng reads the transcripts of ``--data``'s training levels in LANG
  (in-domain text: a low-resource language often has a script or subtitles of its domain but few recordings;
  never a validation or test level's text), ``<synth-dir>/<LANG>-espeak-domain`` (at other sizes or
  ``--domain-train-fraction`` shares, ``-<utterances>[-train<percent>]`` is added to the corpus's and expert's
  names; a cached ``<LANG>-domain.txt`` made from another corpus is refused, not reused);
* ``LANG:real``: an expert trained on ``--real-support-train`` real clips of LANG from ``--data``;
* ``LANG:asterisk``: an expert trained on the real recorded phone prompts of LANG (one speaker, about 390
  training clips; ``<synth-dir>/asterisk-<LANG>``, made with ``trainers.corpus.asterisk`` from Debian's
  packages if missing), validated on their own validation split;
* ``LANG=FILE``: an expert file already trained (for example the nl teacher of benchmarks/distill_wer.py).

Every expert trained here uses ``train``'s default recipe (rank 16, decoder + encoder layers 3.., bf16 where
native; at most ``--epochs`` epochs, best validation WER kept) and is cached under ``--runs``. The fusion
weights (target first) are searched on the target's real validation WER (``trainers.fusion.fuse_for_target``,
``--search bayes``: every weight free, ``grid``: one lambda for the pooled supports, or ``interpolate``: the
target's weight 1 - lambda; the target alone always among the candidates), or given (``--search fixed
--weights``: chosen beforehand, for example by another seed's search; scored on validation for the record).
``--target-seed`` retrains the target with another seed (named ``<target>-real-<N>-seed<S>``): a 100-clip
expert's test WER moves about 5% from seed to seed, so a fusion gain is checked against more than one draw of
the target. Test rows: whisper-base, the target expert alone, each support alone, the fused expert;
WER with its 95% bootstrap interval, and each row's paired change against the target alone on the same clips
(rows are cached under ``<runs>/test-scores`` by base, expert and clips, so a run with other supports decodes
only its new rows).
``--scaled-target`` (on by default; ``--no-scaled-target`` for none) adds two shrinkage controls (a merge that
takes a smaller step than the target, as TIES's disjoint mean does, gains from that shrinkage alone): the target
alone scaled (no support) at the grid's lambdas, its scale chosen on validation; and the target scaled by the fused
expert's own step along it (the fused delta projected on the target's, ``lora_experts.similarity.step_along``;
what is left is the supports' own part). Both are tested like the fused expert, which is compared with each on
the same clips.
The goal (issue 16): fused at least 10% relative better than the target alone.

Writes ``<out>/<name>.{json,md}`` and the search plot ``<out>/<name>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402
from benchmarks.scores import score_key  # noqa: E402
from benchmarks.support_corpora import (DOMAIN_TRAIN_FRACTION, SYNTH_PER_LANGUAGE, asterisk_corpus,  # noqa: E402
                                        domain_corpus, domain_size, domain_tag, synth_corpus, synth_size)


def parse_supports(text: str) -> list[tuple[str, str, str | None]]:
    """``"sk:synth,nl=FILE"`` -> ``[("sk", "synth", None), ("nl", "file", "FILE")]``."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if "=" in item:
            lang, path = item.split("=", 1)
            out.append((lang, "file", path))
        elif ":" in item and item.split(":", 1)[1] in ("synth", "synth-domain", "real", "asterisk"):
            lang, kind = item.split(":", 1)
            out.append((lang, kind, None))
        else:
            raise SystemExit(f"--supports: {item!r} is not LANG:synth, LANG:synth-domain, LANG:real, LANG:asterisk "
                             "or LANG=FILE")
    return out


def trained(name: str, data: str, lang: str, max_train: int | None, args, seed: int = 0) -> tuple[object, float]:
    """``train``'s default recipe on ``data`` (cached as ``<runs>/<name>.safetensors`` + its timing)."""
    from registry.expert_file import load_expert, save_expert
    from trainers.train_lora import TrainConfig, train_lora_expert

    runs = Path(args.runs)
    path, timing = runs / f"{name}.safetensors", runs / f"{name}.json"
    if path.is_file() and timing.is_file():
        return load_expert(path), json.loads(timing.read_text())["seconds"]
    t0 = time.time()
    cfg = TrainConfig(data=data, languages=(lang,), base=args.base, epochs=args.epochs, patience=args.patience,
                      max_train=max_train, test=False, progress=False, run_dir=str(runs / f"run-{name}"), seed=seed)
    expert, _ = train_lora_expert(cfg)
    runs.mkdir(parents=True, exist_ok=True)
    save_expert(expert, path)
    seconds = round(time.time() - t0, 1)
    timing.write_text(json.dumps({"seconds": seconds}))
    return expert, seconds


def scored(base, expert, utterances, cache: Path | None = None) -> dict:
    """Test WER/CER (with intervals) and the per-utterance counts of the base with ``expert`` (None: alone).

    With ``cache`` (a folder), a row already scored for the same base, expert and clips is read back instead of
    decoded again (another run of this script with other supports decodes only its new rows)."""
    import contextlib

    from inference.evaluation import DecodeOptions, evaluate, paired_counts
    from inference.language_matrix import expert_applied

    path = cache / f"{score_key(base, expert, utterances)}.json" if cache is not None else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    with expert_applied(base.model, expert) if expert is not None else contextlib.nullcontext():
        report = evaluate(base.model, base.processor, utterances, DecodeOptions(batch_size=16), progress=False)
    d = report.as_dict()
    row = next(iter(d["languages"].values()))
    out = {**{k: row[k] for k in ("wer", "cer", "n", "wer_ci95")}, "utterances": paired_counts(d)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return out


def _train_size(data: str) -> int:
    from trainers.corpus.loading import load_corpus

    return len(load_corpus(data)["train"])


def searched(results: dict) -> bool:
    """Whether a run has a search to plot (``--search fixed`` scores one trial; with ``--scaled-target``, its
    control is a curve)."""
    return len(results.get("trials", [])) > 1 or bool(results.get("scaled_target"))


def plot(results: dict, path: Path) -> None:
    """The search plot (validation WER against the fusion weights) from a results file's trials."""
    from trainers.fusion import SearchResult, Trial, best_trial
    from trainers.fusion_plots import plot_search

    trials = [Trial(**t) for t in results["trials"]]
    best = best_trial(trials)  # as the search chose
    control = [Trial(**t) for t in results.get("scaled_target", [])]
    scope = " (decoder deltas only)" if results.get("support_scope", "all") != "all" else ""
    plot_search(SearchResult(trials, best, control=control), results["names"], str(path),
                title=f"{results['target']} ({results['target_train']} real clips) + supports{scope}:\n"
                      "validation WER vs fusion weights")


def run(args, results: dict, save) -> None:
    from inference.evaluation import utterances_from_dataset
    from registry.bases import load_base
    from registry.expert_file import check_compatible, load_expert
    from trainers.corpus.loading import load_corpus
    from trainers.cli.fuse import parse_options
    from trainers.fusion import fuse_for_target

    target = args.target
    supports = parse_supports(args.supports)
    results["synth_sizes"] = {lang: synth_size(lang, args) for lang, kind, _ in supports if kind == "synth"}
    domain = {lang: domain_size(lang, args) for lang, kind, _ in supports if kind == "synth-domain"}
    if domain:
        results["domain_sizes"] = domain
        results["domain_train_fraction"] = args.domain_train_fraction
    experts, names, minutes = [], [], {}
    t_name = f"{target}-real-{args.target_train}" + (f"-seed{args.target_seed}" if args.target_seed else "")
    if not args.supports_only:
        expert, secs = trained(t_name, args.data, target, args.target_train, args, seed=args.target_seed)
        experts.append(expert), names.append(t_name)
        minutes[t_name] = round(secs / 60, 1)
    for lang, kind, path in supports:
        if kind == "file":
            name, expert, secs = f"{lang}-{Path(path).stem}", load_expert(path), None
        elif kind == "synth":
            name = f"{lang}-espeak"
            expert, secs = trained(name, synth_corpus(lang, args), lang, None, args)
        elif kind == "synth-domain":
            name = f"{lang}-espeak-domain{domain_tag(lang, args)}"
            expert, secs = trained(name, domain_corpus(lang, args), lang, None, args)
        elif kind == "asterisk":
            name = f"{lang}-asterisk"
            data = asterisk_corpus(lang, args)
            expert, secs = trained(name, data, lang, None, args)
            results.setdefault("asterisk_sizes", {})[lang] = _train_size(data)
        else:
            name = f"{lang}-real-{args.real_support_train}"
            expert, secs = trained(name, args.data, lang, args.real_support_train, args)
        experts.append(expert), names.append(name)
        minutes[name] = None if secs is None else round(secs / 60, 1)
    if args.supports_only:
        for name in names:
            print(f"{name}: {Path(args.runs) / name}.safetensors", flush=True)
        return
    base = load_base(args.base, device="cpu")
    for name, expert in zip(names, experts):
        check_compatible(expert.manifest, base, what=f"expert {name}")
    corpus = load_corpus(args.data)
    dev = utterances_from_dataset(corpus["validation"], [target])
    test = utterances_from_dataset(corpus["test"], [target], args.test_limit)
    t0 = time.time()
    options = parse_options(args.option)
    fused, search = fuse_for_target(base, experts, names, target, dev, method=args.method, options=options,
                                    search=args.search,
                                    trials=args.trials, progress=False, support_scope=args.support_scope,
                                    weights=args.weights, scaled_target=args.scaled_target)
    search_minutes = round((time.time() - t0) / 60, 1)
    results.update(target=target, target_train=args.target_train, support_scope=args.support_scope,
                   trials=search.trace(), names=names)
    if search.control:
        results["scaled_target"] = search.control_trace()
    if searched(results):
        plot(results, Path(args.out) / f"{args.name}.png")
    cache = Path(args.runs) / "test-scores"
    rows = {"base": {"label": f"{Path(args.base).name} (no expert)", **scored(base, None, test, cache)}}
    for name, expert in zip(names, experts):
        rows[name] = {"label": f"{name} alone" + (" (the target)" if name == t_name else ""),
                      "train_minutes": minutes[name], **scored(base, expert, test, cache)}
    target_only = list(search.best.weights) == [1.0] + [0.0] * (len(names) - 1)
    scope = "" if args.support_scope == "all" else f", supports' {args.support_scope} only"
    how = "weights fixed beforehand" if args.search == "fixed" else f"{args.search} search, {len(search.trials)} trials"
    method = args.method + "".join(f" {k}={v}" for k, v in (search.best.options or {}).items())
    searched_options = {k: v for k, v in options.items() if isinstance(v, list)}
    if searched_options and not target_only:
        method += " searched over " + "; ".join(f"{k}={','.join(map(str, v))}" for k, v in searched_options.items())
    rows["fused"] = {"label": f"fused ({method}, {how}{scope})"
                              + (": the target alone" if target_only else ""),
                     "weights": dict(zip(names, search.best.weights)), "search_minutes": search_minutes,
                     # weights (1, 0, ...) are the target expert itself: its row, not decoded twice
                     **{k: v for k, v in (rows[t_name] if target_only else scored(base, fused, test, cache)).items()
                        if k not in ("label", "train_minutes")}}
    control = search.control_best
    if control is not None:  # the shrinkage controls: the scale validation chose, and the fused expert's own step
        from lora_experts.similarity import step_along
        from lora_experts.task_vectors import task_vector

        step, rest = step_along(search.merge.task_vector, task_vector(experts[0]))
        results["fused_step"] = {"along_target": step, "orthogonal": rest}
        for key, scale, why in [("scaled", control.weights[0], "scale chosen on validation"),
                                ("matched", round(step, 3), "the fused expert's step along the target")]:
            row = rows[t_name] if scale == 1.0 else scored(base, scaled_expert(experts[0], t_name, scale, target),
                                                          test, cache)
            rows[key] = {"label": f"control: {t_name} alone scaled by {scale:g} ({why})", "scale": scale,
                         **{k: v for k, v in row.items() if k not in ("label", "train_minutes")}}
    results.update({"base": Path(args.base).name, "target_expert": t_name, "dev_n": len(dev),  # target, trials: above
                    "dev_wer": {"target_only": None if args.search == "fixed" else search.trials[0].wer,
                                "fused": search.best.wer}, "rows": rows})
    save()


def scaled_expert(expert, name: str, scale: float, language: str):
    """``expert``'s delta times ``scale`` (the shrinkage control's row), as a storable expert."""
    from lora_experts.merge import fused_expert, merge
    from lora_experts.task_vectors import task_vector

    return fused_expert(merge([task_vector(expert)], [scale], "linear", device="cpu"), [expert], [name],
                        languages=[language])


def control_note(results: dict) -> str:
    """The shrinkage controls in words, and the fused expert against each on the same clips (empty without
    ``--scaled-target``)."""
    from inference.confidence import format_change
    from inference.evaluation import paired_comparison

    control = results.get("scaled_target")
    if not control:
        return ""
    rows = results["rows"]
    curve = ", ".join(f"{t['weights'][0]:g}: {100 * t['wer']:.1f}" for t in control)
    note = (f"Shrinkage controls: the target alone scaled, no support (validation WER by scale: {curve}), at the "
            "scale validation chose")
    step = results.get("fused_step")
    if step:
        note += (f", and at the fused expert's own step along the target ({step['along_target']:.2f}; the fused "
                 f"delta is that times the target's plus a part orthogonal to it of {step['orthogonal']:.2f} times "
                 "the target's norm: the supports' own)")
    against = [f"{format_change(next(iter(paired_comparison(rows[k], rows['fused']).values()), None))} against "
               f"the target scaled by {rows[k]['scale']:g}" for k in ("scaled", "matched") if k in rows]
    return note + ". Fused: " + "; ".join(against) + " (paired, same clips). "


def table(results: dict) -> str:
    from inference.confidence import format_change, format_ci
    from inference.evaluation import paired_comparison

    rows, t_name = results["rows"], results["target_expert"]
    own = rows[t_name]
    md = ["| model | test WER % [95% CI] | CER % | vs the target alone [paired 95% CI] | weight in the fusion | "
          "train min |", "|---|---|---|---|---|---|"]
    weights = rows["fused"]["weights"]
    for key, r in rows.items():
        change = "–" if key == t_name else format_change(next(iter(paired_comparison(own, r).values()), None))
        weight = f"{weights[key]:+.2f}" if key in weights else "–"
        train = r.get("train_minutes")
        md.append(f"| {r['label']} | {format_ci(r['wer'], r.get('wer_ci95'))} | {100 * r['cer']:.1f} | {change} | "
                  f"{weight} | {'–' if train is None else f'{train:.1f}'} |")
    dev = results["dev_wer"]
    n = own["n"]
    if dev["target_only"] is None:  # --search fixed: the weights were chosen before this run
        dev_note = (f"Weights fixed beforehand; validation WER of the fused expert on {results['dev_n']} real "
                    f"validation clips {100 * dev['fused']:.1f}. ")
    else:
        dev_note = (f"Weights searched on {results['dev_n']} real validation clips: validation WER "
                    f"{100 * dev['target_only']:.1f} (target alone) -> {100 * dev['fused']:.1f} (fused); "
                    f"search {rows['fused']['search_minutes']:.1f} min. ")
    md.append(f"\nTest: {n} real {results['target']} clips of held-out game levels, {results['base']}, greedy, "
              f"language forced, bounded by audio duration. " + dev_note
              + "".join(f"Synthetic {lang}: {n} espeak-ng utterances (70% trained on). "
                        for lang, n in results.get("synth_sizes", {}).items())
              + "".join(f"Synthetic in-domain {lang}: {n} espeak-ng utterances of the training levels' transcripts "
                        f"({round(100 * results.get('domain_train_fraction', DOMAIN_TRAIN_FRACTION))}% trained on). "
                        for lang, n in results.get("domain_sizes", {}).items())
              + "".join(f"Asterisk {lang}: {n} real phone prompts of one speaker trained on. "
                        for lang, n in results.get("asterisk_sizes", {}).items())
              + control_note(results)
              + f"Command: `{results['command']}`\n")
    return "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="cs", help="target language (default cs)")
    p.add_argument("--target-train", type=int, default=100, help="real training clips of the target (default 100)")
    p.add_argument("--supports", default="sk:synth,pl:synth,cs:synth,nl:real",
                   help="LANG:synth, LANG:real, LANG:asterisk or LANG=FILE, comma-separated "
                        "(default sk:synth,pl:synth,cs:synth,nl:real)")
    p.add_argument("--real-support-train", type=int, default=300, help="real clips of a LANG:real support")
    p.add_argument("--synth-per-language", type=int, default=SYNTH_PER_LANGUAGE,
                   help="utterances of a made espeak-ng corpus")
    p.add_argument("--domain-train-fraction", type=float, default=DOMAIN_TRAIN_FRACTION,
                   help="share of a LANG:synth-domain corpus in its train split (default 0.7; validation 0.1, test "
                        "the rest, which nothing here uses: 0.85 trains on more of the text)")
    p.add_argument("--synth-dir", default="data", help="where the supports' corpora are, espeak-ng <LANG>-espeak "
                   "and Asterisk asterisk-<LANG> (made if missing)")
    p.add_argument("--data", default="data/fillets", help="the real corpus (whisper-experts corpus fetch fillets)")
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--method", default="linear", help="merge method (default linear: task arithmetic)")
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="a merge method option, repeatable (as `whisper-experts fuse --option`), e.g. density=1.0; "
                        "density=0.5,1.0 searches the values with the weights")
    p.add_argument("--search", default="bayes", choices=["grid", "interpolate", "bayes", "fixed"],
                   help="how the weights are found on the target's validation clips (default bayes); fixed: "
                        "--weights as given")
    p.add_argument("--weights", type=lambda t: [float(x) for x in t.split(",")], default=None,
                   help="with --search fixed: one weight per expert, the target's first (e.g. 0.6,0.4)")
    p.add_argument("--target-seed", type=int, default=0,
                   help="seed of the target's training (default 0; others are named <target>-real-<N>-seed<S>)")
    p.add_argument("--scaled-target", action=argparse.BooleanOptionalAction, default=True,
                   help="a control for shrinkage (default on; --no-scaled-target: none): also search the target "
                        "alone's own scale on validation (as many trials as the fusion's grid) and test it, and the "
                        "target at the fused expert's own step; the fused row is compared with both")
    p.add_argument("--support-scope", default="all", choices=["all", "decoder"],
                   help="fuse the supports' decoder deltas only (decoder) or all of them (default all)")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--test-limit", type=int, default=None, help="test clips (default all)")
    p.add_argument("--seed", type=int, default=1, help="synthetic corpus seed")
    p.add_argument("--runs", default="runs/real-fusion", help="trained experts and their logs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="real_fusion", help="results file stem (default real_fusion)")
    p.add_argument("--table-only", action="store_true",
                   help="only rewrite the table (and the plot, for runs since session 19) from the JSON")
    p.add_argument("--supports-only", action="store_true",
                   help="only train (or find) the support experts into --runs, for other benchmarks")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if not args.table_only:
        supports = parse_supports(args.supports)
        n_experts = len(supports) + 1
        if (args.search == "fixed") != (args.weights is not None):
            p.error("--search fixed and --weights go together: give both, or neither")
        if args.weights is not None and len(args.weights) != n_experts:
            p.error(f"--weights: {len(args.weights)} given, one per expert needed ({n_experts}: the target first)")
        if not 0.1 <= args.domain_train_fraction <= 0.85:
            p.error(f"--domain-train-fraction {args.domain_train_fraction}: give 0.1 to 0.85 (validation takes 0.1, "
                    "test at least 0.05)")
        for lang, kind, given in supports:  # refuse a bad spec before training anything
            if kind == "file" and not Path(given).is_file():
                p.error(f"--supports {lang}={given}: no such expert file")
        results = {"command": recorded(Path(__file__).name, argv)}
        run(args, results, lambda: path.write_text(json.dumps(results, indent=2)))
        if args.supports_only:  # run stopped after the experts, before any result was written
            return 0
    if "rows" not in results:
        print(f"no results in {path} yet")
        return 1
    if args.table_only and "names" in results and searched(results):
        plot(results, out / f"{args.name}.png")
    md = table(results)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
