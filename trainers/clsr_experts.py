"""From a trained CLSR student to ``clsr`` expert files: best epoch per language, test WER, manifests.

A language's path and gate get gradients only from that language's batches, so each language can keep its own
best epoch (by ``val_wer_<lang>``) without affecting the others: :class:`KeepBestLanguages` keeps a copy per
language. :func:`clsr_experts` puts every language's best tensors back, evaluates each language on the test split
beside the base (the shared path alone, which is the base exactly), and returns one expert per language with its
manifest: CLSR shape and training hyperparameters, the data summary, validation and test metrics, and the lineage
(the teachers' identity and how they were read, including the top-k mass kept by a cache).
"""

from __future__ import annotations

import copy
from typing import Sequence

import lightning as L

from distill.clsr import make_clsr_expert, set_language
from registry.expert_file import Expert


class KeepBestLanguages(L.Callback):
    """Keeps each language's paths and gates from the epoch with its lowest validation WER.

    Attributes:
        best: language -> ``{"wer", "epoch"}``; tensors: language -> expert-file tensors; history: per-epoch metrics.
    """

    def __init__(self, languages: Sequence[str] = ()):
        self.languages = list(languages)
        self.best: dict[str, dict] = {}
        self.tensors: dict[str, dict] = {}
        self.history: list[dict] = []

    def setup(self, trainer, module, stage: str) -> None:
        if not self.languages:
            self.languages = list(module.languages)

    def state_dict(self) -> dict:  # travels in the checkpoints: a resumed run keeps the best epochs before it
        return {"best": self.best, "tensors": self.tensors, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.tensors, self.history = dict(state["best"]), dict(state["tensors"]), list(state["history"])

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        for lang in self.languages:
            wer = metrics.get(f"val_wer_{lang}", float("inf"))
            if lang not in self.best or wer < self.best[lang]["wer"]:
                self.best[lang] = {"wer": wer, "epoch": trainer.current_epoch}
                self.tensors[lang] = copy.deepcopy(module.language_tensors(lang))

    @property
    def best_wer(self) -> float:
        """Validation WER over all languages at the last validation (what early stopping watches)."""
        return self.history[-1].get("val_wer", float("nan")) if self.history else float("nan")


def evaluate_clsr_on_test_split(model, processor, data: str, languages: Sequence[str], *, limit: int | None = None,
                                batch_size: int = 16, progress: bool = True) -> dict:
    """Test-split WER per language: the base (shared path only) and the CLSR model routed by that language.

    Returns:
        ``{"base": {lang: row}, "expert": {lang: row}}``, rows as in ``inference.evaluation``.
    """
    from inference.evaluation import DecodeOptions, evaluate, utterances_from_dataset
    from trainers.corpus.loading import load_corpus

    utts = utterances_from_dataset(load_corpus(data)["test"], languages, limit)
    opts = DecodeOptions(batch_size=batch_size)
    set_language(model, None)  # the shared path is the pretrained FFN: exactly the base
    out = {"base": evaluate(model, processor, utts, opts, progress=progress).as_dict()["languages"], "expert": {}}
    for lang in languages:
        set_language(model, lang)
        mine = [u for u in utts if u.language == lang]
        out["expert"].update(evaluate(model, processor, mine, opts, progress=progress).as_dict()["languages"])
    set_language(model, None)
    return out


def expert_names(name: str | None, languages: Sequence[str], taught: bool) -> dict[str, str]:
    """Registry names of a CLSR run's experts: ``NAME`` for one language, ``NAME-<lang>`` for several; without a
    name ``<lang>-clsr`` (``<lang>-clsr-kd`` when a teacher taught it)."""
    from registry.records import validate_name

    if name:
        names = {lang: name if len(languages) == 1 else f"{name}-{lang}" for lang in languages}
    else:
        names = {lang: f"{lang}-clsr" + ("-kd" if taught else "") for lang in languages}
    for n in names.values():
        validate_name(n)
    return names


def teacher_lineage(teacher) -> dict:
    """The ``lineage`` of a student taught by ``teacher`` (a teacher source, or None)."""
    if teacher is None:
        return {"parents": [], "method": "clsr"}
    identity = teacher.identity()
    parents = [{"expert": e["spec"], "sha256": e["sha256"], "languages": e["languages"], "role": "teacher expert"}
               for t in identity["teachers"] for e in t["experts"]]
    return {"parents": parents, "method": "distillation", "teacher": identity}


def clsr_experts(module, base, keep: KeepBestLanguages, data, *, test: bool = True, test_limit: int | None = None,
                 batch_size: int = 16, progress: bool = True) -> tuple[list[Expert], dict | None]:
    """One ``clsr`` expert per language from a trained :class:`~trainers.clsr_module.ClsrExpertModule`.

    Every language's best tensors are loaded into the model first (the model keeps them afterwards).

    Args:
        module: the trained module (its model, languages, configs, teacher source, hparams).
        base: the ``registry.bases.Base`` the student was converted from.
        keep: the callback holding each language's best tensors.
        data: the :class:`~trainers.language_batches.DistillDataModule` it trained on.
        test: evaluate each language (and the base) on the test split for the manifests' test metrics.

    Returns:
        (the experts, in ``module.languages`` order; the test results or None).
    """
    missing = [lang for lang in module.languages if lang not in keep.tensors]
    if missing:
        raise RuntimeError(f"no validated epoch for {', '.join(missing)}: the validation split needs utterances of "
                           "every language, and training must reach one validation (raise --epochs / --max-steps)")
    model = module.model.eval()
    for lang in module.languages:
        module.load_language_tensors(lang, keep.tensors[lang])
    results = None
    if test:
        results = evaluate_clsr_on_test_split(model, module.processor, data.data, module.languages, limit=test_limit,
                                              batch_size=batch_size, progress=progress)
    hp, loss = module.hparams, module.loss_config
    training = {"lr": hp.lr, "gate_lr": hp.gate_lr, "decoder_lr": hp.decoder_lr, "schedule": hp.schedule,
                "warmup_steps": hp.warmup_steps, "max_noise": hp.max_noise, "gate_warmup": hp.gate_warmup,
                "path_dropout_ramp": hp.path_dropout_ramp,
                "ce_weight": loss.ce_weight, "gate_weight": loss.gate_weight, "kd_weight": loss.kd_weight,
                "kd": loss.kd if module.teacher is not None else None, "temperature": loss.temperature,
                "label_smoothing": loss.label_smoothing, "gate_budget": loss.gate_budget,
                "batch_size": data.batch_size, "seed": data.seed,
                "epochs_run": keep.history[-1]["epoch"] + 1 if keep.history else 0}
    lineage = teacher_lineage(module.teacher)
    summary = data.summary
    experts = []
    for lang in module.languages:
        own = summary["languages"].get(lang, {})
        data_summary = {"corpus": str(data.data), "utterances": own.get("utterances", 0),
                        "hours": own.get("hours", 0.0),
                        "trained_with": list(module.languages),
                        **{f"{k}_{m}": v for k, d in summary.items() if k != "languages" for m, v in d.items()}}
        metrics = {lang: {"validation": {"wer": keep.best[lang]["wer"]}}}
        if results is not None:
            metrics[lang]["test"] = {k: results["expert"][lang][k] for k in ("wer", "cer", "n")}
            metrics[lang]["base_test"] = {k: results["base"][lang][k] for k in ("wer", "cer", "n")}
        expert = make_clsr_expert(model, lang, base, data=data_summary, metrics=metrics, lineage=lineage)
        expert.manifest["hyperparameters"].update(training, best_epoch=keep.best[lang]["epoch"])
        experts.append(expert)
    return experts, results

