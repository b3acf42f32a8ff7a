"""Training data for experts: labelled token sequences, length-aware batches, and the encoder-output cache.

Each utterance becomes (see :func:`make_example`):

- ``input_features``: Whisper's log-mel (n_mels, 3000), computed once with ``datasets.map`` and stored as
  float16 in the dataset cache;
- ``decoder_input_ids``: ``<|sot|><|lang|><|transcribe|><|notimestamps|> text`` and ``labels`` the same
  shifted left, ending in ``<|eot|>``, with the three prompt targets masked (-100): the language and task
  are given at inference, so the expert learns the text only. Padding is -100 in labels.

When an expert leaves the encoder untouched, :class:`EncoderCache` runs the frozen encoder once per utterance
and keeps its outputs in a float16 memory-mapped file (bounded memory: the OS pages it), so later epochs pay
only for the decoder. When it adapts only the top encoder layers (``encoder_start`` k > 0), the cache holds
the input of layer k instead (:func:`encode_until`) and training runs layers k.. only (:func:`encode_from`).

:class:`ExpertDataModule` can train on several corpora mixed by weight (:mod:`trainers.corpus_mix`) and with
augmentation (:mod:`trainers.augment`): speed and noise copies are featurized and cached like the originals,
SpecAugment masks each training batch (features or cached activations) after it reaches the device.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from inference.audio import SAMPLE_RATE, load_audio

IGNORE = -100


def evenly_spaced(rows: list, limit: int | None) -> list:
    """At most ``limit`` of ``rows``, evenly spaced over them (all when ``limit`` is None or not smaller): a
    subset spans a split's speakers and scenes (recorded corpora are stored scene by scene), the same rows every
    time. ``--max-train N`` picks each language's training utterances this way."""
    if limit is None or limit >= len(rows):
        return list(rows)
    return [rows[int(k * len(rows) / limit)] for k in range(limit)]


def prompt_ids(tokenizer, language: str | None) -> list[int]:
    """``<|sot|><|lang|><|transcribe|><|notimestamps|>`` (no language/task tokens for English-only models)."""
    ids = tokenizer.convert_tokens_to_ids
    if language is None:
        return [ids("<|startoftranscript|>"), ids("<|notimestamps|>")]
    return [ids("<|startoftranscript|>"), ids(f"<|{language}|>"), ids("<|transcribe|>"), ids("<|notimestamps|>")]


def make_example(tokenizer, text: str, language: str | None, max_length: int = 448) -> dict:
    """Decoder inputs and labels for one transcript (see the module docstring)."""
    prompt = prompt_ids(tokenizer, language)
    text_ids = tokenizer(" " + text.strip(), add_special_tokens=False).input_ids
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    full = (prompt + text_ids)[: max_length - 1] + [eot]
    labels = full[1:]
    labels[: len(prompt) - 1] = [IGNORE] * (len(prompt) - 1)
    return {"decoder_input_ids": full[:-1], "labels": labels}


