"""Synthetic speech corpora: real sentences spoken by espeak-ng with varied voices, speeds and pitches.

For each language, ``per_language`` distinct sentences (:mod:`trainers.corpus.sources`) are shuffled with the
seed and dealt to the train / validation / test splits, so no sentence is in two splits. Train and validation
are spoken with one set of espeak-ng voice variants, test with a disjoint set, so a test score measures
unseen speakers. Speed and pitch vary per utterance. Everything is a function of the seed: the same config
gives the same texts, voices, speeds, pitches and (espeak-ng being deterministic) the same audio bytes.

The corpus is written atomically (a temporary sibling directory renamed into place) in the format of
:mod:`trainers.corpus.loading`, with a ``corpus.json`` card recording how it was made.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from inference.audio import SAMPLE_RATE, encode_flac, is_silent, resample, trim_silence
from trainers.corpus.loading import SPLITS, atomic_output_dir, load_corpus, make_row, rows_to_dataset, write_corpus_dir
from trainers.corpus.languages import CorpusError, espeak_voices, language_code
from trainers.corpus.sources import sentences

logger = logging.getLogger(__name__)


class NotEnoughSentencesError(CorpusError):
    """A language has fewer usable sentences than the corpus needs (sentences are never reused or padded)."""


class EspeakError(CorpusError):
    """espeak-ng is missing, lacks a voice, or failed."""


# espeak-ng voice variants (``espeak-ng --voices=variant``) that sound like different speakers.
# Train/validation and test use disjoint sets. Avoid pairs that are the same voice under two names
# (``klatt`` and ``klatt6`` render identically).
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "klatt", "klatt2", "croak")
TEST_VARIANTS = ("m5", "m6", "m7", "f4", "f5", "klatt3", "klatt4", "steph")


@dataclass(frozen=True)
class SynthConfig:
    """How to synthesize a corpus. Override fields with ``dataclasses.replace``."""

    languages: tuple[str, ...]  # Whisper language codes to synthesize, e.g. ("de", "uk", "ru")
    per_language: int = 100  # utterances per language, over all three splits together
    train_fraction: float = 0.7  # share of each language's utterances in train
    validation_fraction: float = 0.1  # share in validation (at least one utterance)
    test_fraction: float = 0.2  # share in test (at least one utterance)
    seed: int = 0  # fixes the sentences, their split, voice, speed and pitch
    train_variants: tuple[str, ...] = TRAIN_VARIANTS  # espeak-ng variants of train and validation speakers
    test_variants: tuple[str, ...] = TEST_VARIANTS  # variants of test speakers, disjoint from train_variants
    speed_range: tuple[int, int] = (130, 190)  # words per minute, inclusive; espeak-ng's default is 175
    pitch_range: tuple[int, int] = (30, 70)  # espeak-ng pitch 0-99, inclusive; default 50
    text_files: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)  # language -> own sentences, used first
    max_seconds: float = 15.0  # longer utterances are replaced by the next sentence (Whisper hears 30 s windows)
    workers: int = 2  # espeak-ng processes run at once

    def __post_init__(self) -> None:
        object.__setattr__(self, "languages", tuple(language_code(lang) for lang in self.languages))
        object.__setattr__(self, "text_files", {
            language_code(lang): tuple(Path(p) for p in paths) for lang, paths in self.text_files.items()
        })
        if not self.languages:
            raise CorpusError("no languages given; pass e.g. --languages de,uk,ru")
        if len(set(self.languages)) != len(self.languages):
            raise CorpusError(f"a language is listed twice: {', '.join(self.languages)}")
        fractions = (self.train_fraction, self.validation_fraction, self.test_fraction)
        if min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise CorpusError(f"split fractions must be positive and sum to 1, got train/validation/test = "
                              f"{fractions}")
        if self.per_language < 3:
            raise CorpusError(f"per_language must be at least 3 (one utterance per split), got {self.per_language}")
        if not self.train_variants or not self.test_variants:
            raise CorpusError("train_variants and test_variants must both name at least one espeak-ng variant")
        shared = set(self.train_variants) & set(self.test_variants)
        if shared:
            raise CorpusError(f"test voices must differ from train voices; both use {', '.join(sorted(shared))}")
        for name, (lo, hi), limits in (("speed", self.speed_range, (80, 450)), ("pitch", self.pitch_range, (0, 99))):
            if not (limits[0] <= lo <= hi <= limits[1]):
                raise CorpusError(f"{name} range {lo}-{hi} must be increasing and within {limits[0]}-{limits[1]}")

    def split_sizes(self) -> dict[str, int]:
        """Utterances per split for one language: fractions rounded, at least one each, summing to the total."""
        n = self.per_language
        validation = max(1, round(n * self.validation_fraction))
        test = max(1, round(n * self.test_fraction))
        return {"train": n - validation - test, "validation": validation, "test": test}


@dataclass
class _Utterance:
    """One slot of the corpus: where it goes and how it is spoken; the sentence may be replaced."""

    language: str
    index: int  # position within the language, 0 .. per_language - 1 (names the id)
    split: str
    voice: str
    speed: int
    pitch: int
    text: str = ""
    source: str = ""
    flac: bytes | None = None  # the audio, encoded as soon as it is accepted (4x smaller than float32)
    seconds: float = 0.0


def _language_rng(seed: int, language: str) -> np.random.Generator:
    """A generator per (seed, language): adding a language to the config does not change the others."""
    return np.random.default_rng([seed, zlib.crc32(language.encode("utf-8"))])


def plan_language(config: SynthConfig, language: str) -> tuple[list[_Utterance], list[tuple[str, str]]]:
    """Deal sentences, splits, voices, speeds and pitches for one language.

    Returns:
        (utterances in split order, reserve sentences used when an utterance turns out unusable).

    Raises:
        NotEnoughSentencesError: fewer distinct sentences than ``per_language``.
    """
    pool = sentences(language, config.text_files)
    needed = config.per_language
    if len(pool) < needed:
        raise NotEnoughSentencesError(
            f"language {language!r}: found {len(pool)} usable sentences, need {needed} (per_language). Pass "
            f"--text-file {language}=PATH with more sentences (one per line), or lower --per-language to at "
            f"most {len(pool)}"
        )
    rng = _language_rng(config.seed, language)
    # The user's sentences are taken before built-in ones (they override them); the chosen ones are then
    # shuffled again so that both kinds spread over all splits.
    user = [i for i, (_, source) in enumerate(pool) if source.startswith("user:")]
    builtin = [i for i, (_, source) in enumerate(pool) if not source.startswith("user:")]
    ranked = [*rng.permutation(user), *rng.permutation(builtin)] if user else list(rng.permutation(len(pool)))
    order = [*rng.permutation(ranked[:needed]), *ranked[needed:]]
    sizes = config.split_sizes()
    bases = espeak_voices(language)
    voice_sets = {
        "train": [str(v) for v in rng.permutation(list(config.train_variants))],
        "test": [str(v) for v in rng.permutation(list(config.test_variants))],
    }
    speeds = rng.integers(config.speed_range[0], config.speed_range[1] + 1, size=needed)
    pitches = rng.integers(config.pitch_range[0], config.pitch_range[1] + 1, size=needed)
    utterances: list[_Utterance] = []
    counters = {"train": 0, "test": 0}
    for split in SPLITS:
        group = "test" if split == "test" else "train"  # validation speakers are train speakers
        for _ in range(sizes[split]):
            i = len(utterances)
            k = counters[group]
            counters[group] += 1
            variants = voice_sets[group]
            # Cycle variants fastest and accents slower, so every variant meets every accent.
            voice = f"{bases[(k // len(variants)) % len(bases)]}+{variants[k % len(variants)]}"
            text, source = pool[order[i]]
            utterances.append(_Utterance(language, i, split, voice, int(speeds[i]), int(pitches[i]), text, source))
    reserve = [pool[j] for j in order[needed:]]
    return utterances, reserve


def find_espeak() -> str:
    """Path of the espeak-ng executable, or :class:`EspeakError` saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakError("espeak-ng is not installed; install it with `apt-get install espeak-ng` "
                          "(macOS: `brew install espeak-ng`)")
    return path


