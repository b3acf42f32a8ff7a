"""Teacher sources: where the KD loss gets the teacher's view of a training batch.

A source is a small strategy object (:class:`TeacherSource`):

* :class:`OnlineTeacher` runs the teachers on every batch (teacher-forced on the labels, eval mode, no grad):
  exact, and costs a teacher forward per step.
* :class:`CachedTeacher` scores every training utterance once (in float32, or under bf16 autocast: training runs
  score in the precision they train in), keeps the top-k log-probabilities per position on disk
  (:class:`~distill.teacher_cache.TeacherCache`), and reads a batch's rows back as a
  :class:`~distill.losses.TopKTeacher`: later epochs and later runs cost a disk read. :meth:`CachedTeacher.prepare`
  reports how much probability mass the top-k keeps (``mass_kept``), i.e. how much the truncation changes.

Batches are dicts as the project's data modules build them: ``input_features`` (batch, n_mels, frames),
``decoder_input_ids`` and ``labels`` (batch, positions; labels -100 at padding), ``language`` (a code per
sample) and ``index`` (each sample's row in the training rows the source was prepared with).
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.losses import IGNORE_INDEX, TopKTeacher
from distill.teacher_cache import TeacherCache, utterance_key
from distill.teachers import TeacherSet

COLUMNS = ["input_features", "decoder_input_ids", "labels", "language"]


class TeacherSource(Protocol):
    """What a distillation trainer needs from a teacher."""

    kind: str  # "online" or "cached"

    def prepare(self, rows) -> dict:
        """One-time work on the training rows (a ``datasets.Dataset`` with :data:`COLUMNS`) before training;
        returns a report for the run's manifest."""

    def teacher_for(self, batch: dict) -> torch.Tensor | TopKTeacher:
        """The teacher's logits (batch, positions, vocab) or top-k log-probabilities for a training batch."""

    def identity(self) -> dict:
        """Lineage: which teachers, and how they are read."""

    def to(self, device) -> TeacherSource:
        """Move what the source computes with to ``device``."""


class OnlineTeacher:
    """The teachers run on every training batch.

    Args:
        teachers: the loaded :class:`~distill.teachers.TeacherSet`.
    """

    kind = "online"

    def __init__(self, teachers: TeacherSet):
        self.teachers = teachers

    def prepare(self, rows) -> dict:
        return {"source": self.kind}

    def teacher_for(self, batch: dict) -> torch.Tensor:
        if "input_features" not in batch:
            raise ValueError("an online teacher needs the batch's input_features (log-mel); the data module cached "
                             "encoder outputs instead: turn the encoder cache off, or use a cached teacher")
        return self.teachers.logits(batch["input_features"], batch["decoder_input_ids"], batch["language"])

    def identity(self) -> dict:
        return {"source": self.kind, **self.teachers.identity()}

    def to(self, device) -> OnlineTeacher:
        self.teachers.to(device)
        return self


