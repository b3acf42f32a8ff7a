"""``whisper-experts corpus``: synthesize, import and inspect speech corpora."""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from trainers.cli.common import print_table, split_list

DESCRIPTION = """\
A corpus is a Hugging Face DatasetDict (train / validation / test) of 16 kHz FLAC audio with transcripts
and a language code per utterance, saved with save_to_disk. `synth` makes one offline with espeak-ng over
real sentences (varied voices, speeds and pitches; test voices unseen in train); `fetch fillets` makes a
real-speech corpus (Czech, Dutch) from Debian's packages; `from-dir` and `from-hf` import recorded speech;
`info` and `sources` inspect.

examples:
  whisper-experts corpus fetch fillets --languages cs,nl --out data/fillets
  whisper-experts corpus sources --languages de,uk,nl
  whisper-experts corpus synth --languages de,uk,ru --per-language 100 --out data/synth
  whisper-experts corpus from-dir recordings/ --language uk --out data/uk-rec
  whisper-experts corpus info data/synth
"""

SYNTH_DESCRIPTION = """\
Synthesize a corpus with espeak-ng. Each language gets --per-language distinct real sentences (fortunes,
chatterbot-corpus, UDHR samples, and your --text-file lines first), dealt to train/validation/test so no
sentence is in two splits; test speakers (espeak-ng voice variants) never occur in train. The same --seed
gives the same corpus. The output directory appears only when complete.

examples:
  whisper-experts corpus synth --languages de,uk,ru --per-language 100 --out data/synth
  whisper-experts corpus synth --languages tr --per-language 150 --text-file tr=turkish.txt --out data/tr
  whisper-experts corpus synth --languages en,es --per-language 200 --split 0.5,0.1,0.4 --seed 1 --out data/en-es
"""

SOURCES_DESCRIPTION = """\
Count the usable sentences per language and source, to see how large --per-language can be.

examples:
  whisper-experts corpus sources
  whisper-experts corpus sources --languages de,uk,nl,tr
  whisper-experts corpus sources --languages tr --text-file tr=turkish.txt
"""

FROM_DIR_DESCRIPTION = """\
Import recorded speech from a directory: either an `audiofolder` (metadata.csv or metadata.jsonl with
file_name and transcription/text columns, optionally language and split; or one such folder per split:
train/, validation/ or dev/, test/), or audio files with a same-named .txt transcript next to each.
Files without a split go to --default-split (test).

examples:
  whisper-experts corpus from-dir recordings/ --language uk --out data/uk-rec
  whisper-experts corpus from-dir my_audiofolder/ --out data/mine --default-split train
"""

FROM_HF_DESCRIPTION = """\
Import a Hugging Face audio dataset (hub id or local path). The transcript column is found among
sentence (Common Voice), transcription (FLEURS), text, ...; the language comes from --language or a
language/locale column. Audio is decoded with soundfile, never with datasets' torchcodec decoder.

examples:
  whisper-experts corpus from-hf mozilla-foundation/common_voice_17_0 --config uk --language uk --out data/cv-uk
  whisper-experts corpus from-hf google/fleurs --config nl_nl --language nl --max-per-split 500 --out data/fleurs-nl
"""

FETCH_DESCRIPTION = """\
Make a corpus of real recorded speech from a public source. `fillets`: the voice acting of the game Fish
Fillets NG (GPL-2) from Debian's package mirror: Czech (about 1,700 clips, 1.6 h) and Dutch (about 1,500
clips, 1.5 h), several actors. The packages are fetched with `apt-get download` (no root, nothing installed)
into --cache (default <home>/downloads/fillets) and unpacked there; --from reads an unpacked copy or an
installed game instead. Whole game levels go to train / validation / test (about 70/10/20 of the clips,
always the same levels), so no test scene is trained on. Empty or undecodable clips are skipped and counted.
The import is `corpus from-dir` over a metadata.jsonl listing the game's clips.

`asterisk`: the voice prompts of the Asterisk telephone exchange (CC-BY-SA-3.0), one professional speaker per
language, about 560 prompts (25 min) each, in English, Spanish, French, Italian and Russian (packages
asterisk-core-sounds-<lang> and -<lang>-g722, wide-band G.722). Phone-menu lines, numbers, dates, letters;
tones and silences are left out. One speaker, shared phrases: prompts are dealt to the splits one by one (by a
hash of their name), so its test split is an optimistic one. The project uses Russian as real speech of a
language related to Czech.

examples:
  whisper-experts corpus fetch fillets --languages cs,nl --out data/fillets
  whisper-experts corpus fetch fillets --languages cs --out data/fillets-cs
  whisper-experts corpus fetch fillets --from /usr/share/games/fillets-ng --languages nl --out data/fillets-nl
  whisper-experts corpus fetch asterisk --languages ru --out data/asterisk-ru
"""

