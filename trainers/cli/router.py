"""``whisper-experts router``: train a learned router over a pack's experts; inspect a router file."""

from __future__ import annotations

import argparse
import json

from trainers.cli.common import print_table, split_list

DESCRIPTION = """\
A learned router picks each utterance's expert from the base model's encoder output: a small gate (mean of the
encoder output over the audio frames, LayerNorm, a one-hidden-layer MLP, softmax) over the experts of a pack,
trained on a language mix while the experts and the base stay frozen. It replaces Whisper's language ID
when transcribing with --language auto:

  whisper-experts transcribe *.wav --pack packs/eu3.safetensors --router packs/eu3-router.safetensors

The router's choices ("slots") are the pack's experts, one per language each serves, plus the base model for
each --languages code no expert serves (the router learns to leave it to the base, and names the language to
decode in). Each utterance is decoded in the language of the slot the router picks.

examples:
  whisper-experts router train --pack packs/eu3.safetensors --data data/eu4 --languages uk,pt,nl,de \\
      --out packs/eu3-router.safetensors
  whisper-experts router inspect packs/eu3-router.safetensors
"""

TRAIN = """\
Train a router on the train split of a corpus (whisper-experts corpus synth / from-dir) holding every
--languages code, with the pack's experts and the base frozen. Each step runs every utterance through all
slots at once, weighted by the router's softmax, and minimises the decoder's cross-entropy on its transcript
(in its own language) plus --aux-weight x the cross-entropy of the router against the utterance's own slot
(its language's expert, or the base for a language without one). The base model's encoder output is computed
once per utterance and cached (<data>/.cache), unless an expert of the pack adapts the encoder.

After each epoch: validation routing accuracy (top slot == own slot) and WER of hard top-1 routing; the
router with the lowest validation WER is written to --out, with the oracle WER (every utterance with its own
expert) beside it in its manifest (whisper-experts router inspect FILE).

--aux-weight (default 1): the decoder's loss is computed with each utterance's own language token, so alone
it teaches which expert transcribes best given the language, not which language to decode in, which the router
also decides; 0 trains on the decoder's loss alone (it left German with the experts in a small whisper-base run).

examples:
  whisper-experts router train --pack packs/eu3.safetensors --data data/eu4 --languages uk,pt,nl,de \\
      --out packs/eu3-router.safetensors
  whisper-experts router train --pack packs/eu3.safetensors --data data/eu4 --languages uk,pt,nl \\
      --out router.safetensors --epochs 10 --lr 1e-3 --hidden 128 --aux-weight 0
"""


def _train(args) -> int:
    from trainers.train_router import RouterTrainConfig, train_router

    languages = split_list(args.languages)
    if not languages:
        raise ValueError("no --languages given: the codes of the language mix (e.g. --languages uk,pt,nl,de)")
    cfg = RouterTrainConfig(data=args.data, languages=tuple(languages), pack=tuple(args.pack), base=args.base,
                            hidden=args.hidden, dropout=args.dropout, lr=args.lr, weight_decay=args.weight_decay,
                            aux_weight=args.aux_weight, epochs=args.epochs, batch_size=args.batch_size,
                            max_train=args.max_train, max_validation=args.max_validation, seed=args.seed,
                            cache_dir=args.cache_dir, device=args.device, force=args.force,
                            progress=not args.quiet)
    router, report = train_router(cfg)
    router.save(args.out)
    val, oracle = report["validation"], report["oracle"]
    print(f"wrote {args.out}  (best epoch {report['best_epoch']}: validation routing accuracy "
          f"{100 * val['routing_accuracy']:.1f}%, WER {100 * val['wer']:.1f}%, oracle routing WER "
          f"{100 * oracle['wer']:.1f}%)")
    rows = [{"language": lang, "n": row["n"], "routing accuracy %": f"{100 * row['routing_accuracy']:.0f}",
             "WER %": f"{100 * row['wer']:.1f}", "oracle WER %": f"{100 * oracle['per_language'][lang]['wer']:.1f}"}
            for lang, row in val["per_language"].items()]
    print_table(rows, ["language", "n", "routing accuracy %", "WER %", "oracle WER %"])
    return 0


def _inspect(args) -> int:
    from inference.router import LearnedRouter

    router = LearnedRouter.load(args.file)
    manifest = router.manifest()
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False))
        return 0
    base = manifest["base"] or {}
    print(f"router   {args.file}  ({sum(p.numel() for p in router.parameters()):,} parameters, hidden "
          f"{router.hidden}, created {manifest.get('created', '?')})")
    print(f"base     {base.get('name', '?')}  fingerprint {base.get('fingerprint', '?')}")
    print(f"experts  {', '.join(router.experts)}")
    print_table([{"slot": i, "expert": e or "(base model)", "language": lang}
                 for i, (e, lang) in enumerate(router.slots)], ["slot", "expert", "language"])
    val = (manifest.get("metrics") or {}).get("validation")
    if val:
        print(f"validation: routing accuracy {100 * val['routing_accuracy']:.1f}%, WER {100 * val['wer']:.1f}% "
              f"(oracle {100 * val['oracle_wer']:.1f}%)")
    return 0


def register(subparsers) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("router", help="train a learned router over a pack's experts; inspect one",
                              description=DESCRIPTION, formatter_class=formatter)
    sub = p.add_subparsers(dest="router_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a router on a language mix, experts frozen", description=TRAIN,
                       formatter_class=formatter)
    g = t.add_argument_group("what")
    g.add_argument("--pack", action="append", required=True, metavar="FILE",
                   help="expert pack (.safetensors) whose experts the router chooses between; repeat for several")
    g.add_argument("--data", required=True, help="corpus directory with train and validation splits")
    g.add_argument("--languages", required=True,
                   help="comma-separated codes of the mix; one without an expert gets a base-model slot")
    g.add_argument("--out", required=True, help="the router file to write (.safetensors)")
    g.add_argument("--base", help="base model (default: the pack's base)")
    g.add_argument("--force", action="store_true",
                   help="attach experts trained on other weights of the same architecture and tokenizer")
    g = t.add_argument_group("router and optimisation")
    g.add_argument("--hidden", type=int, default=64, help="hidden width of the gate (default 64; 0: linear)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout on the hidden layer (default 0.1)")
    g.add_argument("--epochs", type=int, default=6, help="epochs, validated after each (default 6)")
    g.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate, cosine decay (default 3e-3)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    g.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the router-vs-own-expert cross-entropy (default 1; 0: decoder loss only)")
    g.add_argument("--batch-size", type=int, default=16, help="utterances per step (default 16)")
    g.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    g = t.add_argument_group("data and machine")
    g.add_argument("--max-train", type=int, help="at most N training utterances per language")
    g.add_argument("--max-validation", type=int, help="at most N validation utterances per language")
    g.add_argument("--cache-dir", help="encoder-output cache directory (default <data>/.cache)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    i = sub.add_parser("inspect", help="print a router file's experts, slots and metrics", formatter_class=formatter,
                       description="Print a router's base, experts, slots and validation metrics (its manifest)."
                                   "\n\nexamples:\n  whisper-experts router inspect packs/eu3-router.safetensors\n"
                                   "  whisper-experts router inspect packs/eu3-router.safetensors --json")
    i.add_argument("file", help="a router .safetensors file")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=_inspect)