def _check_voices(espeak: str, config: SynthConfig) -> None:
    """Fail before any synthesis if espeak-ng lacks a language voice or a variant (it would silently fall
    back to its default variant and break the train/test voice split)."""
    def listing(arg: str) -> list[list[str]]:
        out = subprocess.run([espeak, arg], capture_output=True, text=True, check=False).stdout
        return [line.split() for line in out.splitlines()[1:] if line.strip()]

    voices = {cols[1] for cols in listing("--voices") if len(cols) > 1}
    variants = {cols[4].split("/", 1)[-1] for cols in listing("--voices=variant") if len(cols) > 4}
    for language in config.languages:
        missing = [v for v in espeak_voices(language) if v not in voices]
        if missing:
            raise EspeakError(f"espeak-ng has no voice {', '.join(missing)} for language {language!r}; "
                              f"reinstall espeak-ng-data (`apt-get install --reinstall espeak-ng-data`)")
    missing = [v for v in (*config.train_variants, *config.test_variants) if v not in variants]
    if missing:
        raise EspeakError(f"espeak-ng has no voice variant {', '.join(missing)}; see `espeak-ng --voices=variant`")


def speak(espeak: str, text: str, voice: str, speed: int, pitch: int, workdir: Path) -> np.ndarray:
    """Synthesize ``text`` with espeak-ng; return float32 16 kHz mono audio, silence at the ends trimmed.

    The text goes through stdin as UTF-8 (``-b 1``), never the command line, so a sentence starting with
    ``-`` cannot be taken for an option.
    """
    fd, name = tempfile.mkstemp(suffix=".wav", dir=workdir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-b", "1", "-w", name],
            input=(text + "\n").encode("utf-8"), capture_output=True, timeout=120, check=False,
        )
        if proc.returncode != 0:
            raise EspeakError(f"espeak-ng failed (exit {proc.returncode}) for voice {voice!r} on {text!r}: "
                              f"{proc.stderr.decode('utf-8', 'replace').strip()}")
        audio, sr = sf.read(name, dtype="float32")
    finally:
        os.unlink(name)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    return trim_silence(resample(audio, sr, SAMPLE_RATE), SAMPLE_RATE)


