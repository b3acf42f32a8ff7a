"""Speech corpora: synthesized with espeak-ng over real sentences, or loaded from directories and datasets."""
