"""Base models and expert storage.

Everything about *where weights come from and how they are kept* belongs here: loading a base Whisper
(model, processor, generation config) from a hub id, a local Hugging Face directory or a faster-whisper /
CTranslate2 directory (converted once into a cached Hugging Face directory), the weight and tokenizer
fingerprints that tie experts to their base, the project's home directory (``WHISPER_EXPERTS_HOME``), and,
as later issues land, the expert file format, the content-addressed store with its SQLite index, and packs.
Nothing in here trains or decodes.
"""
