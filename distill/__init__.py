"""DistilWhisper's gated language experts (CLSR) and knowledge distillation.

``clsr``: the conditional language-specific routing layer (a frozen shared feed-forward path, one path per
language, a learned per-token gate), converting a Whisper to CLSR and back, CLSR expert files; ``losses``: KD
(KL, Jensen-Shannon) and the gate budget; ``teachers`` and ``teacher_cache``: teachers (any larger Whisper, or
a base plus experts) online or as cached top-k log-probabilities. Imports ``lora_experts`` and ``registry``.
"""

from registry.faces import exports_of, lazy_face

_EXPORTS = exports_of({
    "distill.clsr": "ClsrConfig convert_to_clsr convert_from_clsr make_clsr_expert attach_clsr_expert",
    "distill.losses": "DistillationLoss DistillationLossConfig KLDivergenceLoss JensenShannonLoss",
    "distill.teachers": "Teacher TeacherSet load_teachers",
})
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
