"""The runtime: experts loaded into a live Whisper, routed, decoded, scored and served.

``kinds``: the whole table of expert kinds (what each can do, or why not); ``bank``/``batched_layer``/
``batched_sparse``/``clsr_bank``: experts of every kind side by side on one model, each sample of a batch with
its own; ``attach``/``packs``: attaching experts and packs; ``routing`` (policies: fixed, per sample, language
ID, soft, learned) and ``router`` (the learned router's model and file); ``audio``: files in; ``decoding``:
generation bounds and language ID; ``evaluation``, ``confidence``, ``language_matrix``: WER/CER with confidence
intervals, language x expert tables; ``transcribe``, ``window_routing``, ``transcript_formats``: long-form
transcription; ``serve``: the HTTP server. Imports ``distill``, ``lora_experts`` and ``registry``.
"""

from registry.faces import exports_of, lazy_face

_EXPORTS = exports_of({
    "inference.transcribe": "ExpertWhisper TranscribeOptions Transcript Segment",
    "inference.packs": "load_pack add_expert",
    "inference.kinds": "expert_kind",
    "inference.bank": "ExpertBank expert_bank",
    "inference.routing": ("RoutingDecision RoutingPolicy FixedLanguage CallerLanguages LanguageIDRouting "
                          "SoftLanguageRouting LearnedRouting POLICIES"),
    "inference.router": "LearnedRouter",
    "inference.evaluation": "DecodeOptions EvalReport evaluate error_rates paired_comparison utterances_from_dataset",
    "inference.confidence": "bootstrap_ci paired_bootstrap",
    "inference.language_matrix": "LanguageMatrix plot_matrix",
    "inference.audio": "load_audio AudioError",
})
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