def featurize(dataset, processor, language_of=lambda row: row["language"], multilingual: bool = True,
              desc: str = "features", variant=None):
    """``datasets.map`` the corpus split into ``input_features`` (float16) + ``decoder_input_ids`` + ``labels``.

    Args:
        variant: a :class:`trainers.augment.AudioVariant` applied to each waveform first (a speed or noise copy);
            its ``tag`` is appended to every ``id``. None: the audio as it is.
    """
    fe, tok = processor.feature_extractor, processor.tokenizer
    variant = None if variant is None or variant.original else variant

    def fn(batch):
        audios = [load_audio(a) for a in batch["audio"]]
        out = {}
        if variant is not None:
            audios = [variant(a, i) for a, i in zip(audios, batch["id"])]
            out["id"] = [i + variant.tag for i in batch["id"]]
        feats = fe(audios, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features.astype(np.float16)
        examples = [make_example(tok, t, lang if multilingual else None)
                    for t, lang in zip(batch["text"], batch["language"])]
        return {**out, "input_features": list(feats), "decoder_input_ids": [e["decoder_input_ids"] for e in examples],
                "labels": [e["labels"] for e in examples], "seconds": [len(a) / SAMPLE_RATE for a in audios]}

    keep = {"id", "text", "language"}
    return dataset.map(fn, batched=True, batch_size=16, desc=desc,
                       remove_columns=[c for c in dataset.column_names if c not in keep])


def encode_until(encoder: torch.nn.Module, features: torch.Tensor, layer: int) -> torch.Tensor:
    """The hidden states entering encoder layer ``layer`` (``layer`` = number of layers: before the final norm).

    The same steps as ``WhisperEncoder.forward`` (convolutions, positions, layers), stopped early; no dropout
    (Whisper's encoder dropout is 0 and the cached part is frozen).
    """
    x = torch.nn.functional.gelu(encoder.conv1(features))
    x = torch.nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    for block in encoder.layers[:layer]:
        x = block(x, None)
    return x


def encode_from(encoder: torch.nn.Module, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """The encoder output from the hidden states entering layer ``layer`` (the rest of ``encode_until``)."""
    for block in encoder.layers[layer:]:
        hidden = block(hidden, None)
    return encoder.layer_norm(hidden)


def cached_encoder_states(encoder: torch.nn.Module, batch: dict, encoder_start: int, dtype: torch.dtype
                          ) -> torch.Tensor | None:
    """A batch's encoder outputs (batch, frames, d_model) when its encoder side was cached: the cached outputs
    themselves, or the encoder's layers ``encoder_start``.. run on the cached input of that layer. None when the
    batch carries log-mel features instead (the caller runs the whole model on them)."""
    if "encoder_hidden_states" in batch:
        return batch["encoder_hidden_states"].to(dtype)
    if "encoder_layer_input" in batch:
        return encode_from(encoder, batch["encoder_layer_input"].to(dtype), encoder_start)
    return None


def feature_column(featurized):
    """The ``input_features`` of a featurized dataset as numpy arrays: a slice reads one stacked array."""
    return featurized.with_format("numpy", columns=["input_features"])["input_features"]


class EncoderCache:
    """Encoder outputs (or the input of one encoder layer) of a fixed set of utterances, computed once, stored
    as a float16 memmap.

    Args:
        path: the ``.npy`` file (created if missing or if its shape does not fit).
        encoder: the frozen Whisper encoder (or its frozen lower layers).
        features: a sliceable sequence of (n_mels, 3000) arrays, in the order rows are indexed; read a batch
            slice at a time. A featurized dataset's column should come in numpy format
            (:func:`feature_column`): in Python format each row's float16 log-mels become 240,000 Python floats
            (~0.1 s a row, which made this pass take 1 s per batch on an H200).
        batch_size: encoder batch size for the one-time pass.
        layer: None caches the encoder output; k caches the hidden states entering layer k.
        device: where the one-time pass runs (default: CUDA when available, else where the encoder is); the
            encoder is moved there for the pass and back afterwards. A training run loads its base on the CPU
            and Lightning moves it later, so without this the pass would stay on the CPU beside an idle GPU.
    """

    def __init__(self, path: Path, encoder: torch.nn.Module, features: Sequence, batch_size: int = 8,
                 progress: bool = True, layer: int | None = None, device: str | torch.device | None = None):
        self.layer = layer
        self.path = Path(path)
        n = len(features)
        d = encoder.config.d_model
        frames = encoder.config.max_source_positions
        ready = self.path.with_suffix(".done")
        if ready.is_file() and self.path.is_file():
            self.array = np.load(self.path, mmap_mode="r")
            if self.array.shape == (n, frames, d):
                return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready.unlink(missing_ok=True)
        array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float16, shape=(n, frames, d))
        param = next(encoder.parameters())
        home = param.device
        device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else home)
        try:
            encoder.to(device)
            with torch.inference_mode():
                for start in tqdm(range(0, n, batch_size), desc="encoder cache", unit="batch", disable=not progress):
                    rows = [np.asarray(f, dtype=np.float32) for f in features[start:start + batch_size]]
                    x = torch.from_numpy(np.stack(rows)).to(device, param.dtype)
                    out = encoder(x).last_hidden_state if layer is None else encode_until(encoder, x, layer)
                    array[start:start + len(rows)] = out.float().cpu().numpy().astype(np.float16)
        finally:
            encoder.to(home)
        array.flush()
        del array
        ready.write_text("ok")
        self.array = np.load(self.path, mmap_mode="r")

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index], dtype=np.float32))

    def __len__(self) -> int:
        return self.array.shape[0]

    @staticmethod
    def key(base_fingerprint: str, ids: Sequence[str], corpus: str, layer: int | None = None) -> str:
        """A cache name that changes with the base weights, the corpus, the utterance set and the layer."""
        h = hashlib.sha256(f"{base_fingerprint}|{corpus}|".encode() + "\n".join(ids).encode()).hexdigest()[:16]
        return f"enc-{base_fingerprint[:8]}-{h}" + ("" if layer is None else f"-layer{layer}")


