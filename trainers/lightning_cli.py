"""LoRA expert training driven by Lightning's own CLI: YAML configs, ``--print_config``, ``--model.rank 8``.

The same recipe as :func:`trainers.train_lora.train_lora_expert`, but every piece is built from plain config
values, so :class:`~lightning.pytorch.cli.LightningCLI` can read it from a YAML file:

- :class:`LoraExpertTask` (``model:``) loads the base by name and attaches a fresh (or warm-started) expert;
- :class:`CorpusDataModule` (``data:``) reads a corpus directory and takes the processor, languages and frozen
  encoder from the model when the Trainer sets it up;
- :class:`StoreBestExpert` (``expert:``) keeps the expert with the best validation WER and, when fitting ends,
  evaluates it on the test split and stores it in the registry with the recipe's manifest (rank 0 only);
- ``checkpoint:`` and ``early_stopping:`` watch ``val_wer`` as the recipe's do.

Every option of the recipe is a field of :class:`~trainers.configs.TrainConfig`, the same fields as the flags of
``whisper-experts train``: :func:`lightning_keys` says where a field lives (``epochs`` is ``trainer.max_epochs``,
``batch_size`` is ``data.batch_size``, ...); every other field is a ``model:`` option. The signatures of
``LoraExpertTask`` and ``CorpusDataModule`` are generated from those fields (:func:`trainers.options.give_signature`).

Run it as ``whisper-experts lightning fit --config examples/lightning_lora_uk.yaml``.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lora_experts.model import DEFAULT_ADAPTER, attach_expert, remove_experts
from trainers.augment import AugmentConfig
from trainers.configs import TrainConfig, default_precision
from trainers.data import ExpertDataModule
from trainers.lora_module import LoraExpertModule
from trainers.options import check_config_keys, config_files, config_values, give_signature
from trainers.train_lora import KeepBestExpert, evaluate_on_test_split, expert_manifest, load_checked_base


def lightning_keys(config: type) -> dict[str, tuple[str, ...]]:
    """Where each field of a recipe's config lives in a LightningCLI config, when not under ``model:``.

    Lightning's own objects hold the loop (``trainer:``), early stopping (``early_stopping:``) and the seed; the
    data module (``data:``) the corpus and its batches; the ``expert:`` callback the test split. Every other field is
    a ``model:`` option, so a field new to the config appears there without more code.
    """
    keys = {"epochs": ("trainer.max_epochs",), "max_steps": ("trainer.max_steps",),
            "accumulate": ("trainer.accumulate_grad_batches",), "precision": ("trainer.precision",),
            "strategy": ("trainer.strategy",), "devices": ("trainer.devices",),
            "run_dir": ("trainer.default_root_dir",), "patience": ("early_stopping.patience",),
            "seed": ("seed_everything", "data.seed"), "test": ("expert.test",), "test_limit": ("expert.test_limit",),
            **{name: (f"data.{name}",) for name in ("data", "batch_size", "max_train", "max_validation",
                                                     "cache_encoder", "cache_dir", "progress", "extra_data",
                                                     "data_weight")},
            **{f.name: (f"data.augment.{f.name}",) for f in fields(AugmentConfig)}}
    names = {f.name for f in fields(config)}
    return {name: where for name, where in keys.items() if name in names}


def section_fields(config: type, section: str, fixed: Sequence[str] = ()) -> list[str]:
    """The fields of ``config`` that are options of ``section`` (``model`` or ``data``), in the config's order;
    ``fixed``: fields the LightningCLI recipe sets itself (the distillation CLI's ``kind``)."""
    keys = lightning_keys(config)
    if section == "model":
        return [f.name for f in fields(config) if f.name not in keys and f.name not in fixed]
    return [f.name for f in fields(config) if f"{section}.{f.name}" in keys.get(f.name, ())]


class LoraExpertTask(LoraExpertModule):
    """A LoRA language expert on a frozen base Whisper, built from config values.

    Its options are the fields of :class:`~trainers.configs.TrainConfig` that no other section holds
    (:func:`lightning_keys`).
    """

    def __init__(self, **options):
        cfg = TrainConfig(data="", **config_values(TrainConfig, options))  # the corpus is the data module's
        lora = cfg.lora()
        loaded, lora, init, parents = load_checked_base(cfg.base, cfg.languages, lora, cfg.init_from)
        # The parent by name, not super(): see trainers.options.give_signature.
        LoraExpertModule.__init__(self, loaded.model, loaded.processor, lora, lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                                  label_smoothing=cfg.label_smoothing, init_from=init,
                                  val_max_new_tokens=cfg.val_max_new_tokens)
        self.base, self.languages, self.parents = loaded, tuple(cfg.languages), parents


give_signature(LoraExpertTask, TrainConfig, section_fields(TrainConfig, "model"))


class CorpusDataModule(ExpertDataModule):
    """Train / validation batches from a corpus directory, for the :class:`LoraExpertTask` being trained.

    Its options are the ``data.*`` fields of :class:`~trainers.configs.TrainConfig` (:func:`lightning_keys`), and
    ``augment`` (the ``data.augment.*`` fields). The processor, the languages and (when it can be cached) the
    frozen encoder come from the model when the Trainer sets this up.
    """

    def __init__(self, augment: AugmentConfig | None = None, **options):
        cfg = TrainConfig(languages=(), **config_values(TrainConfig, options))
        # The parent by name, not super(): see trainers.options.give_signature.
        ExpertDataModule.__init__(self, cfg.data, None, (), cfg.batch_size, cfg.max_train, cfg.max_validation,
                                  cache_dir=cfg.cache_dir, seed=cfg.seed, progress=cfg.progress,
                                  extra_data=cfg.extra_data, data_weight=cfg.data_weight, augment=augment)
        self.cache_encoder = cfg.cache_encoder

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


give_signature(CorpusDataModule, TrainConfig, section_fields(TrainConfig, "data"), extra=[
    ("augment", AugmentConfig | None, None, "SpecAugment, speed perturbation and noise (the augmentation fields of "
                                            "`whisper-experts train`)")])


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
                 test: bool = TrainConfig.test, test_limit: int | None = TrainConfig.test_limit,
                 tags: list[str] | None = None):
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

    config_class = TrainConfig  # the recipe's options: model: and data: hold its fields (lightning_keys)
    task_class = LoraExpertTask  # the LightningModule read from ``model:``
    data_class = CorpusDataModule  # the LightningDataModule read from ``data:``
    expert_class = StoreBestExpert  # the callback read from ``expert:``, storing what fit trained
    prog = "whisper-experts lightning"
    description = "Train a LoRA language expert with LightningCLI."

    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(
            self.task_class, self.data_class, args=args, run=run,
            seed_everything_default=self.config_class.seed,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": self.prog, "description": self.description},
            trainer_defaults={
                **self.recipe_defaults("trainer"),
                # The machine decides: bf16-mixed where it computes bf16 natively, else full precision.
                "precision": self.config_class.precision or default_precision(),
                "use_distributed_sampler": False,  # the data module's batch sampler shards batches itself
                "num_sanity_val_steps": 0,
                "log_every_n_steps": 1,
                "enable_model_summary": False,
            },
        )

    @classmethod
    def recipe_defaults(cls, section: str) -> dict:
        """The config's defaults of the fields that ``section`` (``trainer``, ``early_stopping``) holds, by their
        names there. ``run_dir`` is left out: Lightning's ``default_root_dir`` stays the working directory."""
        from dataclasses import fields

        defaults = {f.name: f.default for f in fields(cls.config_class)}
        return {key.split(".", 1)[1]: defaults[name] for name, keys in lightning_keys(cls.config_class).items()
                for key in keys if key.startswith(section + ".") and name != "run_dir"
                and defaults[name] is not None}

    def parse_arguments(self, parser, args) -> None:
        # An unknown key in a --config file is an error naming the file, the key and the nearest valid key
        # (jsonargparse names only the key).
        args = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else args
        if isinstance(args, list):
            subcommand = next((a for a in args if not a.startswith("-")), None)
            subparsers = getattr(parser, "_subcommands_action", None)
            target = subparsers._name_parser_map.get(subcommand) if subparsers and subcommand else parser
            for path in config_files(args[args.index(subcommand) + 1:] if subcommand in args else args):
                loaded = yaml.safe_load(Path(path).read_text())
                if isinstance(loaded, dict) and target is not None:
                    check_config_keys(target, loaded, path)
        super().parse_arguments(parser, args)

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
                             "early_stopping.check_on_train_epoch_end": False,
                             **{f"early_stopping.{k}": v for k, v in self.recipe_defaults("early_stopping").items()}})

    def before_instantiate_classes(self) -> None:
        # Fail before the base is loaded and the corpus featurized when fit cannot end by storing its expert.
        check = getattr(self.expert_class, "check_name", None)
        if self.subcommand == "fit" and check is not None:
            check(self.config.get("fit.expert.name"))

    def expert_callback(self):
        """The ``expert:`` callback of this run."""
        return next(c for c in self.trainer.callbacks if isinstance(c, self.expert_class))