def _pad(sequences, value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.tensor(np.asarray(s, dtype=np.int64))
    return out


def scoring_fingerprint(teacher_fingerprint: str, precision: str) -> str:
    """What a cached teacher's utterance keys are made from (:func:`~distill.teacher_cache.utterance_key`): the
    teacher's identity, plus the precision it scored in when that is not float32 (float32 keys are those of caches
    filled before the precision was an option)."""
    return teacher_fingerprint if precision == "32" else f"{teacher_fingerprint}|{precision}"


class CachedTeacher:
    """Top-k teacher log-probabilities computed once per utterance and read from disk (see the module docstring).

    Args:
        teachers: the loaded teachers; they run only for utterances the cache does not hold yet.
        cache: where the log-probabilities live (its ``k`` and dtype).
        batch_size: teacher batch size of the one-time pass.
        device: where the teachers run for that pass (default: CUDA when available).
        progress: show a progress bar for the pass.
        precision: ``"bf16"`` scores under bf16 autocast, ``"32"`` (the default) in float32. Training runs pass
            the precision they train in (``trainers.train_distill.load_teacher_source``). The
            log-softmax and top-k are float32 either way. The precision is part of each utterance's cache key, so
            a cache filled in one precision is never read as the other's.
    """

    kind = "cached"

    def __init__(self, teachers: TeacherSet, cache: TeacherCache, batch_size: int = 16, device=None,
                 progress: bool = True, commit_every: int = 256, precision: str = "32"):
        self.teachers, self.cache, self.batch_size, self.progress = teachers, cache, batch_size, progress
        if precision not in ("bf16", "32"):
            raise ValueError(f"teacher precision {precision!r}: use bf16 or 32")
        self.precision = precision
        self.commit_every = commit_every  # utterances per shard: an interrupted fill keeps what it committed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.entries: list = []  # row index of the prepared rows -> cache entry
        self.report: dict = {}

    def prepare(self, rows) -> dict:
        """Find (or compute and store) every row's top-k teacher log-probabilities; measure the mass kept.

        Args:
            rows: the training rows (a ``datasets.Dataset`` with :data:`COLUMNS`), in the order batches index them.

        Returns:
            ``{"source", "k", "dtype", "cache", "utterances", "computed", "reused", "seconds", "mass_kept":
            {"mean", "min", "p05"}}``; ``mass_kept`` is the teacher's probability inside its top-k, over the
            target positions (1.0 would be no truncation).
        """
        t0 = time.time()
        view = rows.with_format("numpy", columns=COLUMNS)
        keys, lengths, languages = [], [], []
        for start in range(0, len(rows), 64):  # chunks: the features of a whole corpus need not fit in memory
            chunk = view[start:start + 64]
            for feats, ids, lang in zip(chunk["input_features"], chunk["decoder_input_ids"], chunk["language"]):
                lang = str(lang)
                keys.append(utterance_key(self._fingerprint(lang), feats, ids))
                lengths.append(len(ids))
                languages.append(lang)
        missing = [i for i, e in enumerate(self.cache.lookup(keys)) if e is None]
        if missing:
            self._fill(view, missing, keys, lengths, languages)
        self.entries = self.cache.lookup(keys)
        self.report = {"source": self.kind, "k": self.cache.k, "dtype": self.cache.dtype, "precision": self.precision,
                       "cache": str(self.cache.dir),
                       "utterances": len(keys), "computed": len(missing), "reused": len(keys) - len(missing),
                       "seconds": round(time.time() - t0, 2), "mass_kept": self._mass_kept(view)}
        return self.report

    def _fingerprint(self, language: str) -> str:
        return scoring_fingerprint(self.teachers.fingerprint(language), self.precision)

    @torch.no_grad()
    def _fill(self, view, missing, keys, lengths, languages) -> None:
        """Run the teachers on the ``missing`` rows, by language and length, and store their top-k: one shard per
        ``commit_every`` utterances, each joining the index as soon as it is full, so a fill that is interrupted
        (hours for a large corpus on CPU) resumes from its last shard instead of from nothing."""
        order = sorted(missing, key=lambda i: (languages[i], lengths[i]))
        pad = int(self.teachers.teachers[0].model.config.pad_token_id or 0)
        self.teachers.to(self.device)
        bar = tqdm(total=len(order), desc="teacher cache", unit="utt", disable=not self.progress)
        step = max(1, self.commit_every)
        for start in range(0, len(order), step):
            part = order[start:start + step]
            with self.cache.writer(sum(lengths[i] for i in part)) as shard:
                batch: list[int] = []
                for n, i in enumerate(part):
                    batch.append(i)
                    last = n + 1 == len(part)
                    if len(batch) < self.batch_size and not last and languages[part[n + 1]] == languages[i]:
                        continue
                    rows = view[batch]
                    feats = torch.as_tensor(np.asarray(rows["input_features"], dtype=np.float32))
                    # Padding after a sequence does not change its positions' logits (the decoder is causal).
                    ids = _pad(rows["decoder_input_ids"], pad)
                    with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                                        enabled=self.precision == "bf16"):
                        logits = self.teachers.logits(feats, ids, [languages[j] for j in batch])
                    top = F.log_softmax(logits.float(), dim=-1).topk(self.cache.k, dim=-1)
                    values, indices = top.values.cpu().numpy(), top.indices.to(torch.int32).cpu().numpy()
                    for row, j in enumerate(batch):
                        shard.add(keys[j], values[row, :lengths[j]], indices[row, :lengths[j]])
                    bar.update(len(batch))
                    batch = []
        bar.close()
        self.teachers.to("cpu")  # training reads the cache; give the accelerator's memory back to the student

    def _mass_kept(self, view) -> dict:
        masses = []
        labels = view["labels"]
        for entry, lab in zip(self.entries, labels):
            logprobs, _ = self.cache.read(entry)
            mass = np.exp(np.asarray(logprobs, dtype=np.float64)).sum(-1)
            masses.append(mass[np.asarray(lab) != IGNORE_INDEX])
        mass = np.concatenate(masses) if masses else np.ones(1)
        return {"mean": round(float(mass.mean()), 6), "min": round(float(mass.min()), 6),
                "p05": round(float(np.quantile(mass, 0.05)), 6)}

    def teacher_for(self, batch: dict) -> TopKTeacher:
        if not self.entries:
            raise RuntimeError("the cached teacher was not prepared; call prepare(train_rows) before training")
        labels = batch["labels"]
        entries = [self.entries[i] for i in batch["index"].tolist()]
        logprobs, indices = self.cache.read_batch(entries, labels.shape[1])
        return TopKTeacher(torch.from_numpy(logprobs).to(labels.device), torch.from_numpy(indices).to(labels.device))

    def identity(self) -> dict:
        return {**{k: v for k, v in self.report.items() if k in ("source", "k", "dtype", "precision", "mass_kept")},
                "source": self.kind, **self.teachers.identity()}

    def to(self, device) -> CachedTeacher:
        return self  # batches are read from disk onto the labels' device; the teachers stay where they ran
