"""The corpus format: build, save atomically, load and check; and import from audio folders or HF datasets.

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
:func:`trainers.audio.load_audio`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from registry.atomic import move_into_place, new_staging_dir

from trainers.audio import SAMPLE_RATE, AudioError, encode_flac, load_audio
from trainers.corpus.sources import CorpusError, language_code

logger = logging.getLogger(__name__)

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
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3")
# Common names of the transcript column in Hugging Face speech datasets, most specific first
# (Common Voice: sentence; FLEURS: transcription / raw_transcription; LibriSpeech: text).
TEXT_COLUMNS = ("sentence", "transcription", "text", "transcript", "raw_transcription", "normalized_text")
LANGUAGE_COLUMNS = ("language", "locale", "lang", "language_code")
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test",),
}


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


def _read_metadata(directory: Path) -> list[dict[str, str]] | None:
    """Rows of ``metadata.csv`` / ``metadata.jsonl`` (the ``audiofolder`` layout), or None if neither exists."""
    jsonl, csv_path = directory / "metadata.jsonl", directory / "metadata.csv"
    if jsonl.is_file():
        rows = []
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise CorpusFormatError(f"{jsonl}, line {n}: not JSON ({err})") from err
        return rows
    if csv_path.is_file():
        with csv_path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    return None


def _pick_column(found: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str,
                 where: str) -> str:
    if wanted is not None:
        if wanted not in found:
            raise CorpusFormatError(
                f"{where}: no {what} column {wanted!r} (columns found: {', '.join(found)})")
        return wanted
    for name in candidates:
        if name in found:
            return name
    raise CorpusFormatError(
        f"{where}: no {what} column; expected one of {', '.join(candidates)} (columns found: "
        f"{', '.join(found)}); name it with --text-column"
    )


def _folder_entries(directory: Path, text_column: str | None) -> list[tuple[Path, str, str | None, str | None]]:
    """(audio file, transcript, language or None, split or None) for one folder."""
    metadata = _read_metadata(directory)
    entries = []
    if metadata is not None:
        where = str(directory / ("metadata.jsonl" if (directory / "metadata.jsonl").is_file() else "metadata.csv"))
        found = list(metadata[0]) if metadata else []
        if not metadata:
            raise CorpusFormatError(f"{where} has no rows")
        if "file_name" not in found:
            raise CorpusFormatError(f"{where}: no 'file_name' column (columns found: {', '.join(found)})")
        text_key = _pick_column(found, text_column, TEXT_COLUMNS, "transcript", where)
        lang_key = next((c for c in LANGUAGE_COLUMNS if c in found), None)
        for row in metadata:
            entries.append((directory / row["file_name"], str(row[text_key] or "").strip(),
                            row.get(lang_key) if lang_key else None, row.get("split")))
        return entries
    audio_files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    missing = [p for p in audio_files if not p.with_suffix(".txt").is_file()]
    if missing:
        raise CorpusFormatError(
            f"{directory}: {len(missing)} audio file(s) have no transcript next to them, e.g. {missing[0]} "
            f"(expected {missing[0].with_suffix('.txt').name}); add .txt files or a metadata.csv with "
            f"file_name,transcription columns"
        )
    for p in audio_files:
        entries.append((p, p.with_suffix(".txt").read_text(encoding="utf-8").strip(), None, None))
    return entries


def corpus_from_dir(
    path: str | os.PathLike,
    language: str | None = None,
    text_column: str | None = None,
    default_split: str = "test",
) -> datasets.DatasetDict:
    """Import recorded speech from a directory into the corpus format.

    Layouts understood:

    - ``audiofolder``: ``metadata.csv`` or ``metadata.jsonl`` with ``file_name`` and a transcript column
      (``transcription``, ``text``, ``sentence``...), optionally ``language`` and ``split``; possibly one such
      folder per split (``train/``, ``validation/`` or ``dev/``, ``test/``);
    - pairs: ``x.wav`` (or flac/ogg/mp3) next to ``x.txt`` holding its transcript, in any sub-folder.

    Audio is read with soundfile (never ``datasets``' decoder), made mono 16 kHz and stored as FLAC.

    Args:
        path: the directory.
        language: language of every file, unless a ``language`` column says otherwise per row.
        text_column: transcript column of the metadata file (default: auto-detected).
        default_split: split for files whose split no folder or column names (a folder of recordings is
            usually an evaluation set).

    Returns:
        A corpus ``DatasetDict`` (splits without files are empty); ``voice`` empty, ``speed``/``pitch`` -1,
        ``source`` the directory.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CorpusFormatError(f"{directory} is not a directory of audio files")
    fixed_language = language_code(language, synthesizable=False) if language else None
    split_dirs = {
        split: directory / alias for split, aliases in SPLIT_ALIASES.items() for alias in aliases
        if (directory / alias).is_dir()
    }
    if split_dirs and _read_metadata(directory) is None:
        folders = [(folder, split) for split, folder in split_dirs.items()]
    else:
        folders = [(directory, None)]
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    source = str(directory.resolve())
    for folder, folder_split in folders:
        entries = _folder_entries(folder, text_column)
        if not entries:
            raise CorpusFormatError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) found")
        for audio_path, text, row_language, row_split in entries:
            lang = language_code(row_language, synthesizable=False) if row_language else fixed_language
            if lang is None:
                raise CorpusFormatError(
                    f"{audio_path}: its language is unknown; pass --language (language=...) or add a "
                    f"'language' column to the metadata"
                )
            split = folder_split or _split_name(row_split) or default_split
            if not text:
                raise CorpusFormatError(f"{audio_path}: empty transcript")
            rel = audio_path.relative_to(directory).with_suffix("").as_posix()
            audio = load_audio(audio_path)
            rows[split].append(make_row(id=rel.replace("/", "-"), audio=audio, text=text, language=lang,
                                        source=source))
    return datasets.DatasetDict({split: rows_to_dataset(rows[split]) for split in SPLITS})


