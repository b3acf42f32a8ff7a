"""Speech corpora: synthesized with espeak-ng over real sentences, or loaded from directories and datasets.

- ``sources``: real sentences per language (user files, Debian fortunes, chatterbot-corpus, UDHR samples) and
  the Whisper language code -> espeak-ng voice table.
- ``synth``: ``SynthConfig`` and ``synthesize_corpus`` (disjoint sentences per split, unseen test speakers,
  reproducible for a seed, atomic output).
- ``loading``: the corpus format (``CORPUS_FEATURES``), ``load_corpus``, ``save_corpus``, and imports from a
  directory of recordings (``corpus_from_dir``) or a Hugging Face dataset (``corpus_from_hf``).

Submodules are imported on demand (``from trainers.corpus.synth import synthesize_corpus``): ``sources`` alone
stays light, without ``datasets``.
"""
