"""A disk cache of a teacher's top-k log-probabilities per target position, keyed by utterance and teacher.

Layout of a cache directory (one per ``k`` and storage dtype, so caches of several sizes live side by side)::

    <root>/top<k>-<dtype>/index.json                   key -> [shard, offset, length]; shard sizes
    <root>/top<k>-<dtype>/<shard>.logprobs.npy         (positions, k) log-probabilities at temperature 1
    <root>/top<k>-<dtype>/<shard>.indices.npy          (positions, k) int32 token ids

A key (:func:`utterance_key`) hashes the teacher's fingerprint, the utterance's log-mel features and its decoder
input ids: a changed teacher, audio or transcript is a new key, so stale entries are never read, and later runs
(other subsets, other students) reuse every entry they share. Each fill writes a new shard through memory-mapped
files (bounded memory whatever the corpus size) and then merges its entries into the index under a file lock;
two runs filling the same cache at once at worst compute some entries twice. Shards are read back as memory
maps, so reading a batch touches only its rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from registry.atomic import atomic_write_text

INDEX = "index.json"
FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}

Entry = tuple[str, int, int]  # (shard, first position, positions)


def utterance_key(teacher_fingerprint: str, features, decoder_input_ids: Sequence[int]) -> str:
    """The cache key of one utterance under one teacher.

    Args:
        teacher_fingerprint: ``Teacher.fingerprint(language)`` of the teacher that scores it.
        features: its log-mel features (n_mels, frames), hashed as float16 (how the data module stores them).
        decoder_input_ids: the teacher-forced decoder input (prompt and transcript tokens).
    """
    h = hashlib.sha256(teacher_fingerprint.encode())
    h.update(np.ascontiguousarray(np.asarray(features, dtype=np.float16)).tobytes())
    h.update(np.asarray(decoder_input_ids, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


class TeacherCache:
    """Top-k teacher log-probabilities on disk (see the module docstring).

    Args:
        root: the cache root (``--teacher-cache``); created on the first write.
        k: log-probabilities kept per position.
        dtype: ``float16`` (default, half the disk) or ``float32`` (exact, for checks).
    """

    def __init__(self, root: str | os.PathLike, k: int, dtype: str = "float16"):
        if k < 1:
            raise ValueError(f"teacher cache top-k must be >= 1, got {k}")
        if dtype not in DTYPES:
            raise ValueError(f"teacher cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.root, self.k, self.dtype = Path(root).expanduser(), int(k), dtype
        self.dir = self.root / f"top{self.k}-{dtype}"
        self._entries: dict[str, list] | None = None
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __repr__(self) -> str:
        return f"TeacherCache({str(self.dir)!r})"

    # ------------------------------------------------------------------------------------------ index
    def _read_index(self) -> dict:
        path = self.dir / INDEX
        if not path.is_file():
            return {"format_version": FORMAT_VERSION, "k": self.k, "dtype": self.dtype, "shards": {}, "entries": {}}
        try:
            index = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"teacher cache index {path} is corrupt ({e}); delete {self.dir} to rebuild it") from e
        if index.get("k") != self.k or index.get("dtype") != self.dtype:
            raise ValueError(f"teacher cache {self.dir} holds top-{index.get('k')} {index.get('dtype')} entries, "
                             f"not top-{self.k} {self.dtype}; it was written by another version; delete it")
        return index

    @property
    def entries(self) -> dict[str, list]:
        if self._entries is None:
            self._entries = self._read_index()["entries"]
        return self._entries

    def lookup(self, keys: Sequence[str]) -> list[Entry | None]:
        """The entry of each key, None where the cache does not hold it."""
        found = self.entries
        return [tuple(found[k]) if k in found else None for k in keys]

    def __len__(self) -> int:
        return len(self.entries)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def writer(self, positions: int) -> Iterator[ShardWriter]:
        """A new shard with room for ``positions`` target positions; its entries join the index on exit.

        Example::

            with cache.writer(sum(lengths)) as shard:
                for key, logprobs, indices in scored:
                    shard.add(key, logprobs, indices)
        """
        shard = ShardWriter(self, positions)
        try:
            yield shard
        except BaseException:
            shard.discard()
            raise
        shard.commit()

    def _commit(self, name: str, positions: int, entries: dict[str, list]) -> None:
        with self._locked():
            index = self._read_index()
            index["shards"][name] = {"positions": positions}
            index["entries"].update(entries)
            atomic_write_text(self.dir / INDEX, json.dumps(index))
        self._entries = index["entries"]

    # ------------------------------------------------------------------------------------------ reading
    def _shard(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._arrays:
            paths = [self.dir / f"{name}.{part}.npy" for part in ("logprobs", "indices")]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"teacher cache shard {missing[0]} is missing; delete {self.dir} to rebuild")
            self._arrays[name] = tuple(np.load(p, mmap_mode="r") for p in paths)
        return self._arrays[name]

    def read(self, entry: Entry) -> tuple[np.ndarray, np.ndarray]:
        """One utterance's ``(logprobs, indices)``, each (positions, k)."""
        name, offset, length = entry
        logprobs, indices = self._shard(name)
        return logprobs[offset:offset + length], indices[offset:offset + length]

    def read_batch(self, entries: Sequence[Entry], width: int) -> tuple[np.ndarray, np.ndarray]:
        """Entries padded to ``width`` positions: float32 (batch, width, k) log-probabilities (0 at padding)
        and int64 (batch, width, k) token ids (0 at padding)."""
        logprobs = np.zeros((len(entries), width, self.k), dtype=np.float32)
        indices = np.zeros((len(entries), width, self.k), dtype=np.int64)
        for row, entry in enumerate(entries):
            lp, ix = self.read(entry)
            if lp.shape[0] > width:
                raise ValueError(f"teacher cache entry of {lp.shape[0]} positions does not fit a batch {width} wide; "
                                 "the cache was built from other decoder inputs")
            logprobs[row, :lp.shape[0]] = lp
            indices[row, :ix.shape[0]] = ix
        return logprobs, indices


