"""The Lightning module that trains CLSR gated experts (DistilWhisper), with or without a teacher.

The student is the base Whisper converted to CLSR (:func:`distill.clsr.convert_to_clsr`) with a path and a gate per
language; everything pretrained stays frozen. A student whose CLSR layout leaves the encoder (or its lower layers)
alone takes batches with the cached encoder output (or the cached input of its lowest CLSR encoder layer) instead
of log-mel features, as a decoder-only LoRA expert does. Each training batch holds one language
(:class:`~trainers.language_batches.LanguageBatchSampler`), so a step trains that language's path and gate. The
loss is :class:`distill.losses.DistillationLoss`: cross-entropy with label smoothing, the gate budget
``|mean(g) - b|``, and (with a teacher source) the KD loss against the teacher's distribution. The gate noise
scale ramps linearly from 0 to ``max_noise`` over training (:func:`distill.clsr.noise_scale_at`) so the soft
training gates harden towards the hard inference gates. Two optional warm-ups, for small data where the budget
loss and path dropout shut the gates before the paths have learned anything: ``gate_warmup`` holds every
training gate open at the start and releases it linearly over that fraction of the steps (the gate floor
``1 - ramp``), and ``path_dropout_ramp`` raises the path dropout from 0 to its rate over that fraction
(:func:`distill.clsr.ramp_at`).

Logged: ``train_loss``, ``train_ce``, ``train_gate``, ``train_kd``, ``noise_scale``, ``gate_floor`` and
``path_dropout`` (with the warm-ups), the mean gate openness over
all layers (``gate_open``) and per layer (``gate_open/enc.3``, ``gate_open/dec.0``); validation loss, the mean
hard-gate openness per layer (``val_gate_open/...``) and, each epoch, WER/CER of greedy transcripts with hard
gates, each sample routed by its own language: ``val_wer`` over all languages and ``val_wer_<lang>`` per language
(per-language selection keeps each language's best epoch). Checkpoints hold the language paths and gates only.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from transformers.modeling_outputs import BaseModelOutput

from distill.clsr import (ClsrConfig, check_fraction, clsr_expert_tensors, clsr_routing, collect_gates,
                          convert_to_clsr, language_parameters, noise_scale_at, ramp_at, set_language,
                          set_noise_scale, set_warmup)
from distill.losses import DistillationLoss, DistillationLossConfig
from trainers.data import IGNORE, cached_encoder_states
from inference.decoding import transcribe_batch
from trainers.distributed import gather_union
from inference.evaluation import error_rates
from trainers.lora_module import lr_lambda


def short_layer(name: str) -> str:
    """``model.encoder.layers.3`` -> ``enc.3``; ``model.decoder.layers.0.self_attn.q_proj`` ->
    ``dec.0.self_attn.q_proj`` (metric names stay short in logs)."""
    stack, _, rest = name.partition(".layers.")
    return f"{'enc' if stack.endswith('encoder') else 'dec'}.{rest}"


def log_loss_parts(module: L.LightningModule, out, batch_size: int) -> None:
    """Log a :class:`~distill.losses.DistillationLossOutput`'s total and parts."""
    module.log("train_loss", out.loss, prog_bar=True, batch_size=batch_size)
    module.log_dict({"train_ce": out.ce, "train_gate": out.gate, "train_kd": out.kd}, batch_size=batch_size)


