"""``whisper-experts fuse``: fuse experts for a target language (weights searched on dev WER) or merge languages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainers.cli.common import split_list

DESCRIPTION = """\
Fuse stored experts into one, by weighted arithmetic on their weight deltas (task vectors): lora,
task_vector and sparse experts (a clsr expert has no task vector and is refused, saying why).

For a target language (--target, --dev): the target's own expert comes first in --experts, support experts
of related languages after it. The fusion weights are searched on the target's validation WER: --search grid
tries the task-arithmetic paper's lambda in [0, 1] (weights 1, lambda/n, ..., lambda/n), --search interpolate
the same lambdas as a weight interpolation (1 - lambda, lambda/n, ...: a model soup), --search bayes runs
Optuna's TPE over every weight in [-1.5, 1.5] with LoraHub's L1 penalty. All try the target alone first, so
the result is never worse on dev than the target expert. --weights fixes the weights instead (no search).
--support-scope decoder fuses only the supports' decoder deltas and keeps the target's encoder: for supports
trained on other speech (espeak-ng, another recording setup), whose encoder deltas learned that speech.
--scaled-target adds a control for shrinkage: the target alone scaled by the grid's lambdas in (0, 1), the
same number of trials, on the same dev set. A merge that takes a smaller step than the target (TIES's disjoint
mean, an interpolation) can gain from that alone; the control says whether the supports add anything beyond
it (it is reported beside the search and drawn in the plot, never chosen: fix --weights S,0,... to keep it).
Every target fusion also prints the fused delta's step along the target's (it is that many times the target
plus a part orthogonal to it, the supports' own), kept in search.json as fused_step.
The base loads once; candidates are applied in place; the encoder layers below the lowest one an expert
changes run once on the dev set. A PNG of dev WER against the weights is written beside the run.

Without --target: a multi-language merge with fixed weights (--weights, or the method's defaults).

--similarity fuses nothing: it prints how alike the experts are (cosine similarity of their task vectors, the
encoder's and the decoder's deltas apart, and each delta's norm) and draws it as a heatmap. A support whose
delta is near-orthogonal to the target's (cosine about 0) and larger adds mostly its own change to a fusion.
A target fusion prints each support's cosine with the target before its search (seconds) and keeps them in
search.json: on real speech no support below 0.05 helped at any weight.

Methods: linear (exact sum, stored as concatenated LoRA ranks), svd (exact sum truncated to --option rank=R),
task_arithmetic (target + lam x mean of supports), ties (--option density=, lam=), dare_linear / dare_ties
(--option drop_rate=), magnitude_prune (--option density=), lors (--option rank_ratio=, density=,
variant=prune|residual). Options of a method: `whisper-experts fuse --list-methods`. An option given several
values (--option density=0.2,0.5,1.0) is searched with the weights: the weight search runs once per value
(per combination, for several such options) and the best on dev wins; the target alone is always the target
expert itself, never trimmed or dropped by the method.

The fused expert is stored in the registry under --name with its lineage: parents, method, options, weights,
and the dev WER of every trial.

examples:
  whisper-experts fuse --target uk --experts uk-small,ru-espeak --dev data/uk-small --name uk-fused
  whisper-experts fuse --target uk --experts uk-small,ru-espeak,bg-espeak --method linear --search bayes \\
      --trials 12 --dev data/uk-small --name uk-fused
  whisper-experts fuse --target uk --experts uk-small,ru-espeak --weights 1,0.4 --name uk-fixed
  whisper-experts fuse --target cs --experts cs-real-100,sk-espeak --support-scope decoder --dev data/fillets \\
      --name cs-fused-dec
  whisper-experts fuse --target cs --experts cs-real-100,cs-espeak --method ties --option density=0.2,0.5,1.0 \\
      --trials 6 --dev data/fillets --name cs-ties
  whisper-experts fuse --target cs --experts cs-real-100,sk-espeak,pl-espeak --method ties --option density=1.0 \\
      --trials 6 --scaled-target --dev data/fillets --name cs-ties-checked
  whisper-experts fuse --experts de-espeak,nl-espeak,it-espeak,pt-espeak --method lors --name multi4
  whisper-experts fuse --similarity --experts cs-real-100,sk-espeak,runs/real/nl.safetensors --run-dir runs/sim
"""


def _option_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(items) -> dict:
    """``["density=0.2", "variant=residual"]`` -> ``{"density": 0.2, "variant": "residual"}``; a comma-separated
    value is a list of values to search: ``density=0.2,0.5,1.0`` -> ``{"density": [0.2, 0.5, 1.0]}``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected NAME=VALUE, e.g. --option density=0.2")
        if "," in value and not value.lstrip().startswith(("[", "{", '"')):
            parts = [v.strip() for v in value.split(",")]
            if not all(parts):
                raise ValueError(f"--option {item!r}: an empty value in the list; give NAME=V1,V2,..., e.g. "
                                 "--option density=0.2,0.5,1.0")
            out[key] = [_option_value(v) for v in parts]
        else:
            out[key] = _option_value(value)
    return out


def _run(args) -> int:
    if args.list_methods:
        from lora_experts.merge import MERGE_METHODS, method_options

        for name in sorted(MERGE_METHODS):
            opts = ", ".join(f"{k}={v!r}" for k, v in method_options(name).items()) or "(no options)"
            print(f"{name:16s} {opts}")
        return 0
    if args.similarity:
        return _similarity(args)
    from inference.kinds import expert_kind
    from registry.bases import load_base
    from registry.expert_file import check_compatible
    from registry.store import Registry
    from trainers.fusion import fuse_for_target, option_label, target_alone
    from trainers.fusion_plots import plot_search

    names = split_list(args.experts)
    if not names or not args.name:
        raise ValueError("give --experts A,B,... and --name for the fused expert")
    weights = [float(w) for w in split_list(args.weights)] if args.weights else None
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} experts; give one per expert, in order")
    if args.support_scope != "all" and not args.target:
        raise ValueError(f"--support-scope {args.support_scope} applies to a target fusion (--target LANG: "
                         "the first expert is the target's, the others its supports)")
    if args.target and not args.dev and weights is None:
        raise ValueError("a target fusion searches its weights on --dev DIR (the target's corpus); "
                         "or give fixed --weights")
    from registry.records import validate_name

    validate_name(args.name)  # before minutes of searching
    registry = Registry(args.registry)
    for n in names:  # fusion is arithmetic on task vectors: refuse kinds without one before reading any tensor
        expert_kind(registry.resolve(n).kind).require("task_vector", f"expert {n}")
    experts = [registry.get(n) for n in names]
    base = load_base(args.base or experts[0].manifest["base"]["name"])
    for n, e in zip(names, experts):
        check_compatible(e.manifest, base, force=args.force, what=f"expert {n}")
    if args.target and args.target not in experts[0].languages:
        print(f"note: the first expert ({names[0]}) serves {', '.join(experts[0].languages)}, not the target "
              f"{args.target}; it is treated as the target expert anyway")
    dev = None
    if args.dev:
        from inference.evaluation import utterances_from_dataset
        from trainers.corpus.loading import load_corpus

        corpus = load_corpus(args.dev)
        if args.dev_split not in corpus:
            raise ValueError(f"{args.dev} has no {args.dev_split!r} split; it has {', '.join(corpus)}")
        dev = utterances_from_dataset(corpus[args.dev_split], [args.target] if args.target else None, args.dev_limit)
    search = "fixed" if weights is not None else args.search
    if not args.target:
        search = "fixed"
    support_cosines = _support_cosines(experts, names, args.support_scope) if args.target and len(names) > 1 else {}
    options = parse_options(args.option)
    expert, result = fuse_for_target(base, experts, names, args.target, dev, method=args.method,
                                     options=options, search=search, trials=args.trials,
                                     weights=weights, seed=args.seed, batch_size=args.batch_size,
                                     progress=not args.quiet, support_scope=args.support_scope,
                                     scaled_target=args.scaled_target)
    record = registry.add(expert, args.name)
    step = _fused_step(result, experts[0]) if args.target and len(names) > 1 else None
    run_dir = Path(args.run_dir or Path("runs") / args.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    best = result.trace()[result.trials.index(result.best)]
    (run_dir / "search.json").write_text(json.dumps({"experts": names, "method": args.method, "options": options,
                                                     "search": search, "support_cosines": support_cosines,
                                                     "trials": result.trace(), "best": best,
                                                     **({"fused_step": step} if step else {}),
                                                     **({"scaled_target": result.control_trace()}
                                                        if result.control else {})}, indent=2))
    if args.out:
        from registry.expert_file import save_expert

        save_expert(expert, args.out)
    print(f"stored {record.ref} ({expert.kind}, {expert.num_parameters:,} parameters) in the registry")
    if dev is not None:
        target_only = result.trials[0]
        searched_options = len({option_label(t.options) for t in result.trials}) > 1
        print("\n| fusion | weights | dev WER % | dev CER % |\n|---|---|---|---|")
        if search != "fixed":  # a search's first trial is the target alone; fixed weights are one trial
            print(f"| {names[0]} alone | {','.join(f'{w:g}' for w in target_only.weights)} | "
                  f"{100 * target_only.wer:.1f} | {100 * target_only.cer:.1f} |")
        b = result.best
        chosen = "fixed weights" if search == "fixed" else f"chosen ({search}, {len(result.trials)} trials)"
        if searched_options and not target_alone(b.weights):
            chosen += f", {option_label(b.options)}"
        print(f"| {chosen} | {','.join(f'{w:g}' for w in b.weights)} | {100 * b.wer:.1f} | {100 * b.cer:.1f} |")
        control = result.control_best
        if control is not None:
            print(f"| control: {names[0]} alone, best scale of {len(result.control)} | "
                  f"{','.join(f'{w:g}' for w in control.weights)} | {100 * control.wer:.1f} | "
                  f"{100 * control.cer:.1f} |")
            print("\n" + shrinkage_verdict(b, control, names[0], supports=len(names) > 1))
        if step:
            print(f"the fused delta is {step['along_target']:.2f} x {names[0]}'s, plus a part orthogonal to it of "
                  f"{step['orthogonal']:.2f} x its norm (the supports' own): compare with {names[0]} alone scaled "
                  f"by {step['along_target']:.2f}")
        if len(result.trials) > 1 or result.control:
            try:
                png = plot_search(result, names, str(run_dir / "search.png"),
                                  title=f"{args.name}: dev WER ({args.target}) vs fusion weights")
                print(f"\nplot: {png}")
            except ImportError:
                print("\n(no plot: pip install matplotlib)")
    if result.merge is not None and result.merge.relative_error is not None:
        print(f"relative Frobenius error of the {args.method} fusion vs the exact sum: "
              f"{100 * result.merge.relative_error:.2f}%")
    return 0


def _fused_step(result, target) -> dict | None:
    """The fused delta's step along the target expert's and the part orthogonal to it (None when the search
    kept the target alone, scaled or not)."""
    from lora_experts.similarity import step_along
    from lora_experts.task_vectors import task_vector
    from trainers.fusion import target_scaled

    if result.merge is None or target_scaled(result.best.weights):
        return None
    along, rest = step_along(result.merge.task_vector, task_vector(target))
    return {"along_target": along, "orthogonal": rest}


def shrinkage_verdict(best, control, target: str, supports: bool = True) -> str:
    """One line: do the supports beat the target alone at its best scale on dev (the shrinkage control)? Without
    supports (one expert): does a smaller step of it do better than the expert itself?"""
    from trainers.fusion import target_scaled

    fused, scaled = round(100 * best.wer, 1), round(100 * control.wer, 1)
    keep = f"--weights {','.join(f'{w:g}' for w in control.weights)}"
    if control.weights[0] == 1.0:
        if not supports:
            return f"no smaller step of {target} does better on dev than {target} itself ({scaled:.1f}% WER)"
        if target_scaled(best.weights) or fused >= scaled:
            return (f"neither the supports nor a smaller step of {target} beat {target} alone on dev "
                    f"({scaled:.1f}% WER)")
    elif not supports or target_scaled(best.weights) or fused >= scaled:
        head = (f"{target} scaled by {control.weights[0]:g} scores {scaled:.1f}% WER on dev against "
                f"{fused:.1f} for {target} itself" if not supports else
                f"the supports do not beat {target} alone scaled by {control.weights[0]:g} on dev "
                f"({fused:.1f} vs {scaled:.1f}% WER): what the fusion gains here, shrinking the target gains too")
        return f"{head}; to keep the scaled expert: {keep} (check it on held-out clips)"
    return (f"the supports beat {target} alone at its best scale ({control.weights[0]:g}) by {scaled - fused:.1f} "
            "WER points on dev (check it on held-out clips: a dev-set search favours whatever it searched)")


# Below this cosine with the target no support helped on real speech (docs/results.md, issue 16 item 3)
NEAR_ORTHOGONAL = 0.05


def _support_cosines(experts, names, scope: str) -> dict[str, float]:
    """Each support's cosine with the target expert (the fused group: all deltas, or the decoder's), printed with
    a word of warning for a near-orthogonal one; seconds, nothing decoded."""
    from lora_experts.similarity import expert_similarity

    group = "decoder" if scope == "decoder" else "all"
    try:
        sim = expert_similarity(experts, names)
    except ValueError:
        return {}  # a kind without a task vector: the fusion itself refuses it, naming why
    out = {}
    for i, name in enumerate(names[1:], 1):
        cos, ratio = sim.cosine[group][0][i], sim.norms[group][i] / max(sim.norms[group][0], 1e-30)
        out[name] = cos
        if cos != cos:
            print(f"support {name}: no {group} deltas to compare with the target's")
            continue
        hint = (f"; near-orthogonal to the target: supports below {NEAR_ORTHOGONAL} never helped on real speech "
                "(docs/results.md)" if abs(cos) < NEAR_ORTHOGONAL else "")
        print(f"support {name}: cosine {cos:+.3f} with {names[0]} ({group} deltas), norm {ratio:.2f}x the "
              f"target's{hint}")
    return out


def _similarity(args) -> int:
    """``--similarity``: the cosine matrices and norms of the experts' task vectors (printed, JSON, PNG)."""
    from trainers.fusion_plots import write_similarity

    names = split_list(args.experts)
    if not names or len(names) < 2:
        raise ValueError("--similarity compares experts: give --experts A,B,... (registry specs or expert files)")
    labels = [Path(n).stem if Path(n).expanduser().is_file() else n for n in names]
    sim, png = write_similarity(names, labels, Path(args.run_dir or Path("runs") / "similarity"), "similarity",
                                args.registry, {"experts": names})
    for group in ("encoder", "decoder", "all"):
        print(sim.markdown(group) + "\n")
    print(f"plot: {png}" if png else "(no plot: pip install matplotlib)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("fuse", help="fuse experts (weights searched on dev WER) or merge languages",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", help="registry specs, comma-separated; with --target, the target's expert first")
    p.add_argument("--name", help="registry name of the fused expert")
    p.add_argument("--target", help="target language code (weights searched on its dev WER)")
    p.add_argument("--dev", help="corpus directory whose --dev-split scores candidates (the target's utterances)")
    p.add_argument("--dev-split", default="validation", help="split of --dev (default validation)")
    p.add_argument("--dev-limit", type=int, help="at most N dev utterances")
    p.add_argument("--method", default="linear", help="merge method (default linear; see --list-methods)")
    p.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="a merge method option, repeatable; NAME=V1,V2,... searches the values on dev")
    p.add_argument("--search", choices=["grid", "interpolate", "bayes"], default="grid",
                   help="weight search (default grid; interpolate: target 1 - lambda, supports lambda)")
    p.add_argument("--trials", type=int, default=11, help="candidates scored, the target alone included (default 11)")
    p.add_argument("--weights", help="fixed weights, one per expert (no search)")
    p.add_argument("--support-scope", choices=["all", "decoder"], default="all",
                   help="what of the support experts is fused: all (default), or decoder: their decoder deltas "
                        "only, the encoder staying the target's (supports trained on synthetic or other speech)")
    p.add_argument("--scaled-target", action="store_true",
                   help="also score the target alone scaled by the grid's lambdas (a control for shrinkage: do "
                        "the supports add anything beyond a smaller step of the target?); reported, not chosen")
    p.add_argument("--base", help="base model (default: the experts' base)")
    p.add_argument("--registry", help="registry directory (default <home>/registry)")
    p.add_argument("--out", help="also write the fused expert file here")
    p.add_argument("--run-dir", help="where search.json and search.png go (default runs/<name>)")
    p.add_argument("--seed", type=int, default=0, help="seeds DARE and the Bayesian search (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="dev decoding batch size (default 16)")
    p.add_argument("--force", action="store_true", help="fuse experts trained on another base anyway")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list-methods", action="store_true", help="print the merge methods and their options")
    p.add_argument("--similarity", action="store_true",
                   help="fuse nothing: print the cosine similarity and norms of the experts' task vectors "
                        "(encoder, decoder, all) and write similarity.json and .png to --run-dir "
                        "(default runs/similarity)")
    p.set_defaults(func=_run)
