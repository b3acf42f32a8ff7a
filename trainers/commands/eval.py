"""``whisper-experts eval``: WER/CER per language of a base model on a corpus split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainers.commands.common import split_list

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
"""


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    """Decoding options shared by commands that decode."""
    p.add_argument("--batch-size", type=int, default=16, help="utterances per batch (default 16)")
    p.add_argument("--language", default=None,
                   help="'auto' to detect each utterance's language, a code to force one; default: the corpus label")
    p.add_argument("--beams", type=int, default=1, help="beam size (default 1 = greedy)")
    p.add_argument("--guard", choices=["reference", "duration"], default="reference",
                   help="bound on new tokens: from reference lengths (default) or audio duration")
    p.add_argument("--max-new-tokens", type=int, default=None, help="explicit bound, overrides --guard")
    p.add_argument("--no-repetition-guard", dest="repetition_guard", action="store_false",
                   help="do not stop and cut repetition loops (see trainers/decoding.py)")


def decode_options(args):
    from trainers.evaluation import DecodeOptions

    return DecodeOptions(batch_size=args.batch_size, language=args.language, num_beams=args.beams,
                         guard=args.guard, max_new_tokens=args.max_new_tokens,
                         repetition_guard=args.repetition_guard)


def attach_for_eval(base, spec: str, force: bool = False) -> dict:
    """Attach the expert named ``spec`` (file or registry spec) to ``base.model``; returns its identity."""
    from lora_experts.model import attach_expert
    from registry.expert_file import check_compatible, load_expert

    if Path(spec).is_file():
        expert, identity = load_expert(spec), {"file": str(spec)}
    else:
        from registry.store import Registry

        registry = Registry()
        record = registry.resolve(spec)
        expert, identity = registry.get(spec), {"ref": record.ref, "sha256": record.sha256}
    check_compatible(expert.manifest, base, force=force, what=f"expert {spec}")
    if expert.kind == "lora":
        attach_expert(base.model, expert.tensors, expert.manifest["hyperparameters"])
    elif expert.kind == "task_vector":  # a dense fusion result: added to the weights
        from lora_experts.task_vectors import apply_task_vector

        apply_task_vector(base.model, expert.tensors)
    else:
        raise ValueError(f"expert {spec} is a {expert.kind} expert; eval applies lora and task_vector experts")
    return {**identity, "kind": expert.kind, "languages": expert.languages,
            "parameters": expert.num_parameters, "trained_on": expert.manifest["base"]}


def run_eval(base_spec: str, data: str, split: str, languages, limit, opts, out: str | None, progress=True,
             expert: str | None = None, force: bool = False) -> dict:
    """Load base (+ expert) and corpus, evaluate, print the table, optionally write JSON; returns the report."""
    from registry.bases import load_base
    from trainers.corpus.loading import load_corpus
    from trainers.evaluation import evaluate, utterances_from_dataset

    if out:
        from registry.home import ensure_writable

        # Fail before minutes of decoding, not after.
        ensure_writable(Path(out).parent, "the evaluation report", hint="choose another --out")
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
    identity = attach_for_eval(base, expert, force) if expert else None
    report = evaluate(base.model, base.processor, utterances, opts, progress=progress)
    if identity:
        report.meta["expert"] = identity
        print(f"expert: {identity.get('ref') or identity.get('file')} ({', '.join(identity['languages'])})")
    report.meta.update({"base": base.name, "base_fingerprint": base.fingerprint, "data": str(data), "split": split,
                        "language_mode": opts.language or "labelled", "num_beams": opts.num_beams})
    print(report.markdown())
    print(f"\ndecoding bound: {report.guard}")
    result = report.as_dict()
    if out:
        from registry.atomic import atomic_write_text

        atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False))
        print(f"wrote {out}")
    return result


def _run(args) -> int:
    run_eval(args.base, args.data, args.split, split_list(args.languages), args.limit, decode_options(args), args.out,
             expert=args.expert, force=args.force)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="WER/CER per language on a corpus split", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base", help="base model: name, directory or hub id (default whisper-base)")
    p.add_argument("--data", required=True, help="corpus directory (from `corpus synth` / `corpus from-dir`)")
    p.add_argument("--split", default="test", help="split to decode (default test)")
    p.add_argument("--languages", help="comma-separated language codes to keep (default: all)")
    p.add_argument("--limit", type=int, help="at most N utterances per language")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--expert", help="attach this expert: a registry spec (uk-espeak@latest) or an expert file")
    p.add_argument("--force", action="store_true", help="attach an expert trained on another base anyway")
    add_decode_arguments(p)
    p.set_defaults(func=_run)
