"""The corpus format: build, save atomically, load and check (importers live in :mod:`trainers.corpus.importers`).

A corpus is a ``datasets.DatasetDict`` with splits ``train``, ``validation`` and ``test`` saved with
``save_to_disk``. Its columns (:data:`CORPUS_FEATURES`):

========  ==========================================================================================
id        unique string, e.g. ``de-00042``
audio     ``Audio(sampling_rate=16000, decode=False)``: ``{"bytes": FLAC at 16 kHz mono, "path": ...}``
text      the transcript
language  Whisper language code (``de``, ``uk``, ``pt``)
voice     espeak-ng voice+variant (``de+m3``); empty for recorded speech
speed     espeak-ng words per minute; -1 for recorded speech
pitch     espeak-ng pitch 0-99; -1 for recorded speech
source    where the sentence came from (``fortunes-de``, ``chatterbot-corpus``, ``user:/path``, a dataset)
========  ==========================================================================================

The audio bytes are embedded, so the directory is self-contained. ``save_to_disk`` keeps only the base name
of ``path`` (``de/de-00042.flac`` is stored as ``de-00042.flac``); the bytes are what matters.
Audio is never decoded by ``datasets`` (its decoder, torchcodec, needs CUDA libraries): read it with
:func:`inference.audio.load_audio`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from registry.atomic import move_into_place, new_staging_dir

from inference.audio import SAMPLE_RATE, encode_flac
from trainers.corpus.languages import CorpusError


SPLITS = ("train", "validation", "test")
CORPUS_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "audio": datasets.Audio(sampling_rate=SAMPLE_RATE, decode=False),
        "text": datasets.Value("string"),
        "language": datasets.Value("string"),
        "voice": datasets.Value("string"),
        "speed": datasets.Value("int32"),
        "pitch": datasets.Value("int32"),
        "source": datasets.Value("string"),
    }
)
REQUIRED_COLUMNS = tuple(CORPUS_FEATURES)

# File holding how a corpus was made (synthesis settings, import source), next to dataset_dict.json.
CORPUS_CARD = "corpus.json"



class CorpusFormatError(CorpusError):
    """A directory or dataset that is not a usable corpus (missing, wrong layout, missing column)."""


class OutputDirError(CorpusError):
    """An output directory that cannot be written, or that holds something we must not overwrite."""


# ----------------------------------------------------------------------------------------------------------
# Building and saving


def rows_to_dataset(rows: Sequence[Mapping[str, Any]]) -> datasets.Dataset:
    """Build one split from row dicts with the :data:`CORPUS_FEATURES` columns.

    The Arrow table is built directly: ``Dataset.from_dict(..., features=...)`` would run
    ``Audio.encode_example``, which imports torchcodec even for ready-made bytes.
    """
    columns = {name: [row[name] for row in rows] for name in CORPUS_FEATURES}
    table = pa.Table.from_pydict(columns, schema=CORPUS_FEATURES.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=CORPUS_FEATURES))


def make_row(
    *, id: str, audio: np.ndarray | bytes, text: str, language: str, voice: str = "", speed: int = -1,
    pitch: int = -1, source: str,
) -> dict[str, Any]:
    """A corpus row; ``audio`` is 16 kHz float audio (encoded to FLAC here) or ready FLAC/WAV bytes."""
    data = audio if isinstance(audio, bytes) else encode_flac(audio, SAMPLE_RATE)
    return {
        "id": id, "audio": {"bytes": data, "path": f"{language}/{id}.flac"}, "text": text,
        "language": language, "voice": voice, "speed": int(speed), "pitch": int(pitch), "source": source,
    }


def _is_corpus_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file()


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out_dir`` to write into; move it into place on success.

    Everything that can make the final move fail is checked on entry, before the caller does any work:
    ``out_dir`` must be absent, an empty directory, or (with ``overwrite``) a previous corpus, and its parent
    must be a writable directory. On any error, including Ctrl-C, the temporary directory and any parent
    directories created here are removed, and an existing corpus at ``out_dir`` is left untouched.

    Raises:
        OutputDirError: the output cannot be written, or exists and must not be replaced.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise OutputDirError(f"output {out} exists and is not a directory; choose another --out")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputDirError(
                    f"output directory {out} exists and is not empty; pass --overwrite (overwrite=True) to "
                    f"replace it, or choose another --out"
                )
            if not _is_corpus_dir(out):
                raise OutputDirError(
                    f"refusing to overwrite {out}: it is not a corpus (no dataset_dict.json), so deleting it "
                    f"could destroy unrelated files; remove it yourself or choose another --out"
                )
    # Create missing parents, remembering them so a failure leaves nothing behind.
    created: list[Path] = []
    parent = out.parent
    for ancestor in [parent, *parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputDirError(f"cannot create output directory {out}: {ancestor} is a file, not a directory")
            break
        created.append(ancestor)
    try:
        for directory in reversed(created):
            directory.mkdir()
        tmp = new_staging_dir(out)
    except OSError as err:
        _remove_created(created)
        raise OutputDirError(f"cannot write the output directory {out}: {err}") from err
    try:
        yield tmp
        move_into_place(tmp, out)  # an old corpus moves aside first and comes back if the swap fails
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _remove_created(created: Sequence[Path]) -> None:
    for directory in created:  # innermost first
        with contextlib.suppress(OSError):
            directory.rmdir()


def save_corpus(
    corpus: datasets.DatasetDict, out_dir: str | os.PathLike, overwrite: bool = False,
    card: Mapping[str, Any] | None = None, progress: bool = True,
) -> Path:
    """Save a corpus atomically (see :func:`atomic_output_dir`), with an optional ``corpus.json`` card."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_corpus_dir(corpus, tmp, card, progress)
    return Path(out_dir)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Turn ``datasets``' progress bars on or off inside the block, restoring the previous setting."""
    before = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if before else datasets.disable_progress_bars)()