class ShardWriter:
    """One shard being filled (see :meth:`TeacherCache.writer`)."""

    def __init__(self, cache: TeacherCache, positions: int):
        self.cache, self.positions = cache, int(positions)
        self.name = f"shard-{uuid.uuid4().hex[:12]}"
        self.entries: dict[str, list] = {}
        self.cursor = 0
        self._paths = {part: cache.dir / f".{self.name}.{part}.npy.tmp" for part in ("logprobs", "indices")}
        self._arrays = None
        if self.positions > 0:
            cache.dir.mkdir(parents=True, exist_ok=True)
            shape = (self.positions, cache.k)
            self._arrays = (np.lib.format.open_memmap(self._paths["logprobs"], "w+", DTYPES[cache.dtype], shape),
                            np.lib.format.open_memmap(self._paths["indices"], "w+", np.int32, shape))

    def add(self, key: str, logprobs: np.ndarray, indices: np.ndarray) -> None:
        """Store one utterance: ``logprobs`` and ``indices`` of shape (its positions, k)."""
        n = logprobs.shape[0]
        if logprobs.shape != (n, self.cache.k) or indices.shape != logprobs.shape:
            raise ValueError(f"expected (positions, {self.cache.k}) arrays, got {logprobs.shape} and {indices.shape}")
        if self.cursor + n > self.positions:
            raise ValueError(f"shard is full: {self.positions} positions reserved, {self.cursor + n} written")
        self._arrays[0][self.cursor:self.cursor + n] = logprobs
        self._arrays[1][self.cursor:self.cursor + n] = indices
        self.entries[key] = [self.name, self.cursor, n]
        self.cursor += n

    def _close(self) -> None:
        if self._arrays is not None:
            for array in self._arrays:
                array.flush()
            self._arrays = None

    def commit(self) -> None:
        if not self.entries:
            self.discard()
            return
        self._close()
        for part, tmp in self._paths.items():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.cache.dir / f"{self.name}.{part}.npy")
        self.cache._commit(self.name, self.cursor, self.entries)

    def discard(self) -> None:
        self._close()
        for tmp in self._paths.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
