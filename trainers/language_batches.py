"""Training data for distillation: batches of one language each, and a teacher source prepared with the data.

A CLSR student trains one language's path and gate per step (DistilWhisper's language batches), so
:class:`LanguageBatchSampler` makes every training batch hold a single language: each language's rows are
grouped by label length as :class:`~trainers.data.LengthGroupedSampler` groups them, then all languages' batches
are shuffled together (per epoch) and dealt to the ranks of a distributed run the same way. Validation batches
may mix languages (CLSR routes each sample by its own language at inference).

:class:`DistillDataModule` is the expert data module with those training batches, a per-language data summary,
and the teacher source (online or cached) prepared on the training rows once they are featurized: a cached
teacher fills its cache there, on the first process of each node, before the other processes read it.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from torch.utils.data import DataLoader

from trainers.data import Collator, ExpertDataModule, LengthGroupedSampler


class LanguageBatchSampler(LengthGroupedSampler):
    """Batches of one language each, of similar label length, shuffled per epoch, optionally dealt to ranks.

    Args:
        languages: the language of each row.
        lengths: label length per row.
        batch_size: rows per batch (a language's last batch may be smaller).
        shuffle, seed, num_replicas, rank: as for :class:`~trainers.data.LengthGroupedSampler`.
    """

    def __init__(self, languages: Sequence[str], lengths: Sequence[int], batch_size: int, shuffle: bool = True,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if len(languages) != len(lengths):
            raise ValueError(f"{len(languages)} languages for {len(lengths)} rows; give one language per row")
        super().__init__(lengths, batch_size, shuffle, seed, num_replicas, rank)
        self.rows: dict[str, list[int]] = {}
        for i, lang in enumerate(languages):
            self.rows.setdefault(lang, []).append(i)

    def batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch`` before dealing (the same list on every rank)."""
        out = []
        for n, rows in enumerate(self.rows.values()):
            # Each language's own length grouping (its own seed stream), mapped back to row indices.
            grouped = LengthGroupedSampler([self.lengths[i] for i in rows], self.batch_size, self.shuffle,
                                           seed=self.seed + 7919 * (n + 1))
            out.extend([rows[i] for i in batch] for batch in grouped.batches(epoch))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(out)
        return out

    def __len__(self) -> int:
        """Batches this rank takes per epoch."""
        total = sum(math.ceil(len(rows) / self.batch_size) for rows in self.rows.values())
        return math.ceil(total / self.num_replicas)


class DistillDataModule(ExpertDataModule):
    """Train / validation data for a distilled student (see the module docstring).

    Args:
        teacher: a :class:`distill.sources.TeacherSource` to prepare on the training rows (None: no KD).
        language_batches: one language per training batch (CLSR needs it; a LoRA student may mix languages).
        other arguments: as for :class:`~trainers.data.ExpertDataModule`.
    """

    def __init__(self, data: str, processor, languages: Sequence[str], batch_size: int = 16, *, teacher=None,
                 language_batches: bool = True, **kwargs):
        super().__init__(data, processor, languages, batch_size, **kwargs)
        self.teacher, self.language_batches = teacher, language_batches
        self.teacher_report: dict = {}

    def _prepare(self) -> None:
        super()._prepare()
        train = self.datasets["train"].rows
        per_language: dict[str, dict] = {}
        for lang, seconds in zip(train["language"], train["seconds"]):
            row = per_language.setdefault(lang, {"utterances": 0, "hours": 0.0})
            row["utterances"] += 1
            row["hours"] += seconds / 3600
        self.summary["languages"] = {lang: {"utterances": r["utterances"], "hours": round(r["hours"], 4)}
                                     for lang, r in per_language.items()}
        if self.teacher is not None:
            self.teacher_report = self.teacher.prepare(train)

    def train_dataloader(self) -> DataLoader:
        if not self.language_batches:
            return super().train_dataloader()
        ds = self.datasets["train"]
        pad = self.processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = LanguageBatchSampler(ds.rows["language"], ds.lengths, self.batch_size, shuffle=True,
                                       seed=self.seed, num_replicas=replicas, rank=rank)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(pad), num_workers=0)
