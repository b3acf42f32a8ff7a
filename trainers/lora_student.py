"""A LoRA expert trained by distillation: one student LoRA learns from teachers (the LoRA-language-experts recipe).

Several LoRA language experts (``uk-espeak``, ``ru-espeak``, ...) teach one student LoRA that serves all their
languages: each batch is scored by its language's teacher (:class:`distill.teachers.TeacherSet`), and the student
minimizes :class:`distill.losses.DistillationLoss` (CE with label smoothing + KD; a LoRA student has no gates).
Validation, checkpoints (the LoRA matrices only) and the expert file are those of
:class:`~trainers.lora_module.LoraExpertModule`.
"""

from __future__ import annotations

from distill.losses import DistillationLoss, DistillationLossConfig
from trainers.clsr_module import log_loss_parts
from trainers.lora_module import LoraExpertModule


class LoraStudentModule(LoraExpertModule):
    """A LoRA expert on a frozen base, trained against teachers.

    Args:
        teacher: a :class:`distill.sources.TeacherSource` (online or cached).
        loss: loss weights (the gate weight has no effect: a LoRA student has no gates).
        other arguments: as for :class:`~trainers.lora_module.LoraExpertModule` (its ``label_smoothing`` is
            taken from ``loss`` and also applies to the validation loss).
    """

    def __init__(self, model, processor, config, *, teacher, loss: DistillationLossConfig = DistillationLossConfig(),
                 **kwargs):
        super().__init__(model, processor, config, label_smoothing=loss.label_smoothing, **kwargs)
        self._hparams.pop("teacher", None)  # the parent records every init argument; a source is not a hyperparameter
        self._hparams_initial.pop("teacher", None)
        self.teacher, self.loss_config = teacher, loss
        self.loss_fn = DistillationLoss(loss)

    def on_fit_start(self):
        self.teacher.to(self.device)

    def training_step(self, batch, batch_idx):
        out = self.loss_fn(self._logits(batch), self.teacher.teacher_for(batch), batch["labels"])
        log_loss_parts(self, out, batch["labels"].shape[0])
        return out.loss
