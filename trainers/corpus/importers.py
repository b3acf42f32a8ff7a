"""Importing recorded speech into the corpus format: audio folders and Hugging Face datasets.

``corpus_from_dir`` reads an ``audiofolder`` layout (``metadata.csv`` / ``metadata.jsonl``) or pairs of
``x.wav`` + ``x.txt``; ``corpus_from_hf`` loads any Hugging Face audio dataset with its audio column cast to
``Audio(decode=False)`` so torchcodec is never used. Both produce :data:`trainers.corpus.loading.CORPUS_FEATURES`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from inference.audio import AudioError, load_audio
from trainers.corpus.loading import SPLITS, CorpusFormatError, make_row, rows_to_dataset
from trainers.corpus.languages import language_code

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3")
# Common names of the transcript column in Hugging Face speech datasets, most specific first
# (Common Voice: sentence; FLEURS: transcription / raw_transcription; LibriSpeech: text).
TEXT_COLUMNS = ("sentence", "transcription", "text", "transcript", "raw_transcription", "normalized_text")
LANGUAGE_COLUMNS = ("language", "locale", "lang", "language_code")
SPEAKER_COLUMNS = ("speaker", "speaker_id", "client_id")
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test",),
}


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


def _folder_entries(directory: Path, text_column: str | None) -> list[tuple[Path, str, str | None, str | None, str]]:
    """(audio file, transcript, language or None, split or None, speaker or "") for one folder."""
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
        speaker_key = next((c for c in SPEAKER_COLUMNS if c in found), None)
        for row in metadata:
            entries.append((directory / row["file_name"], str(row[text_key] or "").strip(),
                            row.get(lang_key) if lang_key else None, row.get("split"),
                            str(row.get(speaker_key) or "") if speaker_key else ""))
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
        entries.append((p, p.with_suffix(".txt").read_text(encoding="utf-8").strip(), None, None, ""))
    return entries


def corpus_from_dir(
    path: str | os.PathLike,
    language: str | None = None,
    text_column: str | None = None,
    default_split: str = "test",
    skip_bad: bool = False,
    skipped: list[tuple[str, str]] | None = None,
    progress: bool = False,
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
        skip_bad: leave out files that cannot be decoded or hold no audio (and rows with an empty
            transcript) instead of stopping at the first one.
        skipped: when given, ``(file, reason)`` of every file left out is appended to it.
        progress: show a progress bar over the files.

    Returns:
        A corpus ``DatasetDict`` (splits without files are empty); ``voice`` the metadata's speaker column
        (``speaker``, ``speaker_id`` or ``client_id``) or empty, ``speed``/``pitch`` -1, ``source`` the directory.
    """
    from tqdm.auto import tqdm

    from inference.audio import AudioError

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
        for audio_path, text, row_language, row_split, speaker in tqdm(entries, desc="importing", unit="file",
                                                                       disable=not progress):
            lang = language_code(row_language, synthesizable=False) if row_language else fixed_language
            if lang is None:
                raise CorpusFormatError(
                    f"{audio_path}: its language is unknown; pass --language (language=...) or add a "
                    f"'language' column to the metadata"
                )
            split = folder_split or _split_name(row_split) or default_split
            try:
                if not text:
                    raise CorpusFormatError(f"{audio_path}: empty transcript")
                audio = load_audio(audio_path)
                if audio.size == 0:
                    raise AudioError(f"{audio_path} holds no audio samples")
            except (AudioError, CorpusFormatError) as err:
                if not skip_bad:
                    raise type(err)(f"{err} (pass --skip-bad to leave such files out and go on)") from err
                if skipped is not None:
                    rel = audio_path.relative_to(directory) if audio_path.is_relative_to(directory) else audio_path
                    skipped.append((str(rel), str(err).replace(f"{audio_path}: ", "")))
                continue
            rel = audio_path.relative_to(directory).with_suffix("").as_posix()
            rows[split].append(make_row(id=rel.replace("/", "-"), audio=audio, text=text, language=lang,
                                        voice=speaker, source=source))
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
    skip_bad: bool = False,
    skipped: list[tuple[str, str]] | None = None,
    **load_kwargs: Any,
) -> datasets.DatasetDict:
    """Import a Hugging Face audio dataset (hub id or local path) into the corpus format.

    The audio column is cast to ``Audio(decode=False)`` before any row is read, so torchcodec is never
    used; each file is decoded by :func:`inference.audio.load_audio`, made 16 kHz mono and stored as FLAC.

    Args:
        name_or_path: as for ``datasets.load_dataset`` (``mozilla-foundation/common_voice_17_0``,
            ``google/fleurs``, ``audiofolder``, a local directory).
        config: dataset configuration (Common Voice / FLEURS: the language, e.g. ``de`` / ``de_de``).
        split_map: corpus split -> dataset split (default: train, validation|dev|valid|val, test as found).
        text_column: transcript column (default: the first of :data:`TEXT_COLUMNS` present).
        language: language of every row; otherwise taken per row from a ``language``/``locale`` column.
        audio_column: default: the first column with an ``Audio`` feature.
        max_per_split: keep at most this many rows per split (the first ones).
        skip_bad: leave out rows whose audio cannot be decoded or is empty instead of stopping.
        skipped: when given, ``(row, reason)`` of every row left out is appended to it.
        **load_kwargs: passed to ``datasets.load_dataset`` (``data_dir``, ``revision``, ...).

    Raises:
        CorpusFormatError: a missing column (named, with the columns found) or no matching split.
    """
    local = Path(load_kwargs.get("data_dir") or name_or_path).expanduser()
    if name_or_path == "audiofolder" or (local.is_dir() and _looks_like_audio_folder(local)):
        # datasets' folder builders encode every example with torchcodec while preparing the dataset;
        # the same layout is read here without it.
        if split_map is None and audio_column is None:
            return _limit(corpus_from_dir(local, language=language, text_column=text_column, skip_bad=skip_bad,
                                          skipped=skipped), max_per_split)
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
                if not skip_bad:
                    raise AudioError(f"{where}, split {source_split!r}, row {i}: {err} (pass --skip-bad to leave "
                                     f"such rows out and go on)") from err
                if skipped is not None:
                    skipped.append((f"{source_split}[{i}]", str(err)))
                continue
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