class ConcatCache:
    """Several :class:`EncoderCache` files read as one, rows in order (corpora and their augmented copies)."""

    def __init__(self, caches: Sequence[EncoderCache]):
        self.caches, self.layer = list(caches), caches[0].layer
        self.starts = np.cumsum([0] + [len(c) for c in self.caches])

    def __getitem__(self, index: int) -> torch.Tensor:
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.caches[part][index - int(self.starts[part])]

    def __len__(self) -> int:
        return int(self.starts[-1])


class ExpertDataset(Dataset):
    """Rows of a featurized split, with encoder outputs (or layer inputs) from a cache when one is given."""

    def __init__(self, featurized, cache: EncoderCache | None = None):
        self.rows = featurized  # every column (a cached teacher's one-time pass reads the features)
        self.cache = cache
        self.lengths = [len(x) for x in featurized["labels"]]
        # What __getitem__ reads. Decoding a row's 80 x 3000 log-mel features into Python lists costs ~0.1 s,
        # about as much per batch as a decoder-only training step: with a cache they are not read at all,
        # without one they come as one numpy array.
        self._read = featurized
        if "input_features" in featurized.column_names:
            self._read = (featurized.remove_columns("input_features") if cache is not None else
                          featurized.with_format("numpy", columns=["input_features"], output_all_columns=True))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self._read[i]
        item = {"index": i, "decoder_input_ids": row["decoder_input_ids"], "labels": row["labels"],
                "language": row["language"], "text": row["text"]}
        if "seconds" in row:  # SpecAugment keeps its time masks inside the speech
            item["seconds"] = row["seconds"]
        if self.cache is not None:
            key = "encoder_hidden_states" if self.cache.layer is None else "encoder_layer_input"
            item[key] = self.cache[i]
        else:
            item["input_features"] = torch.from_numpy(np.asarray(row["input_features"], dtype=np.float32))
        return item