def synthesize_corpus(
    config: SynthConfig, out_dir: str | os.PathLike, progress: bool = True, overwrite: bool = False,
) -> datasets.DatasetDict:
    """Synthesize a corpus for ``config`` and save it to ``out_dir``; return it as loaded from there.

    Checks come before any synthesis, in this order: espeak-ng and its voices, the output directory
    (writable; absent, empty, or an old corpus with ``overwrite``), and enough sentences in every language.

    Raises:
        EspeakError, OutputDirError, UnknownLanguageError, NotEnoughSentencesError: see their docstrings.
    """
    espeak = find_espeak()
    _check_voices(espeak, config)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        plans = {lang: plan_language(config, lang) for lang in config.languages}
        workdir = tmp / ".espeak"
        workdir.mkdir()
        utterances = [u for lang in config.languages for u in plans[lang][0]]
        replaced = _synthesize_all(espeak, utterances, {lang: list(plans[lang][1]) for lang in plans},
                                   config, workdir, progress)
        shutil.rmtree(workdir)
        rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
        for u in utterances:
            rows[u.split].append(make_row(
                id=f"{u.language}-{u.index:05d}", audio=u.flac, text=u.text, language=u.language,
                voice=u.voice, speed=u.speed, pitch=u.pitch, source=u.source,
            ))
        corpus = datasets.DatasetDict({split: rows_to_dataset(rows[split]) for split in SPLITS})
        # Our own progress bar was enough; datasets' "Saving the dataset" bars would only add noise.
        write_corpus_dir(corpus, tmp, _card(config, espeak, utterances, replaced), progress=False)
    return load_corpus(out_dir)


def _synthesize_all(
    espeak: str, utterances: Sequence[_Utterance], reserve: dict[str, list[tuple[str, str]]],
    config: SynthConfig, workdir: Path, progress: bool,
) -> dict[str, int]:
    """Fill every utterance's audio; an unusable one (silent, or over ``max_seconds``) takes the next reserve
    sentence of its language. Rounds are processed in utterance order, so the result does not depend on
    thread timing. Returns how many sentences were replaced per language."""
    replaced = {lang: 0 for lang in reserve}
    todo = list(utterances)
    with tqdm(total=len(utterances), desc="espeak-ng", unit="utt", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        while todo:
            results = list(pool.map(
                lambda u: speak(espeak, u.text, u.voice, u.speed, u.pitch, workdir), todo))
            retry = []
            for u, audio in zip(todo, results):
                if is_silent(audio, -50.0) or len(audio) > config.max_seconds * SAMPLE_RATE:
                    if not reserve[u.language]:
                        raise NotEnoughSentencesError(
                            f"language {u.language!r}: ran out of sentences after {replaced[u.language]} came "
                            f"out silent or longer than {config.max_seconds} s; pass --text-file "
                            f"{u.language}=PATH with more (shorter) sentences, or lower --per-language"
                        )
                    u.text, u.source = reserve[u.language].pop(0)
                    replaced[u.language] += 1
                    retry.append(u)
                else:
                    u.flac, u.seconds = encode_flac(audio, SAMPLE_RATE), len(audio) / SAMPLE_RATE
                    bar.update(1)
            todo = retry
    return replaced


def _espeak_version(espeak: str) -> str:
    out = subprocess.run([espeak, "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip()


def _card(config: SynthConfig, espeak: str, utterances: Sequence[_Utterance], replaced: Mapping[str, int]) -> dict:
    """What travels with the corpus: the settings that made it, the tools, and a summary."""
    settings = dataclasses.asdict(config)
    settings["text_files"] = {lang: [str(p) for p in paths] for lang, paths in config.text_files.items()}
    summary: dict[str, dict[str, Any]] = {}
    for u in utterances:
        entry = summary.setdefault(u.language, {"utterances": {s: 0 for s in SPLITS}, "seconds": 0.0,
                                                "sources": {}, "replaced_sentences": replaced.get(u.language, 0)})
        entry["utterances"][u.split] += 1
        entry["seconds"] = round(entry["seconds"] + u.seconds, 2)
        entry["sources"][u.source] = entry["sources"].get(u.source, 0) + 1
    return {
        "kind": "synthetic",
        "synthesizer": _espeak_version(espeak),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": settings,
        "languages": summary,
    }
