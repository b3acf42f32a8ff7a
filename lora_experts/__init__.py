"""LoRA language experts on Whisper, built on peft.

This package holds the LoRA expert kind as a library: its config, attaching one or many experts to a
Whisper model, the batched per-sample LoRA forward used for mixed-language batches (``batched_layer``: the
layer; ``bank``: experts side by side on one model; ``routing``: policies that pick each sample's expert;
``router``: the learned router, a small trained gate over a bank's experts), and fusion arithmetic as pure
tensor functions (task vectors, exact linear fusion, SVD truncation, TIES, DARE, LoRS,
magnitude pruning) in one name -> function registry. The sparse expert kind lives beside it (``sparse``: masks
and values, the file layout, exact apply/remove; ``sparse_masks``: choosing masks and their overlap between
languages; ``sparse_layer``: training only the masked entries). It never imports from ``trainers``.
"""
