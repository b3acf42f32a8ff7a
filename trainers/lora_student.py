"""Students trained by distillation: one LoRA learns from teachers (the LoRA-language-experts recipe), or a region
of the student's own weights does (a student cut from a larger Whisper, as distil-whisper trains it).

Several LoRA language experts (``uk-espeak``, ``ru-espeak``, ...) teach one student LoRA that serves all their
languages: each batch is scored by its language's teacher (:class:`distill.teachers.TeacherSet`), and the student
minimizes :class:`distill.losses.DistillationLoss` (CE with label smoothing + KD; a LoRA student has no gates).
Validation, checkpoints (the LoRA matrices only) and the expert file are those of
:class:`~trainers.lora_module.LoraExpertModule`.
"""

from __future__ import annotations

from distill.losses import DistillationLoss, DistillationLossConfig
from trainers.clsr_module import log_loss_parts
from trainers.finetune_module import FullFinetuneModule
from trainers.lora_module import LoraExpertModule


class TaughtStudent:
    """The training step of a student taught by teachers: CE (label smoothing) + KD against the batch's teacher,
    the parts logged. Mixed into a module that has ``_logits(batch)``, ``teacher`` and ``loss_fn``."""

    def on_fit_start(self):
        self.teacher.to(self.device)

    def training_step(self, batch, batch_idx):
        out = self.loss_fn(self._logits(batch), self.teacher.teacher_for(batch), batch["labels"])
        log_loss_parts(self, out, batch["labels"].shape[0])
        return out.loss

    def _attach_teacher(self, teacher, loss: DistillationLossConfig) -> None:
        self._hparams.pop("teacher", None)  # the parent records init arguments; a source is not a hyperparameter
        self._hparams_initial.pop("teacher", None)
        self.teacher, self.loss_config = teacher, loss
        self.loss_fn = DistillationLoss(loss)


class LoraStudentModule(TaughtStudent, LoraExpertModule):
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
        self._attach_teacher(teacher, loss)


class FullStudentModule(TaughtStudent, FullFinetuneModule):
    """A region of the student's own weights (the decoder by default, as distil-whisper trains a student cut from
    its teacher) trained against teachers; the result is ``trained - student`` as a ``task_vector`` expert.

    Args:
        teacher, loss: as for :class:`LoraStudentModule`.
        other arguments: as for :class:`~trainers.finetune_module.FullFinetuneModule`.
    """

    def __init__(self, model, processor, config, *, teacher, loss: DistillationLossConfig = DistillationLossConfig(),
                 **kwargs):
        super().__init__(model, processor, config, label_smoothing=loss.label_smoothing, **kwargs)
        self._attach_teacher(teacher, loss)