@dataclass
class Collator:
    """Pads decoder inputs with end-of-text and labels with -100; stacks features or cached encoder states."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(it["decoder_input_ids"]) for it in items)
        dec = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        lab = torch.full((len(items), width), IGNORE, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["decoder_input_ids"])
            dec[i, :n] = torch.tensor(it["decoder_input_ids"])
            lab[i, :n] = torch.tensor(it["labels"])
        batch = {"decoder_input_ids": dec, "labels": lab, "index": torch.tensor([it["index"] for it in items]),
                 "language": [it["language"] for it in items], "text": [it["text"] for it in items]}
        if "seconds" in items[0]:
            batch["seconds"] = torch.tensor([it["seconds"] for it in items], dtype=torch.float32)
        for key in ("encoder_hidden_states", "encoder_layer_input", "input_features"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])
        return batch


class LengthGroupedSampler(Sampler):
    """Batches of similar label length (less padding), in a random order that changes every epoch, optionally
    dealt out to the ranks of a distributed run.

    Every rank builds the same list of batches (same seed, same epoch), so all ranks agree on the shuffle; rank
    ``r`` of ``n`` then takes batches ``r, r + n, r + 2n, ...``. Under DDP every rank must take the same number
    of steps (gradients are all-reduced each step), so when the batch count is not a multiple of ``n`` the list is
    padded by repeating its first batches: a few utterances are seen twice per epoch. Validation removes those
    repeats by utterance index before scoring (see ``LoraExpertModule.on_validation_epoch_end``).

    Args:
        lengths: label length per row.
        batch_size: rows per batch.
        shuffle: shuffle batch order (and rows within equal lengths) per epoch; False keeps length order.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        num_replicas: number of ranks sharing the batches (1: not distributed).
        rank: this process's rank, in ``0 .. num_replicas - 1``.
        mix: which rows each epoch draws when corpora are mixed with weights
            (:class:`trainers.corpus_mix.CorpusMix`); None: every row once.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, mix=None):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1} (num_replicas {num_replicas})")
        self.lengths, self.batch_size, self.shuffle, self.seed, self.epoch = list(lengths), batch_size, shuffle, seed, 0
        self.num_replicas, self.rank, self.mix = num_replicas, rank, mix

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch`` before dealing (the same list on every rank)."""
        rng = random.Random(self.seed + epoch)
        order = list(range(len(self.lengths))) if self.mix is None else self.mix.rows(epoch)
        if self.shuffle:
            rng.shuffle(order)  # ties in length are broken randomly
        order.sort(key=lambda i: self.lengths[i])
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        batches = self.batches(self.epoch)
        self.epoch += 1  # without set_epoch, the next pass is the next epoch (the same on every rank)
        if self.num_replicas > 1 and batches:
            total = len(self) * self.num_replicas
            batches = (batches * math.ceil(total / len(batches)))[:total]  # pad: same step count on every rank
            batches = batches[self.rank::self.num_replicas]
        yield from batches

    def __len__(self) -> int:
        """Batches this rank takes per epoch."""
        rows = len(self.lengths) if self.mix is None else len(self.mix)
        return math.ceil(math.ceil(rows / self.batch_size) / self.num_replicas)


class ExpertDataModule(L.LightningDataModule):
    """Train / validation data of one or more languages from one or more corpus directories.

    Training rows come from every corpus (``data`` first, then ``extra_data``), each with its augmented copies
    (speed, noise), mixed per epoch by the corpora's weights (:mod:`trainers.corpus_mix`); validation rows come
    from ``data`` alone, never augmented. SpecAugment masks training batches only (:meth:`on_after_batch_transfer`).

    Args:
        data: the target corpus directory (``trainers.corpus``).
        processor: the base's ``WhisperProcessor``.
        languages: Whisper codes to keep.
        batch_size: rows per batch.
        max_train: at most this many training utterances per language of ``data`` (None: all), spread evenly over
            the split; the ``extra_data`` corpora are used whole (a few real clips plus a whole synthetic corpus).
        encoder: the frozen encoder when the expert leaves it (or its lower layers) untouched: enables the cache.
        encoder_layer: None caches encoder outputs; k caches the input of encoder layer k (layers k.. train).
        cache_dir: where encoder caches live (default: each corpus's ``<corpus>/.cache``).
        base_fingerprint: names the cache.
        extra_data: further training corpora, ``DIR`` or ``DIR:WEIGHT`` (:class:`~trainers.corpus_mix.CorpusSpec`).
        data_weight: the mixing weight of ``data``.
        augment: a :class:`trainers.augment.AugmentConfig` (None: no augmentation).
    """

    def __init__(self, data: str, processor, languages: Sequence[str], batch_size: int = 16,
                 max_train: int | None = None, max_validation: int | None = None, encoder=None,
                 encoder_layer: int | None = None, cache_dir: str | None = None, base_fingerprint: str = "base",
                 multilingual: bool = True,
                 seed: int = 0, progress: bool = True, extra_data: Sequence = (), data_weight: float = 1.0,
                 augment=None):
        super().__init__()
        self.data, self.processor, self.languages = data, processor, list(languages)
        self.batch_size, self.max_train, self.max_validation = batch_size, max_train, max_validation
        self.encoder, self.encoder_layer, self.cache_dir = encoder, encoder_layer, cache_dir
        self.base_fingerprint, self.multilingual = base_fingerprint, multilingual
        self.seed, self.progress = seed, progress
        self.extra_data, self.data_weight, self.augment = tuple(extra_data), data_weight, augment
        self.datasets: dict[str, ExpertDataset] = {}
        self.summary: dict = {}
        self.corpora_summary: list[dict] = []  # per training corpus: weight, utterances, copies, rows per epoch
        self.mix = None  # a CorpusMix when weights differ from 1

    def _select(self, split, limit, corpus: str | None = None, strict: bool = True):
        from trainers.corpus.loading import load_corpus

        corpus = corpus or self.data
        loaded = load_corpus(corpus)
        if split not in loaded:
            raise ValueError(f"{corpus} has no {split!r} split")
        ds = loaded[split]
        have = set(ds["language"])
        missing = [lang for lang in self.languages if lang not in have]
        if missing and (strict or len(missing) == len(self.languages)):
            # The target must hold every language; a further corpus at least one of them.
            raise ValueError(f"{corpus} [{split}] has no utterances in {', '.join(missing)}; "
                             f"it has {', '.join(sorted(have))}")
        by_language: dict[str, list[int]] = {}
        for i, lang in enumerate(ds["language"]):
            if lang in self.languages:
                by_language.setdefault(lang, []).append(i)
        keep = []
        for rows in by_language.values():
            keep += evenly_spaced(rows, limit)
        return ds.select(sorted(keep))

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            self._prepare()
            return
        # Distributed: each node's first process featurizes and fills the encoder cache; the others wait, then
        # find both ready on disk instead of writing the same files at once.
        if trainer.local_rank != 0:
            trainer.strategy.barrier("expert-data")
        self._prepare()
        if trainer.local_rank == 0:
            trainer.strategy.barrier("expert-data")

    def _featurized(self, corpus: str, selected, split: str, variant=None):
        """(featurized rows, encoder cache or None) of one corpus split, or of one augmented copy of it."""
        tag = "" if variant is None else variant.tag
        rows = featurize(selected, self.processor, multilingual=self.multilingual, desc=f"{split} features{tag}",
                         variant=variant)
        cache = None
        if self.encoder is not None:
            root = Path(self.cache_dir) if self.cache_dir else Path(corpus) / ".cache"
            name = EncoderCache.key(self.base_fingerprint, rows["id"], str(Path(corpus).resolve()), self.encoder_layer)
            cache = EncoderCache(root / f"{name}.npy", self.encoder, feature_column(rows), progress=self.progress,
                                 layer=self.encoder_layer)
        return rows, cache

    @staticmethod
    def _dataset(parts) -> ExpertDataset:
        if len(parts) == 1:
            return ExpertDataset(*parts[0])
        from datasets import concatenate_datasets

        caches = [cache for _, cache in parts]
        return ExpertDataset(concatenate_datasets([rows for rows, _ in parts]),
                             None if caches[0] is None else ConcatCache(caches))

    def _prepare(self) -> None:
        from trainers.corpus_mix import CorpusMix, parse_corpora

        # The target's own loading explains a missing directory; a further corpus's spec is checked here.
        corpora = parse_corpora(self.data, self.extra_data, self.data_weight)
        corpora[1:] = [c.check() for c in corpora[1:]]
        variants = self.augment.variants(self.seed) if self.augment is not None else [None]
        parts, spans, utterances, seconds = [], [], 0, 0.0
        self.corpora_summary = []
        for n, corpus in enumerate(corpora):
            selected = self._select("train", self.max_train if n == 0 else None, corpus.path, strict=n == 0)
            start = sum(len(rows) for rows, _ in parts)
            for variant in variants:
                parts.append(self._featurized(corpus.path, selected, "train", variant))
            end = sum(len(rows) for rows, _ in parts)
            hours = sum(parts[-len(variants)][0]["seconds"]) / 3600  # the originals'
            spans.append((start, end, corpus.weight))
            utterances, seconds = utterances + len(selected), seconds + hours * 3600
            self.corpora_summary.append({"corpus": corpus.path, "weight": corpus.weight, "utterances": len(selected),
                                         "hours": round(hours, 4), "copies": len(variants), "rows": end - start,
                                         "per_epoch": CorpusMix.draws(end - start, corpus.weight)})
        self.datasets["train"] = self._dataset(parts)
        self.mix = CorpusMix(spans, self.seed) if any(w != 1.0 for _, _, w in spans) else None
        self.summary["train"] = {"utterances": utterances, "hours": round(seconds / 3600, 4)}
        rows, cache = self._featurized(self.data, self._select("validation", self.max_validation), "validation")
        self.datasets["validation"] = ExpertDataset(rows, cache)
        self.summary["validation"] = {"utterances": len(rows), "hours": round(sum(rows["seconds"]) / 3600, 4)}

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """SpecAugment on training batches (on the device, per row seeded by the seed, the epoch and the row);
        validation and test batches pass unchanged."""
        trainer = self.trainer
        if self.augment is not None and self.augment.spec_augment and trainer is not None and trainer.training:
            from trainers.augment import spec_augment_batch

            batch = spec_augment_batch(batch, self.augment, seed=self.seed, epoch=trainer.current_epoch,
                                       n_mels=self.processor.feature_extractor.feature_size)
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.datasets[split]
        pad = self.processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        # Under DDP each rank takes its own share of the batches (the Trainer's use_distributed_sampler must be
        # off: this batch sampler does the sharding).
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = LengthGroupedSampler(ds.lengths, self.batch_size, shuffle=shuffle, seed=self.seed,
                                       num_replicas=replicas, rank=rank, mix=self.mix if split == "train" else None)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(pad), num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)
