"""The support experts' corpora of ``benchmarks/real_fusion.py``: espeak-ng corpora of a language's offline
sentences (``LANG:synth``) or of the real corpus's training transcripts (``LANG:synth-domain``), and real Asterisk
phone prompts (``LANG:asterisk``), each made under ``--synth-dir`` if missing and reused after."""

from __future__ import annotations

import functools
from pathlib import Path

SYNTH_PER_LANGUAGE = 700  # utterances of a made espeak-ng corpus (``--synth-per-language``'s default)
DOMAIN_TRAIN_FRACTION = 0.7  # share of an in-domain corpus in train (``--domain-train-fraction``'s default)


def synth_corpus(lang: str, args) -> str:
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    path = Path(args.synth_dir) / f"{lang}-espeak"
    if not (path / "dataset_dict.json").is_file():
        per_language = synth_size(lang, args)
        synthesize_corpus(SynthConfig(languages=(lang,), per_language=per_language, seed=args.seed), path)
    return str(path)


@functools.cache
def _training_lines(data: str, lang: str) -> tuple[str, ...]:
    """LANG's transcripts of ``data``'s training split (read once per run, however many helpers ask)."""
    from trainers.corpus.loading import load_corpus

    train = load_corpus(data)["train"]
    return tuple(text for text, code in zip(train["text"], train["language"]) if code == lang)


def domain_text(lang: str, args) -> Path:
    """LANG's transcripts of ``--data``'s training split, one per line (``<synth-dir>/<LANG>-domain.txt``).

    A text file already there from another corpus (or an older copy of this one) is refused, not reused: the
    in-domain support would otherwise be trained on text that is not ``--data``'s."""
    path = Path(args.synth_dir) / f"{lang}-domain.txt"
    lines = _training_lines(str(args.data), lang)
    if not lines:
        raise SystemExit(f"--supports {lang}:synth-domain: {args.data} has no {lang} training clips to take "
                         f"the text from")
    text = "\n".join(lines) + "\n"
    if path.is_file():
        if path.read_text(encoding="utf-8") != text:
            raise SystemExit(f"--supports {lang}:synth-domain: {path} holds other text than the {lang} training "
                             f"transcripts of {args.data} (made from another corpus?); give another --synth-dir, or "
                             f"delete {path} and {Path(args.synth_dir) / f'{lang}-espeak-domain'}* to remake them")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def domain_tag(lang: str, args) -> str:
    """The in-domain corpus's and expert's name suffix: none at the defaults (700 utterances, 70% of them in
    train), else ``-<utterances>`` and ``-train<percent>``, so runs of other sizes never reuse each other's."""
    size, share = domain_size(lang, args), args.domain_train_fraction
    if args.synth_per_language == SYNTH_PER_LANGUAGE and share == DOMAIN_TRAIN_FRACTION:
        return ""
    return f"-{size}" + ("" if share == DOMAIN_TRAIN_FRACTION else f"-train{round(share * 100)}")


def domain_corpus(lang: str, args) -> str:
    """LANG's espeak-ng corpus over its in-domain text (``<synth-dir>/<LANG>-espeak-domain<tag>``), made if
    missing; ``--domain-train-fraction`` of it in train, 10% in validation, the rest in test (unused here)."""
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    path = Path(args.synth_dir) / f"{lang}-espeak-domain{domain_tag(lang, args)}"
    if not (path / "dataset_dict.json").is_file():
        share = args.domain_train_fraction
        config = SynthConfig(languages=(lang,), per_language=domain_size(lang, args), seed=args.seed,
                             text_files={lang: (domain_text(lang, args),)}, train_fraction=share,
                             validation_fraction=0.1, test_fraction=round(0.9 - share, 6))
        synthesize_corpus(config, path)
    return str(path)


def domain_size(lang: str, args) -> int:
    """Utterances of LANG's in-domain espeak-ng corpus: ``--synth-per-language`` or the usable lines, fewer kept."""
    from trainers.corpus.sources import sentences

    usable = usable_sentences(len(sentences(lang, {lang: (domain_text(lang, args),)}, builtin=False)))
    return max(3, min(usable, args.synth_per_language))


def asterisk_corpus(lang: str, args) -> str:
    """LANG's corpus of Asterisk phone prompts (``<synth-dir>/asterisk-<LANG>``), fetched and made if missing."""
    from registry.home import home_dir
    from trainers.corpus import asterisk

    path = Path(args.synth_dir) / f"asterisk-{lang}"
    if not (path / "corpus.json").is_file():
        root = asterisk.fetch_packages(home_dir() / "downloads" / "asterisk", [lang])
        asterisk.build_corpus(root, [lang], path, overwrite=path.exists(), progress=False)
    return str(path)


def usable_sentences(available: int) -> int:
    """Sentences usable out of ``available``: a few are kept in reserve for clips espeak-ng renders unusable."""
    return available - max(2, available // 20)


def synth_size(lang: str, args) -> int:
    """Utterances of LANG's espeak-ng corpus: ``--synth-per-language``, or fewer where fewer sentences are offline
    (Slovak has 312: 297 utterances, the rest in reserve), said before anything is trained."""
    from trainers.corpus.sources import sentences

    available = len(sentences(lang))
    usable = usable_sentences(available)
    if usable < args.synth_per_language:
        print(f"{lang}: only {available} sentences offline, so its synthetic corpus has {usable} utterances "
              f"(not {args.synth_per_language})", flush=True)
    return min(usable, args.synth_per_language)
