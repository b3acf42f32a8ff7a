"""LoRA language experts on Whisper (built on peft), sparse experts, and the arithmetic that fuses experts.

``config``/``model``: the LoRA expert kind (attach one or several to a Whisper, switch, remove); ``sparse``,
``sparse_masks``, ``sparse_layer``: the sparse expert kind (masks and values, choosing masks, training only the
masked entries); ``deltas``, ``task_vectors`` and ``merge``/``merge_methods``: fusion as pure tensor functions (exact
linear, SVD truncation, TIES, DARE, LoRS, magnitude pruning, task arithmetic) in one name -> function table;
``export``/``peft_format``: PEFT, merged Hugging Face and CTranslate2 exports; ``kinds``: the table of expert kinds
(what each kind can do, and why not), which higher packages add their kinds to. Imports only ``registry``.
"""

from registry.faces import exports_of, lazy_face

_EXPORTS = exports_of({
    "lora_experts.config": "LoraExpertConfig",
    "lora_experts.model": "attach_expert set_active_expert remove_experts expert_tensors",
    "lora_experts.merge": "fuse_experts fused_expert MergeResult",
    "lora_experts.task_vectors": "LowRank task_vector apply_task_vector expert_from_task_vector",
    "lora_experts.sparse": "SparseDelta sparse_expert apply_sparse remove_sparse",
    "lora_experts.export": "export_hf export_ct2_expert merged_model",
    "lora_experts.kinds": "ExpertKind expert_kind register_kind",
})
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