class ClsrExpertModule(L.LightningModule):
    """CLSR language paths and gates on a frozen base Whisper, trained with CE + gate budget (+ KD).

    Args:
        model: the base ``WhisperForConditionalGeneration``; converted to CLSR here (in place).
        processor: its ``WhisperProcessor``.
        languages: Whisper codes, one path and gate each.
        clsr: path kind (full copy or low-rank), gate size, dropouts.
        loss: loss weights; default DistilWhisper's with a teacher, CE + gate (weights 1) without.
        teacher: a :class:`distill.sources.TeacherSource` (online or cached), or None for no KD.
        lr, weight_decay, warmup_steps, schedule: AdamW and its schedule (``linear``, ``cosine``, ``constant``).
        gate_lr: the gates' peak learning rate (default ``lr``). A gate starts at ``G = 0`` and the budget loss
            holds the mean soft gate near ``b``, so on a short run at a full path's small rate ``G`` barely moves
            and the hard inference gate ``1[G >= 0]`` follows small early drifts; a separate rate lets the gates
            move at their own pace (which way they move is learned).
        decoder_lr: the decoder-side language paths' peak learning rate (default ``lr``; the encoder side's
            paths always train at ``lr``).
        max_noise: the gate noise scale reached at the end of training (5 in DistilWhisper).
        gate_warmup: the fraction of the training steps over which the training gates go from held open to as
            learned (0: no warm-up, the paper's recipe).
        path_dropout_ramp: the fraction of the training steps over which the path dropout rises from 0 to the
            CLSR config's rate (0: the full rate from the start).
        val_max_new_tokens: bound for validation decoding.
    """

    def __init__(self, model, processor, languages, clsr: ClsrConfig = ClsrConfig(),
                 loss: DistillationLossConfig | None = None, teacher=None, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 10, schedule: str = "linear", max_noise: float = 5.0,
                 val_max_new_tokens: int = 128, gate_lr: float | None = None,
                 decoder_lr: float | None = None, gate_warmup: float = 0.0, path_dropout_ramp: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "processor", "teacher", "clsr", "loss"])
        self.languages = list(dict.fromkeys(languages))
        if not self.languages:
            raise ValueError("a CLSR student needs at least one language")
        clsr = clsr.for_encoder(model.config.encoder_layers)  # a negative encoder_start counts from the top
        convert_to_clsr(model, self.languages, clsr)
        if loss is None:
            loss = DistillationLossConfig() if teacher is not None else DistillationLossConfig.without_teacher()
        if teacher is None and loss.kd_weight:
            raise ValueError(f"KD weight {loss.kd_weight} without a teacher; give a teacher or set the KD weight to 0")
        self.model, self.processor, self.clsr_config, self.loss_config = model, processor, clsr, loss
        check_fraction("gate_warmup", gate_warmup)  # refused now rather than at the first training step
        check_fraction("path_dropout_ramp", path_dropout_ramp)
        self.loss_fn = DistillationLoss(loss)
        self.teacher = teacher  # a plain object: Lightning neither moves it, nor checkpoints it, nor trains it
        self.strict_loading = False  # checkpoints carry the language paths and gates only
        self.model.train()
        self._val_rows: dict[int, tuple[str, str, str]] = {}  # row -> (language, reference, hypothesis)
        self._val_gates: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self):
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_train_epoch_start(self):
        self.model.train()  # bases load in eval mode; CLSR gates are soft, with noise and dropouts, in training
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch, batch_idx):
        total = max(1, int(self.trainer.estimated_stepping_batches))
        set_noise_scale(self.model, noise_scale_at(self.global_step, total, self.hparams.max_noise))
        set_warmup(self.model, gate_floor=1.0 - ramp_at(self.global_step, total, self.hparams.gate_warmup),
                   path_dropout_scale=ramp_at(self.global_step, total, self.hparams.path_dropout_ramp))

    # ------------------------------------------------------------------ steps
    def _route(self, batch) -> None:
        languages = list(batch["language"])
        set_language(self.model, languages[0] if len(set(languages)) == 1 else languages)

    def _forward(self, batch):
        """(logits, gate records, encoder states when the batch carries a cached encoder side, else None)."""
        self._route(batch)
        with collect_gates(self.model) as gates:
            # CLSR encoder layers above a cached layer input run here, routed and recorded like the rest.
            states = cached_encoder_states(self.model.model.encoder, batch, self.clsr_config.encoder_start,
                                           self.dtype)
            if states is not None:
                out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                                 decoder_input_ids=batch["decoder_input_ids"])
            else:
                out = self.model(input_features=batch["input_features"].to(self.dtype),
                                 decoder_input_ids=batch["decoder_input_ids"])
        return out.logits, gates, states

    def training_step(self, batch, batch_idx):
        logits, gates, _ = self._forward(batch)
        teacher = self.teacher.teacher_for(batch) if self.teacher is not None else None
        out = self.loss_fn(logits, teacher, batch["labels"], gates)
        loss = out.loss
        if not loss.requires_grad:
            # Every layer drew the shared path only (probability shared_only_prob ** layers): nothing to learn here,
            # but every process must still step (DDP), so backpropagate a zero through the batch's language.
            param = next(iter(language_parameters(self.model, batch["language"][0]).values()))
            loss = loss + 0.0 * param.sum()
        n = batch["labels"].shape[0]
        log_loss_parts(self, out._replace(loss=loss), n)
        routing = clsr_routing(self.model)
        self.log("noise_scale", routing.noise_scale, batch_size=n)
        if self.hparams.gate_warmup or self.hparams.path_dropout_ramp:
            self.log_dict({"gate_floor": routing.gate_floor,
                           "path_dropout": routing.path_dropout_scale * self.clsr_config.path_dropout}, batch_size=n)
        per_layer = gates.per_layer_mean()
        if per_layer:
            self.log("gate_open", sum(per_layer.values()) / len(per_layer), batch_size=n)
            self.log_dict({f"gate_open/{short_layer(k)}": v for k, v in per_layer.items()}, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        # eval mode: each language's inference gates (hard or soft: ClsrConfig.gate_inference), each sample by its own
        # language, so the best epoch is chosen under the gates the expert will be used with
        logits, gates, states = self._forward(batch)
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=IGNORE)
        self.log("val_loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0], sync_dist=True)
        for layer, g in gates.records:
            s = self._val_gates.setdefault(short_layer(layer), [0.0, 0])
            s[0] += float(g.sum())
            s[1] += g.numel()
        source = {"encoder_hidden_states": states} if states is not None else {
            "features": batch["input_features"].to(self.dtype)}
        out = transcribe_batch(self.model, self.processor, languages=batch["language"],
                               max_new_tokens=self.hparams.val_max_new_tokens, **source)
        for i, lang, ref, hyp in zip(batch["index"].tolist(), batch["language"], batch["text"], out.texts):
            self._val_rows[i] = (lang, ref, hyp)

    def on_validation_epoch_end(self):
        # Under DDP every rank scores the union of all ranks' rows, so all log the same WER (see LoraExpertModule).
        rows = gather_union(self._val_rows) if self.trainer.world_size > 1 else self._val_rows
        if rows:
            ordered = [rows[i] for i in sorted(rows)]
            groups = {"": ordered, **{lang: [r for r in ordered if r[0] == lang] for lang in self.languages}}
            for lang, items in groups.items():
                if not items:
                    continue
                rates = error_rates([r[1] for r in items], [r[2] for r in items])
                suffix = f"_{lang}" if lang else ""
                for key in ("wer", "cer"):
                    value = rates[key] if not math.isnan(rates[key]) else 1.0
                    self.log(f"val_{key}{suffix}", value, prog_bar=key == "wer" and not lang, sync_dist=True,
                             reduce_fx="max")
        for layer, (total, count) in self._val_gates.items():
            self.log(f"val_gate_open/{layer}", total / max(count, 1), sync_dist=True)
        self._val_rows, self._val_gates = {}, {}

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        hp = self.hparams

        def rate(name: str) -> float:
            if ".gates." in name:
                return hp.lr if hp.gate_lr is None else hp.gate_lr
            return hp.decoder_lr if ".decoder." in name and hp.decoder_lr is not None else hp.lr

        by_rate: dict[float, list] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                by_rate.setdefault(rate(name), []).append(p)
        groups = [{"params": params, "lr": lr} for lr, params in by_rate.items()]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        factor = lr_lambda(total, hp.warmup_steps, hp.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints: the experts only
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if ".experts." in k or ".gates." in k}

    def language_tensors(self, language: str) -> dict[str, torch.Tensor]:
        """One language's current paths and gates under their ``clsr`` expert-file names (CPU copies)."""
        return clsr_expert_tensors(self.model, language)

    def load_language_tensors(self, language: str, tensors: dict[str, torch.Tensor]) -> None:
        """Put a language's paths and gates back (e.g. its best epoch's, from :meth:`language_tensors`)."""
        with torch.no_grad():
            for name, p in language_parameters(self.model, language).items():
                key = name.replace(f".experts.{language}.", ".expert.").replace(f".gates.{language}.", ".gate.")
                p.copy_(tensors[key].to(p.device, p.dtype))