INFO_DESCRIPTION = """\
Show a corpus' utterances, hours and voices per split and language.

example:
  whisper-experts corpus info data/synth
"""


def _text_files(values: list[str] | None) -> dict[str, list[Path]]:
    """``["tr=a.txt", "tr=b.txt"]`` -> ``{"tr": [a.txt, b.txt]}``."""
    from trainers.corpus.languages import CorpusError

    files: dict[str, list[Path]] = defaultdict(list)
    for value in values or []:
        language, sep, path = value.partition("=")
        if not sep or not language.strip() or not path.strip():
            raise CorpusError(f"--text-file expects LANG=PATH (e.g. tr=turkish.txt), got {value!r}")
        files[language.strip()].append(Path(path.strip()).expanduser())
    return dict(files)


def _range(value: str) -> tuple[int, int]:
    lo, sep, hi = value.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a range like 130-190, got {value!r}") from None


def _fractions(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected train,validation,test fractions like 0.7,0.1,0.2, got {value!r}")
    return parts  # type: ignore[return-value]


def summary_rows(corpus) -> list[dict]:
    """Per language: utterances per split, hours, voices (train / test), from a loaded corpus."""
    from inference.audio import audio_duration
    from trainers.corpus.loading import SPLITS

    stats: dict[str, dict] = {}
    for split in SPLITS:
        ds = corpus[split]
        for language, voice, audio in zip(ds["language"], ds["voice"], ds.select_columns(["audio"])["audio"]):
            entry = stats.setdefault(language, {s: 0 for s in SPLITS} | {"seconds": 0.0, "voices": defaultdict(set)})
            entry[split] += 1
            entry["seconds"] += audio_duration(audio)
            if voice:
                entry["voices"][split].add(voice)
    rows = []
    for language in sorted(stats):
        entry = stats[language]
        voices = entry["voices"]
        rows.append({
            "language": language, **{s: entry[s] for s in SPLITS}, "hours": f"{entry['seconds'] / 3600:.3f}",
            "voices train/test": f"{len(voices['train'])}/{len(voices['test'])}" if voices else "-",
        })
    return rows


def print_summary(corpus, out: str | Path) -> None:
    """Print where the corpus is and its per-language table (splits, hours, voices)."""
    from trainers.corpus.loading import SPLITS

    print(f"corpus at {out}")
    print_table(summary_rows(corpus), ["language", *SPLITS, "hours", "voices train/test"])


def _synth(args) -> int:
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    languages = split_list(args.languages) or []
    fields = dict(languages=tuple(languages), per_language=args.per_language, seed=args.seed,
                  text_files=_text_files(args.text_file), max_seconds=args.max_seconds)
    if args.split:
        fields.update(zip(("train_fraction", "validation_fraction", "test_fraction"), args.split))
    if args.speed:
        fields["speed_range"] = args.speed
    if args.pitch:
        fields["pitch_range"] = args.pitch
    corpus = synthesize_corpus(SynthConfig(**fields), args.out, progress=not args.quiet, overwrite=args.overwrite)
    print_summary(corpus, args.out)
    return 0


def _sources(args) -> int:
    from trainers.corpus.sources import source_counts

    counts = source_counts(split_list(args.languages), _text_files(args.text_file))
    sources = sorted({s for per in counts.values() for s in per}, key=lambda s: (s.startswith("user:"), s))
    rows = [{"language": lang, "total": sum(per.values()), **per} for lang, per in counts.items()]
    print_table(rows, ["language", "total", *sources])
    return 0


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unusable file(s):")
        for name, reason in skipped:
            print(f"  {name}: {reason}")


def _from_dir(args) -> int:
    from trainers.corpus.importers import corpus_from_dir
    from trainers.corpus.loading import load_corpus, save_corpus

    skipped: list[tuple[str, str]] = []
    corpus = corpus_from_dir(args.directory, language=args.language, text_column=args.text_column,
                             default_split=args.default_split, skip_bad=args.skip_bad, skipped=skipped,
                             progress=True)
    save_corpus(corpus, args.out, overwrite=args.overwrite,
                card={"kind": "recorded", "source": str(Path(args.directory).resolve()),
                      "skipped": len(skipped)}, progress=False)
    _report_skipped(skipped)
    print_summary(load_corpus(args.out), args.out)
    return 0


def _fetch(args) -> int:
    from registry.home import home_dir
    from trainers.corpus import asterisk, fillets
    from trainers.corpus.loading import load_corpus

    source = {"fillets": fillets, "asterisk": asterisk}[args.source]
    languages = split_list(args.languages) or list(source.LANGUAGES)
    if args.source_dir:
        root = fillets.game_root(args.source_dir) if source is fillets else Path(args.source_dir)
    else:
        cache = Path(args.cache) if args.cache else home_dir() / "downloads" / args.source
        print(f"fetching Debian's {args.source} packages for {','.join(languages)} into {cache}")
        root = source.fetch_packages(cache, languages)
    made = source.build_corpus(root, languages, args.out, overwrite=args.overwrite,
                               split=args.split or (0.7, 0.1, 0.2))
    print(f"{made['clips']} clips with transcripts; {sum(made['unrecorded_lines'].values())} lines without a "
          "recording left out")
    _report_skipped(made["skipped"])
    print_summary(load_corpus(args.out), args.out)
    return 0


def _from_hf(args) -> int:
    from trainers.corpus.importers import corpus_from_hf
    from trainers.corpus.languages import CorpusError
    from trainers.corpus.loading import load_corpus, save_corpus

    split_map = None
    if args.split:
        if any("=" not in item for item in args.split):
            raise CorpusError(f"--split expects CORPUS=DATASET (e.g. validation=dev), got {args.split}")
        split_map = dict(item.split("=", 1) for item in args.split)
    skipped: list[tuple[str, str]] = []
    corpus = corpus_from_hf(args.name, config=args.config, split_map=split_map, text_column=args.text_column,
                            language=args.language, audio_column=args.audio_column,
                            max_per_split=args.max_per_split, skip_bad=args.skip_bad, skipped=skipped)
    save_corpus(corpus, args.out, overwrite=args.overwrite, progress=False,
                card={"kind": "imported", "dataset": args.name, "config": args.config, "skipped": len(skipped)})
    _report_skipped(skipped)
    print_summary(load_corpus(args.out), args.out)
    return 0


def _info(args) -> int:
    from trainers.corpus.loading import corpus_card, load_corpus

    corpus = load_corpus(args.directory)
    card = corpus_card(args.directory)
    if card:
        print(f"kind: {card.get('kind', '?')}" + (f", {card['synthesizer']}" if card.get("synthesizer") else ""))
    print_summary(corpus, args.directory)
    return 0


def _sub(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def register(subparsers) -> None:
    """Add ``corpus`` and its actions (synth, sources, from-dir, from-hf, info) to the command line."""
    p = subparsers.add_parser("corpus", help="synthesize, import and inspect speech corpora",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="corpus_command", metavar="ACTION", required=True)

    synth = _sub(sub, "synth", "synthesize a corpus with espeak-ng", SYNTH_DESCRIPTION)
    synth.add_argument("--languages", required=True, help="comma-separated Whisper language codes, e.g. de,uk,ru")
    synth.add_argument("--per-language", type=int, default=100,
                       help="utterances per language over all splits (default 100)")
    synth.add_argument("--out", required=True, help="output directory (must not exist, be empty, or use --overwrite)")
    synth.add_argument("--seed", type=int, default=0,
                       help="fixes sentences, splits, voices, speeds and pitches (default 0)")
    synth.add_argument("--text-file", action="append", metavar="LANG=PATH",
                       help="extra sentences for LANG, one per line, used first (repeatable)")
    synth.add_argument("--split", type=_fractions, metavar="TRAIN,VAL,TEST",
                       help="split fractions (default 0.7,0.1,0.2)")
    synth.add_argument("--speed", type=_range, metavar="LO-HI", help="words per minute range (default 130-190)")
    synth.add_argument("--pitch", type=_range, metavar="LO-HI", help="pitch range within 0-99 (default 30-70)")
    synth.add_argument("--max-seconds", type=float, default=15.0,
                       help="replace utterances longer than this by another sentence (default 15)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing corpus at --out")
    synth.add_argument("--quiet", action="store_true", help="no progress bars")
    synth.set_defaults(func=_synth)

    sources = _sub(sub, "sources", "count usable sentences per language and source", SOURCES_DESCRIPTION)
    sources.add_argument("--languages", help="comma-separated language codes (default: all with an espeak-ng voice)")
    sources.add_argument("--text-file", action="append", metavar="LANG=PATH", help="count these files too")
    sources.set_defaults(func=_sources)

    from_dir = _sub(sub, "from-dir", "import recorded speech from a directory", FROM_DIR_DESCRIPTION)
    from_dir.add_argument("directory", help="directory of audio files with transcripts")
    from_dir.add_argument("--out", required=True, help="output corpus directory")
    from_dir.add_argument("--language", help="language code of all files (unless a language column says otherwise)")
    from_dir.add_argument("--text-column", help="transcript column of metadata.csv/jsonl (default: auto)")
    from_dir.add_argument("--default-split", choices=["train", "validation", "test"], default="test",
                          help="split for files no folder or column assigns (default test)")
    from_dir.add_argument("--overwrite", action="store_true", help="replace an existing corpus at --out")
    from_dir.add_argument("--skip-bad", action="store_true",
                          help="leave out files that cannot be decoded or are empty (listed at the end) "
                               "instead of stopping at the first")
    from_dir.set_defaults(func=_from_dir)

    from_hf = _sub(sub, "from-hf", "import a Hugging Face audio dataset", FROM_HF_DESCRIPTION)
    from_hf.add_argument("name", help="dataset hub id or local path")
    from_hf.add_argument("--out", required=True, help="output corpus directory")
    from_hf.add_argument("--config", help="dataset configuration, e.g. the language for Common Voice / FLEURS")
    from_hf.add_argument("--text-column", help="transcript column (default: sentence, transcription, text, ...)")
    from_hf.add_argument("--audio-column", help="audio column (default: the first Audio feature)")
    from_hf.add_argument("--language", help="language code of all rows (default: a language/locale column)")
    from_hf.add_argument("--split", action="append", metavar="CORPUS=DATASET",
                         help="map a corpus split to a dataset split, e.g. validation=dev (repeatable)")
    from_hf.add_argument("--max-per-split", type=int, help="keep at most this many rows per split")
    from_hf.add_argument("--overwrite", action="store_true", help="replace an existing corpus at --out")
    from_hf.add_argument("--skip-bad", action="store_true",
                         help="leave out rows whose audio cannot be decoded or is empty (listed at the end)")
    from_hf.set_defaults(func=_from_hf)

    fetch = _sub(sub, "fetch", "make a real-speech corpus from a public source (fillets: Czech, Dutch; "
                 "asterisk: en, es, fr, it, ru phone prompts)", FETCH_DESCRIPTION)
    fetch.add_argument("source", choices=["fillets", "asterisk"],
                       help="fillets: Fish Fillets NG voice acting; asterisk: Asterisk voice prompts (both Debian)")
    fetch.add_argument("--out", required=True, help="output corpus directory")
    fetch.add_argument("--languages", help="comma-separated; fillets: among cs,nl, asterisk: among en,es,fr,it,ru "
                                           "(default all)")
    fetch.add_argument("--cache", help="where the packages are downloaded and unpacked "
                                       "(default <home>/downloads/<source>)")
    fetch.add_argument("--from", dest="source_dir", metavar="DIR",
                       help="an unpacked copy of the packages (or the game directory) instead of downloading")
    fetch.add_argument("--split", type=_fractions, metavar="TRAIN,VAL,TEST",
                       help="shares of clips (fillets: by whole levels; asterisk: by prompt; default 0.7,0.1,0.2)")
    fetch.add_argument("--overwrite", action="store_true", help="replace an existing corpus at --out")
    fetch.set_defaults(func=_fetch)

    info = _sub(sub, "info", "utterances, hours and voices per split and language", INFO_DESCRIPTION)
    info.add_argument("directory", help="corpus directory")
    info.set_defaults(func=_info)
