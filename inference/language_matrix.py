"""The language x expert WER matrix: every language of a test set under the base and under each expert in turn.

Rows are the base alone and each expert (single-language experts and merged ones alike), columns the
languages, cells normalized WER. Along a row: what an expert does to the languages it was not trained for
(interference); down a column: which expert serves that language best. All rows decode on one loaded base:
each expert is applied and taken out again as its kind's entry in the table of kinds says
(:mod:`inference.kinds`): a ``lora`` expert attached and detached (peft's wrappers replaced by the original
layers), a ``task_vector`` expert added to the weights it touches, which are then restored from a copy, a
``sparse`` expert's masked entries changed in place and their originals written back, the model converted to
CLSR for a ``clsr`` expert (its language path routed for every utterance) and back; either way the base is
bit-exactly as before (:func:`expert_applied`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from distill.clsr.model import is_clsr
from inference.bank import expert_bank
from inference.evaluation import DecodeOptions, EvalReport, Utterance, evaluate
from inference.kinds import expert_kind
from registry.expert_file import Expert

MATRIX_ADAPTER = "matrix"


@contextmanager
def expert_applied(model: torch.nn.Module, expert: Expert):
    """Apply ``expert`` to ``model`` inside the ``with`` block; on leaving it (also on an error) the model's
    parameters are bit-exactly what they were.

    How is the expert kind's ``apply`` (:mod:`inference.kinds`): a ``lora`` expert is attached with peft, a
    ``task_vector`` expert's dense deltas are added in place (restored from a copy), a ``sparse`` expert's masked
    entries changed in place (originals written back), the model converted to CLSR for a ``clsr`` expert (and
    back); a kind that cannot be applied is refused with its reason.

    Args:
        model: a ``WhisperForConditionalGeneration`` with no expert attached.
        expert: the expert, checked against the model's base by the caller.
    """
    kind = expert_kind(expert.kind)
    kind.require("apply", f"expert ({', '.join(expert.languages)})")
    carries = any(isinstance(m, BaseTunerLayer) for m in model.modules()) or is_clsr(model)
    if carries or expert_bank(model, create=False) is not None:
        raise ValueError("the model already carries an expert; the matrix applies experts one at a time to the "
                         "plain base (remove the attached expert first)")
    applied = kind.apply(model, expert, name=MATRIX_ADAPTER)
    try:
        yield
    finally:
        applied.undo()


@dataclass
class LanguageMatrix:
    """Per-language results of the base and of each expert on one set of utterances.

    Attributes:
        labels: row names, ``base`` first, then each expert as given.
        languages: column names, the utterances' language codes, sorted.
        reports: one :class:`~inference.evaluation.EvalReport` per row.
        own: per row, the languages that row's expert was made for (empty for the base).
    """

    labels: list[str]
    languages: list[str]
    reports: list[EvalReport]
    own: list[list[str]] = field(default_factory=list)

    def cells(self, metric: str = "wer") -> list[list[float]]:
        """(rows, languages) of ``metric`` (``wer``, ``cer``, ``wer_raw``, ``cer_raw``) in percent."""
        return [[100 * getattr(r.languages[lang], metric) for lang in self.languages] for r in self.reports]

    def as_dict(self) -> dict:
        wer, cer = self.cells("wer"), self.cells("cer")
        return {"metric": "normalized WER and CER, percent", "rows": self.labels, "languages": self.languages,
                "wer": wer, "cer": cer, "mean_wer": [_mean(row) for row in wer], "own_languages": self.own,
                "n": [self.reports[0].languages[lang].n for lang in self.languages]}

    def routed(self, label: str = "routed: own expert") -> "LanguageMatrix":
        """This matrix plus a row that serves each language with the single-language expert made for it, as
        routing by the known language does; built from the rows already decoded (no decoding).

        Raises:
            ValueError: when a language has no expert row made for it alone, or more than one.
        """
        report_of = {}
        for lang in self.languages:
            owners = [r for r, own in zip(self.reports, self.own) if own == [lang]]
            if len(owners) != 1:
                raise ValueError(f"routing by language needs exactly one single-language expert row for {lang!r}, "
                                 f"found {len(owners)}")
            report_of[lang] = owners[0]
        report = EvalReport({lang: report_of[lang].languages[lang] for lang in self.languages},
                            [u for lang in self.languages for u in report_of[lang].hypotheses
                             if u.get("language") == lang], report_of[self.languages[0]].guard,
                            {"routed": {lang: self.labels[self.reports.index(r)] for lang, r in report_of.items()}})
        return LanguageMatrix([*self.labels, label], list(self.languages), [*self.reports, report],
                              [*self.own, list(self.languages)])

    def markdown(self) -> str:
        """Rows x languages of normalized WER %, with the unweighted mean; an expert's own languages in bold."""
        head = "| WER % | " + " | ".join(self.languages) + " | mean |"
        rows = [head, "|" + "---|" * (len(self.languages) + 2)]
        for label, own, values in zip(self.labels, self.own, self.cells("wer")):
            shown = [f"**{v:.1f}**" if lang in own else f"{v:.1f}" for lang, v in zip(self.languages, values)]
            rows.append(f"| {label} | " + " | ".join(shown) + f" | {_mean(values):.1f} |")
        return "\n".join(rows)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def language_matrix(model, processor, utterances: Sequence[Utterance], experts: Sequence[tuple[str, Expert]],
                    opts: DecodeOptions = DecodeOptions(), progress: bool = True,
                    decode: Callable[[Expert | None], EvalReport] | None = None) -> LanguageMatrix:
    """Evaluate ``utterances`` under the base, then under each expert applied alone (see the module doc).

    Args:
        model, processor: the loaded base, with no expert attached; it is left as it was.
        utterances: the test set, any number of languages.
        experts: (row label, expert) pairs, in row order.
        opts: decoding options, the same for every row.
        decode: how a row is decoded, given its expert (None: the base); by default applied to ``model`` and
            evaluated on ``utterances`` with ``opts``. A benchmark passes one that reads rows it decoded before.
    """
    def evaluated(expert: Expert | None) -> EvalReport:
        if decode is not None:
            return decode(expert)
        if expert is None:
            return evaluate(model, processor, utterances, opts, progress=progress)
        with expert_applied(model, expert):
            return evaluate(model, processor, utterances, opts, progress=progress)

    labels, reports, own = ["base"], [evaluated(None)], [[]]
    for label, expert in experts:
        reports.append(evaluated(expert))
        labels.append(label)
        own.append(list(expert.languages))
    return LanguageMatrix(labels, sorted(reports[0].languages), reports, own)


def plot_matrix(matrix: LanguageMatrix, path: str, title: str = "") -> str:
    """PNG heatmap of the WER matrix (rows: base and experts, columns: languages), values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = matrix.cells("wer")
    top = max((v for row in values for v in row if not math.isnan(v)), default=0.0)
    fig, ax = plt.subplots(figsize=(1.2 * len(matrix.languages) + 2.5, 0.5 * len(matrix.labels) + 1.5))
    image = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(matrix.languages)), matrix.languages)
    ax.set_yticks(range(len(matrix.labels)), matrix.labels)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            bold = "bold" if matrix.languages[j] in matrix.own[i] else "normal"
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontweight=bold,
                    color="white" if v > 0.5 * top else "black")
    fig.colorbar(image, ax=ax, label="WER %")
    ax.set_xlabel("test language")
    ax.set_title(title or "WER % by language under each expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