def _split_name(name: str | None) -> str | None:
    if not name:
        return None
    for split, aliases in SPLIT_ALIASES.items():
        if name.lower() in aliases:
            return split
    raise CorpusFormatError(f"unknown split {name!r}; use one of {', '.join(SPLITS)} (or dev/valid)")


# ----------------------------------------------------------------------------------------------------------
# Importing a Hugging Face dataset


def corpus_from_hf(
    name_or_path: str,
    config: str | None = None,
    split_map: Mapping[str, str] | None = None,
    text_column: str | None = None,
    language: str | None = None,
    audio_column: str | None = None,
    max_per_split: int | None = None,
    **load_kwargs: Any,
) -> datasets.DatasetDict:
    """Import a Hugging Face audio dataset (hub id or local path) into the corpus format.

    The audio column is cast to ``Audio(decode=False)`` before any row is read, so torchcodec is never
    used; each file is decoded by :func:`trainers.audio.load_audio`, made 16 kHz mono and stored as FLAC.

    Args:
        name_or_path: as for ``datasets.load_dataset`` (``mozilla-foundation/common_voice_17_0``,
            ``google/fleurs``, ``audiofolder``, a local directory).
        config: dataset configuration (Common Voice / FLEURS: the language, e.g. ``de`` / ``de_de``).
        split_map: corpus split -> dataset split (default: train, validation|dev|valid|val, test as found).
        text_column: transcript column (default: the first of :data:`TEXT_COLUMNS` present).
        language: language of every row; otherwise taken per row from a ``language``/``locale`` column.
        audio_column: default: the first column with an ``Audio`` feature.
        max_per_split: keep at most this many rows per split (the first ones).
        **load_kwargs: passed to ``datasets.load_dataset`` (``data_dir``, ``revision``, ...).

    Raises:
        CorpusFormatError: a missing column (named, with the columns found) or no matching split.
    """
    local = Path(load_kwargs.get("data_dir") or name_or_path).expanduser()
    if name_or_path == "audiofolder" or (local.is_dir() and _looks_like_audio_folder(local)):
        # datasets' folder builders encode every example with torchcodec while preparing the dataset;
        # the same layout is read here without it.
        if split_map is None and audio_column is None:
            return _limit(corpus_from_dir(local, language=language, text_column=text_column), max_per_split)
    try:
        loaded = datasets.load_dataset(name_or_path, config, **load_kwargs)
    except Exception as err:
        if "torchcodec" in f"{err} {err.__cause__}":
            raise CorpusFormatError(
                f"{name_or_path}: datasets can only prepare this dataset with torchcodec installed (it encodes "
                f"audio while building generator-based datasets). Use its Parquet version (most hub speech "
                f"datasets have one), `corpus from-dir` for a local folder, or `pip install torchcodec`"
            ) from err
        raise
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    where = name_or_path + (f" ({config})" if config else "")
    if split_map is None:
        split_map = {}
        for split, aliases in SPLIT_ALIASES.items():
            found = next((a for a in aliases if a in loaded), None)
            if found is not None:
                split_map[split] = found
    unknown = [s for s in split_map.values() if s not in loaded]
    if unknown or not split_map:
        raise CorpusFormatError(
            f"{where}: split(s) {', '.join(unknown) or 'train/validation/test'} not found "
            f"(splits found: {', '.join(loaded)}); pass split_map / --split corpus=dataset"
        )
    fixed_language = language_code(language, synthesizable=False) if language else None
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for split, source_split in split_map.items():
        ds = loaded[source_split]
        found = list(ds.column_names)
        audio_key = audio_column or next(
            (n for n, f in ds.features.items() if isinstance(f, datasets.Audio)), None)
        if audio_key is None or audio_key not in found:
            raise CorpusFormatError(
                f"{where}: no audio column {audio_key or ''} (columns found: {', '.join(found)}); "
                f"name it with --audio-column"
            )
        text_key = _pick_column(found, text_column, TEXT_COLUMNS, "transcript", where)
        lang_key = next((c for c in LANGUAGE_COLUMNS if c in found), None)
        if fixed_language is None and lang_key is None:
            raise CorpusFormatError(
                f"{where}: no language column ({', '.join(LANGUAGE_COLUMNS)}) among {', '.join(found)}; "
                f"pass --language"
            )
        ds = ds.cast_column(audio_key, datasets.Audio(decode=False))  # before touching any row
        if max_per_split is not None:
            ds = ds.select(range(min(max_per_split, len(ds))))
        id_key = next((c for c in ("id", "path", "file_name") if c in found and c != audio_key), None)
        seen: set[str] = set()
        for i, row in enumerate(ds):
            lang = fixed_language or language_code(str(row[lang_key]), synthesizable=False)
            try:
                audio = load_audio(row[audio_key])
            except AudioError as err:
                raise AudioError(f"{where}, split {source_split!r}, row {i}: {err}") from err
            row_id = Path(str(row[id_key])).stem if id_key else f"{source_split}-{i:06d}"
            if row_id in seen:
                row_id = f"{row_id}-{i}"
            seen.add(row_id)
            rows[split].append(make_row(id=row_id, audio=audio, text=str(row[text_key]).strip(), language=lang,
                                        source=where))
    missing = [s for s in SPLITS if s not in split_map]
    if missing:  # e.g. a dataset with train and test only: the corpus keeps the format, validation is empty
        logger.warning("%s has no %s split(s); they are left empty", where, ", ".join(missing))
    return datasets.DatasetDict({split: rows_to_dataset(rows[split]) for split in SPLITS})


def _looks_like_audio_folder(directory: Path) -> bool:
    """A local directory in the layout :func:`corpus_from_dir` reads (and no saved or Parquet dataset)."""
    if any(directory.glob("*.parquet")) or (directory / "dataset_dict.json").exists():
        return False
    if _read_metadata(directory) is not None:
        return True
    return any(p.suffix.lower() in AUDIO_SUFFIXES for p in directory.iterdir()) or any(
        (directory / alias).is_dir() for aliases in SPLIT_ALIASES.values() for alias in aliases
    )


def _limit(corpus: datasets.DatasetDict, max_per_split: int | None) -> datasets.DatasetDict:
    if max_per_split is None:
        return corpus
    return datasets.DatasetDict(
        {split: ds.select(range(min(max_per_split, len(ds)))) for split, ds in corpus.items()})
