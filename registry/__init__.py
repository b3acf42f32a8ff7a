"""Formats and storage: where weights come from and how they are kept.

Loading a base Whisper (hub id, Hugging Face directory, or faster-whisper / CTranslate2 directory, converted
once) with the weight and tokenizer fingerprints that tie experts to it; the expert file (one safetensors with
a JSON manifest), the pack and router file formats; the content-addressed store with its SQLite index,
journal and fsspec mirrors; exports to CTranslate2. Nothing in here trains, decodes or imports peft.
"""

from registry.faces import exports_of, lazy_face

_EXPORTS = exports_of({
    "registry.bases": "Base BaseNotFoundError load_base import_base list_bases base_reference",
    "registry.expert_file": ("Expert ExpertFormatError ExpertMismatchError load_expert save_expert read_manifest "
                             "check_compatible"),
    "registry.store": "Registry",
    "registry.records": "ExpertRecord ExpertNotFoundError",
    "registry.packs": "PackFormatError PackInfo create_pack inspect_pack read_pack select_experts",
})
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