def write_corpus_dir(corpus: datasets.DatasetDict, directory: Path, card: Mapping[str, Any] | None = None,
                     progress: bool = True) -> None:
    """Check and write a corpus into an existing (empty) directory, non-atomically: use it inside
    :func:`atomic_output_dir`, or call :func:`save_corpus`."""
    check_corpus(corpus, str(directory))
    # An empty split (a folder of test recordings has no train) must still be written as one empty shard:
    # left to itself, datasets writes no shard and cannot load the split back.
    num_shards = {split: 1 for split, ds in corpus.items() if len(ds) == 0}
    with progress_bars(progress):
        corpus.save_to_disk(str(directory), num_shards=num_shards)
    if card is not None:
        (directory / CORPUS_CARD).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Loading and checking


def check_corpus(corpus: datasets.DatasetDict, name: str) -> None:
    """Raise :class:`CorpusFormatError` naming the split or column that breaks the corpus format."""
    if not isinstance(corpus, datasets.DatasetDict):
        raise CorpusFormatError(
            f"{name} holds a single Dataset, not a DatasetDict with splits {', '.join(SPLITS)}; "
            f"wrap it: DatasetDict(train=..., validation=..., test=...)"
        )
    for split in SPLITS:
        if split not in corpus:
            raise CorpusFormatError(
                f"{name} has no {split!r} split (found: {', '.join(corpus) or 'none'}); a corpus needs "
                f"{', '.join(SPLITS)}"
            )
        found = list(corpus[split].column_names)
        for column in REQUIRED_COLUMNS:
            if column not in found:
                raise CorpusFormatError(
                    f"{name}: split {split!r} has no {column!r} column (columns found: {', '.join(found)}); "
                    f"a corpus needs {', '.join(REQUIRED_COLUMNS)}"
                )


def load_corpus(path: str | os.PathLike) -> datasets.DatasetDict:
    """Load a corpus saved by :func:`save_corpus` / ``corpus synth``, checked, audio left undecoded.

    Raises:
        CorpusFormatError: the directory is missing, is not a saved ``DatasetDict``, lacks a split or a
            required column (named in the message).
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        raise CorpusFormatError(
            f"corpus directory {directory} does not exist; make one with `whisper-experts corpus synth "
            f"--languages de,uk --per-language 100 --out {directory}` or `corpus from-dir` / `corpus from-hf`"
        )
    if not directory.is_dir() or not _is_corpus_dir(directory):
        hint = " (it holds a single split: state.json)" if (directory / "state.json").is_file() else ""
        raise CorpusFormatError(
            f"{directory} is not a corpus: no dataset_dict.json{hint}. A corpus is a DatasetDict saved with "
            f"save_to_disk, as written by `whisper-experts corpus synth|from-dir|from-hf`"
        )
    corpus = datasets.load_from_disk(str(directory))
    check_corpus(corpus, str(directory))
    for split, ds in corpus.items():
        audio = ds.features["audio"]
        if not isinstance(audio, datasets.Audio) or audio.decode:
            # Never let datasets decode (torchcodec); the storage is the same {bytes, path} struct.
            corpus[split] = ds.cast_column("audio", datasets.Audio(sampling_rate=SAMPLE_RATE, decode=False))
    return corpus


def corpus_card(path: str | os.PathLike) -> dict[str, Any]:
    """The ``corpus.json`` card of a saved corpus ({} if it has none)."""
    card = Path(path) / CORPUS_CARD
    return json.loads(card.read_text(encoding="utf-8")) if card.is_file() else {}


# ----------------------------------------------------------------------------------------------------------
# Importing a directory of audio files with transcripts
