"""DistilWhisper-style gated experts (CLSR) and knowledge distillation.

This package holds the conditional language-specific routing layer (a frozen shared feed-forward path, one
path per language and a learned per-token gate), conversion of a plain Whisper into a CLSR Whisper and back,
the gate-budget loss, knowledge-distillation losses (KL, Jensen-Shannon) as ``nn.Module``s, and teacher
sources (an online teacher, cached top-k teacher log-probabilities). It never imports from ``trainers``.
"""
