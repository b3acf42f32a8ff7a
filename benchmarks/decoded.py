"""Test scores of a base with or without experts (:class:`Evaluator`), kept on disk by what produced them: the
model and the clips it decoded.

A benchmark that decodes the same model on the same clips in two tables (students on a human corpus and on a
pseudo-labelled copy of it) takes the second from here. The key is whatever the caller names (the base, an expert
file's digest) plus :func:`clips_digest` of the clips and the torch/transformers versions.
"""

from __future__ import annotations

import json
from pathlib import Path


def clips_digest(utterances) -> str:
    """SHA-256 over the clips' ids, reference texts, languages and audio samples: the same test clips give the
    same digest whichever corpus directory holds them."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for u in utterances:
        for part in (u.id, u.text, u.language):
            h.update(part.encode() + b"\0")
        h.update(np.ascontiguousarray(u.audio, dtype=np.float32).tobytes())
    return h.hexdigest()


def stored_scores(directory: Path, name: str, decode, **key) -> dict:
    """``decode()``'s scores, kept as ``<directory>/<name>-<tag>.json`` where the tag hashes ``key`` and the
    torch/transformers versions; read from there when present."""
    import torch
    import transformers

    from benchmarks.trained import tag
    from registry.atomic import atomic_write_text

    path = directory / f"{name}-{tag(**key, torch=torch.__version__, transformers=transformers.__version__)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    scores = decode()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(scores))
    return scores


class Evaluator:
    """Test WER/CER of the base with or without experts, on each language's test utterances (loaded once).

    With ``work``, the scores of the base alone and of the base with an expert file are kept under
    ``<work>/decoded/`` and reused by any table that decodes the same model on the same clips: the key is the base
    (``--base``), the expert file's bytes, the clips (ids, references and audio samples), the batch size, the
    device and the torch/transformers versions. Two tables on one test split (students on the human corpus and
    on a pseudo-labelled copy of it) then decode the base and the teacher once. Not in the key: a base replaced
    in place under the same name, or a change to the decoding or scoring code; delete ``<work>/decoded/`` then."""

    def __init__(self, args, work: Path | None = None, corpus_for=None):
        from registry.bases import load_base

        self.args, self.base = args, load_base(args.base, device=args.device)
        self.utterances: dict[str, list] = {}
        self.decoded = work / "decoded" if work is not None else None
        self.corpus_for = corpus_for  # (language, args) -> the corpus holding its test split

    def _utts(self, lang: str) -> list:
        from inference.evaluation import utterances_from_dataset
        from trainers.corpus.loading import load_corpus

        if lang not in self.utterances:
            test = load_corpus(self.corpus_for(lang, self.args))["test"]
            self.utterances[lang] = utterances_from_dataset(test, [lang], self.args.test_limit)
        return self.utterances[lang]

    def rates(self, lang: str) -> dict:
        """The model as it is now (base, or with an expert applied / a CLSR language set) on ``lang``."""
        from inference.evaluation import DecodeOptions, evaluate, paired_counts

        report = evaluate(self.base.model, self.base.processor, self._utts(lang),
                          DecodeOptions(batch_size=self.args.batch_size), progress=False).as_dict()
        # with the per-utterance counts, for paired comparisons between rows
        return {**{k: report["languages"][lang][k] for k in ("wer", "cer", "n", "wer_ci95")},
                "utterances": paired_counts(report)}

    def with_expert(self, expert, lang: str) -> dict:
        from inference.language_matrix import expert_applied

        with expert_applied(self.base.model, expert):
            return self.rates(lang)

    def stored(self, lang: str, expert_file: Path | None = None) -> dict:
        """:meth:`rates` of the base alone (``expert_file`` None) or with the expert in ``expert_file``, from
        ``<work>/decoded/`` when this model was decoded on these clips before (else decoded and kept there)."""
        from registry.expert_file import load_expert

        def decode():
            return self.with_expert(load_expert(expert_file), lang) if expert_file else self.rates(lang)

        if self.decoded is None:
            return decode()
        from benchmarks.trained import file_digest

        return stored_scores(self.decoded, lang, decode, base=self.args.base,
                             expert=file_digest(expert_file) if expert_file else None,
                             clips=clips_digest(self._utts(lang)), batch_size=self.args.batch_size,
                             device=str(self.base.model.device))

    def clsr(self, experts: dict, languages, untouched, gate_mode: str | None = None) -> tuple[dict, dict]:
        """Every student language's CLSR expert in one CLSR model: each language routed to its own path and
        gate (``gate_mode``: hard or soft inference gates; default: as each expert records), the untouched
        languages through the shared path. The model is converted back afterwards."""
        from distill.clsr import (attach_clsr_expert, convert_from_clsr, convert_to_clsr, recorded_layout,
                                  set_gate_mode, set_language)

        model = self.base.model
        layout = recorded_layout(next(iter(experts.values())).manifest["hyperparameters"])
        convert_to_clsr(model, **layout)
        try:
            for lang, expert in experts.items():
                attach_clsr_expert(model, expert, self.base, language=lang)  # with the gate mode it records
            if gate_mode is not None:
                set_gate_mode(model, gate_mode)
            test = {}
            for lang in languages:
                set_language(model, lang)
                test[lang] = self.rates(lang)
            set_language(model, None)
            return test, {lang: self.rates(lang) for lang in untouched}
        finally:
            convert_from_clsr(model)

    def parameters(self) -> int:
        return sum(p.numel() for p in self.base.model.parameters())
