"""LoRA expert training driven by Lightning's own CLI: YAML configs, ``--print_config``, ``--model.rank 8``.

The same recipe as :func:`trainers.train_lora.train_lora_expert`, but every piece is built from plain config
values, so :class:`~lightning.pytorch.cli.LightningCLI` can read it from a YAML file:

- :class:`LoraExpertTask` (``model:``) loads the base by name and attaches a fresh (or warm-started) expert;
- :class:`CorpusDataModule` (``data:``) reads a corpus directory and takes the processor, languages and frozen
  encoder from the model when the Trainer sets it up;
- :class:`StoreBestExpert` (``expert:``) keeps the expert with the best validation WER and, when fitting ends,
  evaluates it on the test split and stores it in the registry with the recipe's manifest (rank 0 only);
- ``checkpoint:`` and ``early_stopping:`` watch ``val_wer`` as the recipe's do.

Run it as ``whisper-experts lightning fit --config examples/lightning_lora_uk.yaml``.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lora_experts.config import ATTENTION, FFN, LoraExpertConfig
from lora_experts.model import DEFAULT_ADAPTER, attach_expert, remove_experts
from trainers.augment import AugmentConfig
from trainers.data import ExpertDataModule
from trainers.lora_module import LoraExpertModule
from trainers.train_lora import KeepBestExpert, evaluate_on_test_split, expert_manifest, load_checked_base


class LoraExpertTask(LoraExpertModule):
    """A LoRA language expert on a frozen base Whisper, built from config values.

    Args:
        languages: Whisper codes the expert serves (batches may mix them).
        base: base model: an imported or bundled name, a local directory, or a hub id.
        rank: LoRA rank.
        alpha: LoRA alpha (the update is scaled by alpha / rank).
        dropout: LoRA dropout.
        target_modules: linear layers to adapt: q_proj, k_proj, v_proj, out_proj, fc1, fc2.
        side: decoder, encoder or both (a decoder-only expert trains on cached encoder outputs).
        cross_attention: adapt the decoder's cross-attention q/out too.
        cross_attention_kv: also cross-attention k/v (about 2x slower steps).
        encoder_start: with side encoder/both, adapt encoder layers from this index up only.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        schedule: decay after warm-up.
        label_smoothing: cross-entropy label smoothing.
        init_from: warm start from this LoRA expert (registry spec or file).
        val_max_new_tokens: bound for validation decoding.
    """

    def __init__(self, languages: list[str], base: str = "whisper-base", rank: int = 16, alpha: float = 32.0,
                 dropout: float = 0.05, target_modules: list[str] = list(ATTENTION + FFN),
                 side: Literal["decoder", "encoder", "both"] = "decoder", cross_attention: bool = True,
                 cross_attention_kv: bool = False, encoder_start: int = 0, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 10, schedule: Literal["linear", "cosine", "constant"] = "linear",
                 label_smoothing: float = 0.0, init_from: str | None = None, val_max_new_tokens: int = 128):
        lora = LoraExpertConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=tuple(target_modules),
                                side=side, cross_attention=cross_attention, cross_attention_kv=cross_attention_kv,
                                encoder_start=encoder_start)
        loaded, init, parents = load_checked_base(base, languages, lora, init_from)
        super().__init__(loaded.model, loaded.processor, lora, lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, schedule=schedule, label_smoothing=label_smoothing,
                         init_from=init, val_max_new_tokens=val_max_new_tokens)
        self.base, self.languages, self.parents = loaded, tuple(languages), parents


class CorpusDataModule(ExpertDataModule):
    """Train / validation batches from a corpus directory, for the :class:`LoraExpertTask` being trained.

    The processor, the languages and (when it can be cached) the frozen encoder come from the model when the
    Trainer sets this up.

    Args:
        data: corpus directory (from `whisper-experts corpus synth` / `corpus from-dir`).
        batch_size: utterances per batch.
        max_train: at most this many training utterances per language.
        max_validation: at most this many validation utterances per language.
        cache_encoder: cache encoder outputs (or the input of the lowest adapted encoder layer).
        cache_dir: encoder cache location (default: <data>/.cache).
        seed: seeds the batch order and the augmentation.
        progress: progress bars for feature extraction and the encoder cache.
        extra_data: further training corpora, each DIR or DIR:WEIGHT (validation uses `data` alone).
        data_weight: the mixing weight of `data` (an epoch draws round(weight x rows) of a corpus).
        augment: SpecAugment, speed perturbation and noise (the fields of `whisper-experts train`'s options).
    """

    def __init__(self, data: str, batch_size: int = 16, max_train: int | None = None,
                 max_validation: int | None = None, cache_encoder: bool = True, cache_dir: str | None = None,
                 seed: int = 0, progress: bool = True, extra_data: list[str] | None = None, data_weight: float = 1.0,
                 augment: AugmentConfig | None = None):
        super().__init__(data, None, (), batch_size, max_train, max_validation, cache_dir=cache_dir, seed=seed,
                         progress=progress, extra_data=tuple(extra_data or ()), data_weight=data_weight,
                         augment=augment)
        self.cache_encoder = cache_encoder

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            task = self.trainer.lightning_module
            if not isinstance(task, LoraExpertTask):
                raise TypeError(f"CorpusDataModule feeds a LoraExpertTask, not a {type(task).__name__}")
            lora = task.config
            self.processor, self.languages = task.processor, list(task.languages)
            self.base_fingerprint, self.multilingual = task.base.fingerprint, task.base.multilingual
            # As in the recipe: cache what the expert cannot change (the encoder output, or the input of the
            # lowest adapted encoder layer), computed on the device the run uses.
            if self.cache_encoder and (not lora.touches_encoder or lora.encoder_start > 0):
                self.encoder = task.model.model.encoder.to(self.trainer.strategy.root_device)
                self.encoder_layer = lora.encoder_start if lora.touches_encoder else None
        super().setup(stage)


class StoreBestExpert(KeepBestExpert):
    """Keeps the expert with the best validation WER; when fitting ends, tests it and stores it in the registry.

    Every rank keeps the same expert (DDP keeps the weights in step and every rank sees the same WER); rank 0
    alone evaluates it and writes it.

    Args:
        name: the expert's name in the registry, e.g. uk-espeak.
        registry: registry directory (default: <home>/registry, home being $WHISPER_EXPERTS_HOME).
        out: also write the expert file here.
        test: evaluate the base and the expert on the test split (the manifest's test metrics).
        test_limit: at most this many test utterances per language.
        tags: registry tags for the stored version.
    """

    def __init__(self, name: str | None = None, registry: str | None = None, out: str | None = None,
                 test: bool = True, test_limit: int | None = None, tags: list[str] | None = None):
        super().__init__()
        self.name, self.registry, self.out = name, registry, out
        self.test, self.test_limit, self.tags = test, test_limit, list(tags or [])
        self.record = None  # the registry record, once stored
        self.test_results: dict | None = None

    @staticmethod
    def check_name(name: str | None) -> None:
        """Refuse a missing or invalid registry name (before training, not after)."""
        from registry.records import validate_name

        if not name:
            raise ValueError("no expert name: set `expert.name` in the config or pass --expert.name uk-espeak")
        validate_name(name)

    def setup(self, trainer, module, stage: str) -> None:
        if stage == "fit":
            self.check_name(self.name)

    def on_fit_end(self, trainer, module) -> None:
        if self.tensors is None:
            raise RuntimeError("fitting ended before any validation (max_steps stopped it inside the first epoch?); "
                               "raise trainer.max_steps or set trainer.val_check_interval")
        if not trainer.is_global_zero:
            return
        from registry.expert_file import Expert, save_expert
        from registry.store import Registry

        data, lora = trainer.datamodule, module.config
        if self.test:
            # The base is evaluated alone, then with the best expert; the training adapter comes back afterwards.
            model, final = module.model.cpu().eval(), module.expert_tensors()
            remove_experts(model)
            self.test_results = evaluate_on_test_split(module.base, self.tensors, lora.hyperparameters(), data.data,
                                                       module.languages, limit=self.test_limit,
                                                       batch_size=data.batch_size, progress=data.progress)
            attach_expert(model, final, lora.hyperparameters(), DEFAULT_ADAPTER, trainable=True)
        manifest = expert_manifest(module.base, module.languages, lora, self, data, lr=module.hparams.lr,
                                   schedule=module.hparams.schedule, test=self.test_results, parents=module.parents)
        expert = Expert(self.tensors, manifest)
        self.record = Registry(self.registry).add(expert, self.name, tags=self.tags)
        if self.out:
            save_expert(expert, self.out)
        rank_zero_info(f"stored {self.record.ref} in the registry (best epoch {self.best_epoch}, "
                       f"validation WER {100 * self.best_wer:.1f}%)")


class ExpertLightningCLI(LightningCLI):
    """``LightningCLI`` over :class:`LoraExpertTask` and :class:`CorpusDataModule`, with the recipe's defaults:
    ``expert:`` (:class:`StoreBestExpert`), best-by-``val_wer`` checkpointing and early stopping, bf16-mixed on
    CUDA, and the data module's own DDP sharding (``use_distributed_sampler`` off). Other expert kinds subclass
    it and set the class attributes (``trainers.distill_lightning.DistillLightningCLI``).

    Args:
        args: command-line arguments (default ``sys.argv[1:]``), e.g. ``["fit", "--config", "x.yaml"]``.
        run: run the subcommand (False: only parse and instantiate).
    """

    task_class = LoraExpertTask  # the LightningModule read from ``model:``
    data_class = CorpusDataModule  # the LightningDataModule read from ``data:``
    expert_class = StoreBestExpert  # the callback read from ``expert:``, storing what fit trained
    prog = "whisper-experts lightning"
    description = "Train a LoRA language expert with LightningCLI."

    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(
            self.task_class, self.data_class, args=args, run=run, seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": self.prog, "description": self.description},
            trainer_defaults={
                # The machine decides: bf16-mixed where CUDA is, full precision on CPU.
                "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true",
                "max_epochs": 10,
                "use_distributed_sampler": False,  # the data module's batch sampler shards batches itself
                "num_sanity_val_steps": 0,
                "log_every_n_steps": 1,
                "enable_model_summary": False,
            },
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # The expert has no test_step / predict_step: its test is the expert callback's, at the end of fit.
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(self.expert_class, "expert")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val_wer", "checkpoint.mode": "min", "checkpoint.save_top_k": 1,
                             "checkpoint.filename": "best-{epoch}-{val_wer:.4f}"})
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val_wer", "early_stopping.mode": "min",
                             "early_stopping.patience": 3, "early_stopping.check_on_train_epoch_end": False})

    def before_instantiate_classes(self) -> None:
        # Fail before the base is loaded and the corpus featurized when fit cannot end by storing its expert.
        check = getattr(self.expert_class, "check_name", None)
        if self.subcommand == "fit" and check is not None:
            check(self.config.get("fit.expert.name"))

    def expert_callback(self):
        """The ``expert:`` callback of this run."""
        return next(c for c in self.trainer.callbacks if isinstance(c, self.expert_class))
