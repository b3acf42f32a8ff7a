"""``whisper-experts eval``: WER/CER per language of a base model on a corpus split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainers.cli.common import add_clsr_gates_argument, split_list

DESCRIPTION = """\
Decode a corpus split with a base Whisper (batched, greedy unless --beams) and report per language WER and
CER, raw and normalized with Whisper's BasicTextNormalizer, the utterance count and the real-time factor.
The language token is forced to each utterance's language, or detected with --language auto (then the
language-ID accuracy is reported too). Decoding is bounded against runaway repetition; the report says how.

examples:
  whisper-experts eval --base whisper-base --data data/corpus --split test
  whisper-experts eval --base whisper-base --data data/corpus --languages de,uk --language auto --out de-uk.json
  whisper-experts eval --base openai/whisper-small --data data/corpus --limit 20 --batch-size 8
  whisper-experts eval --base whisper-base --data data/uk --expert uk-espeak@latest
  whisper-experts eval --base whisper-base --data data/multi4 --experts de-espeak,nl-espeak,multi4 \\
      --out matrix.json --plot matrix.png

An expert of any kind that can be applied to one model works: lora, task_vector, sparse, and clsr (the
model becomes a CLSR Whisper and every utterance takes the expert's language path). With --experts A,B,C
(registry specs or expert files, merged experts included) the split is decoded under the base alone and under
each expert in turn, all on one loaded base (each expert is taken out again, the base restored bit-exactly,
before the next), and a language x expert matrix of normalized WER is printed (an expert's own languages in
bold), written under "matrix" in --out, and drawn with --plot FILE.
"""


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    """Decoding options shared by commands that decode."""
    p.add_argument("--batch-size", type=int, default=16, help="utterances per batch (default 16)")
    p.add_argument("--language", default=None,
                   help="'auto' to detect each utterance's language, a code to force one; default: the corpus label")
    p.add_argument("--beams", type=int, default=1, help="beam size (default 1 = greedy)")
    p.add_argument("--guard", choices=["duration", "reference"], default="duration",
                   help="bound on new tokens: from the audio duration (default, as in real use) or from the "
                        "reference lengths (peeks at the answers; only to compare with older figures)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="explicit bound, overrides --guard")
    p.add_argument("--no-repetition-guard", dest="repetition_guard", action="store_false",
                   help="do not stop and cut repetition loops (see inference/decoding.py)")


def decode_options(args):
    from inference.evaluation import DecodeOptions

    return DecodeOptions(batch_size=args.batch_size, language=args.language, num_beams=args.beams,
                         guard=args.guard, max_new_tokens=args.max_new_tokens,
                         repetition_guard=args.repetition_guard)


def load_for_eval(base, spec: str, force: bool = False, registry: str | None = None, clsr_gates: str | None = None):
    """The expert named ``spec`` (an expert file, else a registry spec), checked against ``base``.

    Args:
        clsr_gates: ``hard`` or ``soft``: a CLSR expert is applied with its gates used so, whatever it records
            (its manifest's ``gate_inference`` is overridden in memory; the report says which was used).

    Returns:
        (the :class:`~registry.expert_file.Expert`, its identity for the report).
    """
    from inference.kinds import expert_kind
    from registry.expert_file import check_compatible
    from registry.lookup import open_expert

    expert, identity = open_expert(spec, registry)
    check_compatible(expert.manifest, base, force=force, what=f"expert {spec}")
    expert_kind(expert.kind).require("apply", f"expert {spec}")
    identity = {**identity, "kind": expert.kind, "languages": expert.languages,
                "parameters": expert.num_parameters, "trained_on": expert.manifest["base"]}
    if expert.kind == "clsr":
        from distill.clsr import recorded_gate_inference

        hp = expert.manifest.setdefault("hyperparameters", {})
        hp["gate_inference"] = clsr_gates or recorded_gate_inference(hp)
        identity["gate_inference"] = hp["gate_inference"]
    return expert, identity


def attach_for_eval(base, spec: str, force: bool = False, registry: str | None = None,
                    clsr_gates: str | None = None) -> dict:
    """Apply the expert named ``spec`` (file or registry spec) to ``base.model`` for good, as its kind does
    (``inference.kinds``: LoRA attached, dense and sparse deltas added, CLSR routed for every utterance, its gates
    used as ``clsr_gates`` says or as it records); returns its identity."""
    from inference.kinds import expert_kind

    expert, identity = load_for_eval(base, spec, force, registry, clsr_gates)
    expert_kind(expert.kind).apply(base.model, expert, restorable=False)
    return identity


def _row_label(spec: str) -> str:
    return Path(spec).name if Path(spec).is_file() else spec


def run_eval(base_spec: str, data: str, split: str, languages, limit, opts, out: str | None, progress=True,
             expert: str | None = None, force: bool = False, experts: list[str] | None = None,
             registry: str | None = None, plot: str | None = None, clsr_gates: str | None = None) -> dict:
    """Load base (+ expert) and corpus, evaluate, print the table, optionally write JSON; returns the report.

    With ``experts`` (specs or files), also evaluate under each expert in turn on the same base and add the
    language x expert matrix (``inference.language_matrix``) to the report under ``matrix``; ``plot`` draws it.
    ``clsr_gates`` (``hard`` / ``soft``) overrides how CLSR experts use their gates.
    """
    from inference.evaluation import evaluate, utterances_from_dataset
    from registry.bases import load_base
    from trainers.corpus.loading import load_corpus

    if expert and experts:
        raise ValueError("give --expert (evaluate with one expert attached) or --experts (the matrix), not both")
    if plot and not experts:
        raise ValueError("--plot draws the language x expert matrix; give --experts A,B,... too")
    if experts and len(set(map(_row_label, experts))) != len(experts):
        raise ValueError(f"--experts names an expert twice ({','.join(experts)}); give each once")
    from registry.home import ensure_writable

    # Fail before minutes of decoding, not after.
    if out:
        ensure_writable(Path(out).parent, "the evaluation report", hint="choose another --out")
    if plot:
        ensure_writable(Path(plot).parent, "the matrix plot", hint="choose another --plot")
    corpus = load_corpus(data)
    if split not in corpus:
        raise ValueError(f"{data} has no split {split!r}; it has {', '.join(corpus)}")
    utterances = utterances_from_dataset(corpus[split], languages, limit)
    if not utterances:
        raise ValueError(f"no utterances to evaluate in {data} [{split}]")
    base = load_base(base_spec)
    if opts.language not in (None, "auto") and base.multilingual and opts.language not in base.languages:
        raise ValueError(f"unknown language {opts.language!r} for {base.name}; it knows {', '.join(base.languages)}")
    for lang in sorted({u.language for u in utterances}):
        if base.multilingual and lang not in base.languages:
            raise ValueError(f"corpus language {lang!r} is not a Whisper language of {base.name}")
    meta = {"base": base.name, "base_fingerprint": base.fingerprint, "data": str(data), "split": split,
            "language_mode": opts.language or "labelled", "num_beams": opts.num_beams}
    if experts:
        result = _run_matrix(base, utterances, experts, opts, force, registry, plot, meta, progress, clsr_gates)
    else:
        identity = attach_for_eval(base, expert, force, registry, clsr_gates) if expert else None
        report = evaluate(base.model, base.processor, utterances, opts, progress=progress)
        if identity:
            report.meta["expert"] = identity
            print(f"expert: {identity.get('ref') or identity.get('file')} ({', '.join(identity['languages'])})")
        report.meta.update(meta)
        print(report.markdown())
        print(f"\ndecoding bound: {report.guard}")
        result = report.as_dict()
    if out:
        from registry.atomic import atomic_write_text

        atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False))
        print(f"wrote {out}")
    return result


def _run_matrix(base, utterances, specs, opts, force, registry, plot, meta, progress, clsr_gates=None) -> dict:
    """The matrix mode of :func:`run_eval`: the base's report plus ``matrix`` and one entry per expert."""
    from inference.language_matrix import language_matrix, plot_matrix

    # every expert checked before decoding
    loaded = [load_for_eval(base, spec, force, registry, clsr_gates) for spec in specs]
    matrix = language_matrix(base.model, base.processor, utterances,
                             [(_row_label(spec), e) for spec, (e, _) in zip(specs, loaded)], opts, progress)
    result = matrix.reports[0].as_dict()
    result["meta"].update(meta)
    result["matrix"] = matrix.as_dict()
    result["experts"] = [{"label": label, "expert": identity, **report.as_dict()}
                         for label, (_, identity), report in zip(matrix.labels[1:], loaded, matrix.reports[1:])]
    for entry in result["experts"]:
        entry.pop("meta")  # the decoding bound is the base's: same utterances, same options
    print(matrix.markdown())
    print(f"\nnormalized WER % of each language's {meta['split']} utterances (n = "
          f"{', '.join(f'{lang} {n}' for lang, n in zip(matrix.languages, result['matrix']['n']))}) under the base "
          "and each expert alone; bold: the expert's own languages")
    print(f"decoding bound: {matrix.reports[0].guard}")
    if plot:
        title = f"WER % on {Path(meta['data']).name} [{meta['split']}]"
        try:
            print(f"plot: {plot_matrix(matrix, plot, title=title)}")
        except ImportError:
            print("(no plot: pip install matplotlib)")
    return result


def _run(args) -> int:
    run_eval(args.base, args.data, args.split, split_list(args.languages), args.limit, decode_options(args), args.out,
             expert=args.expert, force=args.force, experts=split_list(args.experts), registry=args.registry,
             plot=args.plot, clsr_gates=args.clsr_gates)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="WER/CER per language on a corpus split", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base",
                   help="base model: name, directory or hub id (default whisper-base)")
    p.add_argument("--data", required=True, help="corpus directory (from `corpus synth` / `corpus from-dir`)")
    p.add_argument("--split", default="test", help="split to decode (default test)")
    p.add_argument("--languages", help="comma-separated language codes to keep (default: all)")
    p.add_argument("--limit", type=int, help="at most N utterances per language")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--expert", help="attach this expert: a registry spec (uk-espeak@latest) or an expert file")
    p.add_argument("--experts", help="comma-separated experts (specs or files, merged ones too): the language x "
                                      "expert WER matrix, base and each expert in turn")
    p.add_argument("--plot", help="with --experts: write the matrix as a PNG heatmap here (needs matplotlib)")
    p.add_argument("--registry", help="registry directory (default <home>/registry)")
    p.add_argument("--force", action="store_true", help="apply an expert trained on another base anyway")
    add_clsr_gates_argument(p)
    add_decode_arguments(p)
    p.set_defaults(func=_run)
