"""``whisper-experts router``: train a learned router over a pack's experts; inspect a router file."""

from __future__ import annotations

import argparse
import json

from trainers.cli.common import print_table

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

Options can also come from a YAML file (--config): its keys are the flags' names with underscores (pack: a list);
flags given override it.

examples:
  whisper-experts router train --pack packs/eu3.safetensors --data data/eu4 --languages uk,pt,nl,de \\
      --out packs/eu3-router.safetensors
  whisper-experts router train --pack packs/eu3.safetensors --data data/eu4 --languages uk,pt,nl \\
      --out router.safetensors --epochs 10 --lr 1e-3 --hidden 128 --aux-weight 0
"""


def options():
    """``router train``'s flags and ``--config`` keys: the fields of :class:`trainers.configs.RouterTrainConfig`."""
    from trainers.configs import RouterTrainConfig
    from trainers.options import Flag, RecipeOptions

    return RecipeOptions("whisper-experts router train", RouterTrainConfig,
                         flags={"pack": Flag(metavar="FILE", repeat=True),
                                "progress": Flag(("--quiet",), const=False, help="no progress bars")},
                         keys={"out": str})


def _read(args):
    """(the run's config, the router file to write), from ``--config`` and the flags (which override it)."""
    from trainers.configs import RouterTrainConfig

    values = options().values(args)
    out = args.out or values.pop("out", None)
    values.pop("out", None)
    for name, example in (("pack", "--pack packs/eu3.safetensors"), ("data", "--data data/eu4"),
                          ("languages", "--languages uk,pt,nl,de: the codes of the language mix")):
        if not values.get(name):
            raise ValueError(f"no --{name} given (e.g. {example})")
    if not out:
        raise ValueError("no --out given: the router file to write (e.g. --out packs/eu3-router.safetensors)")
    return RouterTrainConfig(**values), out


def _train(args) -> int:
    from trainers.train_router import train_router

    cfg, out = _read(args)
    router, report = train_router(cfg)
    router.save(out)
    val, oracle = report["validation"], report["oracle"]
    print(f"wrote {out}  (best epoch {report['best_epoch']}: validation routing accuracy "
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
    opts = options()
    g = t.add_argument_group("what")
    g.add_argument("--config", help=opts.config_help())
    opts.add(g, "pack", "data", "languages")
    g.add_argument("--out", help="the router file to write (.safetensors)")
    opts.add(g, "base", "force")
    opts.add(t.add_argument_group("router and optimisation"), "hidden", "dropout", "epochs", "lr", "weight_decay",
             "aux_weight", "batch_size", "seed")
    opts.add(t.add_argument_group("data and machine"), "max_train", "max_validation", "cache_dir", "device",
             "progress")
    opts.add_rest(t)
    t.set_defaults(func=_train)

    i = sub.add_parser("inspect", help="print a router file's experts, slots and metrics", formatter_class=formatter,
                       description="Print a router's base, experts, slots and validation metrics (its manifest)."
                                   "\n\nexamples:\n  whisper-experts router inspect packs/eu3-router.safetensors\n"
                                   "  whisper-experts router inspect packs/eu3-router.safetensors --json")
    i.add_argument("file", help="a router .safetensors file")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=_inspect)
