"""Recipes: the pieces of ``registry``, ``lora_experts`` and ``distill`` wired into jobs.

Lightning modules and data modules, synthetic speech corpora (``trainers.corpus``), audio reading, the
evaluation harness (batched decoding, WER/CER per language), fusion weight search, and the
``whisper-experts`` command line (``trainers.cli``). Dependencies point one way: trainers may import the
libraries, never the reverse.
"""
