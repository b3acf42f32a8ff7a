"""Teachers for knowledge distillation: a frozen Whisper, possibly adapted by experts, that scores the student's
target tokens.

A teacher is named by a *spec*:

``openai/whisper-large-v2``        any Whisper ``registry.bases.load_base`` can load (hub id, imported name, dir)
``whisper-base+uk-teacher``        a base plus an expert applied to it (a registry spec such as ``uk-teacher@2``,
                                   or an expert file), as its kind's entry in ``lora_experts.kinds`` applies it:
                                   ``lora`` experts attached, ``task_vector`` and ``sparse`` experts added to the
                                   weights, ``clsr`` experts routed by their language; ``mask`` experts refused

Several specs make a :class:`TeacherSet` (the LoRA-language-experts recipe: one LoRA expert per language
teaches that language). A spec without ``+`` in a set is an expert on the default base; experts of a switchable
kind (LoRA) on the same base share one model as adapters, and each batch is scored by its language's teacher.

Every teacher must share the student's tokenizer (same vocabulary, same features): the KD losses compare
distributions over token ids. :func:`check_same_tokenizer` refuses any other teacher, naming both.

Teachers score teacher-forced: the logits at every position of the student's ``decoder_input_ids``, in eval
mode, without gradients. Sources (:mod:`distill.teacher_cache`) either call a teacher every step (online) or
read its top-k log-probabilities stored once (cached).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from registry.expert_file import Expert, ExpertMismatchError


class TeacherMismatchError(ExpertMismatchError):
    """A teacher does not share the student's tokenizer (or feature extractor)."""


def check_same_tokenizer(teacher_base, student_base) -> None:
    """Refuse a teacher whose tokenizer fingerprint differs from the student's.

    Args:
        teacher_base, student_base: anything with ``name`` and ``tokenizer_fingerprint`` (``registry.bases.Base``).
    """
    if teacher_base.tokenizer_fingerprint != student_base.tokenizer_fingerprint:
        raise TeacherMismatchError(
            f"teacher {teacher_base.name} has tokenizer/feature fingerprint {teacher_base.tokenizer_fingerprint}, "
            f"the student {student_base.name} has {student_base.tokenizer_fingerprint}: their token ids (or "
            "log-mel features) differ, so the teacher's distributions cannot teach this student. Pick a teacher of "
            "the same Whisper family (multilingual tiny ... large-v2 share one tokenizer; large-v3 does not)")


def parse_spec(spec: str, default_base: str | None = None) -> tuple[str, str | None]:
    """``"whisper-base+uk-teacher"`` -> ``("whisper-base", "uk-teacher")``.

    Without ``+``: a base alone, or, when ``default_base`` is given (specs of a teacher set), an expert on
    ``default_base``. An existing path is never split (directories may contain ``+``).
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty teacher spec; give a base (openai/whisper-large-v2), base+expert, or an expert")
    if Path(spec).expanduser().exists():
        return (spec, None) if default_base is None or Path(spec).is_dir() else (default_base, spec)
    base, plus, expert = spec.rpartition("+")
    if plus:
        if not base or not expert:
            raise ValueError(f"teacher spec {spec!r}: expected BASE+EXPERT, e.g. whisper-base+uk-teacher")
        return base, expert
    return (spec, None) if default_base is None else (default_base, spec)


def resolve_expert(spec: str, registry=None) -> tuple[Expert, str]:
    """An expert and the sha256 of its file, from an expert file path or a registry spec (``name@version``)."""
    from registry.lookup import open_expert

    expert, identity = open_expert(spec, registry)
    return expert, identity["sha256"]


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass
class Teacher:
    """One frozen teacher model: a base and the experts applied to it.

    Attributes:
        model: a ``WhisperForConditionalGeneration`` in eval mode, frozen.
        base: the ``registry.bases.Base`` it was loaded from (its ``model`` is ``model``).
        experts: identity of each applied expert: ``{"spec", "sha256", "kind", "languages"}``.
        adapters: language -> what makes its expert the active one, for experts of a switchable kind (LoRA
            adapters: several share this model, one active at a time).
        routes: what puts the other applied experts back in force before every call (a CLSR expert's language
            routing; a no-op for experts added to the weights).
    """

    model: torch.nn.Module
    base: object
    experts: list[dict] = field(default_factory=list)
    adapters: dict[str, Callable[[], None]] = field(default_factory=dict)
    routes: list[Callable[[], None]] = field(default_factory=list)

    @property
    def languages(self) -> list[str] | None:
        """Languages this teacher is for: its experts' languages, or None (a plain base teaches any language)."""
        langs = [lang for e in self.experts for lang in e["languages"]]
        return list(dict.fromkeys(langs)) or None

    def fingerprint(self, language: str | None = None) -> str:
        """Identity of the model that scores ``language`` (base weights plus the expert files applied)."""
        experts = self.experts
        if self.adapters:  # several LoRA experts on one model: only the active one counts
            experts = [e for e in experts if language in e["languages"]] or experts
        if not experts:
            return self.base.fingerprint
        return _digest(self.base.fingerprint, *sorted(e["sha256"] for e in experts))

    def identity(self) -> dict:
        """What a student's manifest records about this teacher (lineage)."""
        return {"base": {"name": self.base.name, "fingerprint": self.base.fingerprint,
                         "tokenizer_fingerprint": self.base.tokenizer_fingerprint},
                "experts": [dict(e) for e in self.experts], "fingerprint": self.fingerprint()}

    def _route(self, language: str | None) -> None:
        if self.adapters:
            (self.adapters.get(language) or next(iter(self.adapters.values())))()
        for activate in self.routes:
            activate()

    @torch.no_grad()
    def logits(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor,
               language: str | None = None) -> torch.Tensor:
        """Teacher-forced logits (batch, positions, vocab) for ``decoder_input_ids`` (batch, positions).

        Args:
            input_features: (batch, n_mels, frames) log-mel features.
            language: the batch's language (picks the adapter of a multi-expert teacher).
        """
        self.model.eval()  # Lightning may have put it in train mode with the rest of the module tree
        self._route(language)
        param = next(self.model.parameters())
        out = self.model(input_features=input_features.to(param.device, param.dtype),
                         decoder_input_ids=decoder_input_ids.to(param.device))
        return out.logits


class TeacherSet:
    """The teachers of one distillation run, and which one teaches each language.

    A teacher whose experts name languages teaches those; a teacher without experts (a plain base) teaches every
    language no other teacher claims; a single teacher given for all languages (``one_for_all``) teaches them all.

    Args:
        teachers: the loaded teachers.
        specs: the spec each was loaded from (for messages and lineage).
        one_for_all: the only teacher teaches every language, whatever its experts' languages.
    """

    def __init__(self, teachers: Sequence[Teacher], specs: Sequence[str], one_for_all: bool = False):
        self.teachers, self.specs = list(teachers), list(specs)
        self._by_language: dict[str, Teacher] = {}
        self._fallback: Teacher | None = None
        if one_for_all:
            if len(self.teachers) != 1:
                raise ValueError(f"one teacher for every language, but {len(self.teachers)} were given")
            self._fallback = self.teachers[0]
            return
        for teacher, spec in zip(self.teachers, self.specs):
            if teacher.languages is None:
                if self._fallback is not None:
                    raise ValueError(f"two teachers without a language ({spec} and another); give each teacher an "
                                     "expert of its language, or use one base as the only teacher")
                self._fallback = teacher
                continue
            for lang in teacher.languages:
                if lang in self._by_language:
                    raise ValueError(f"language {lang} has two teachers (among {', '.join(self.specs)}); keep one")
                self._by_language[lang] = teacher

    def teacher(self, language: str | None) -> Teacher:
        """The teacher of ``language``."""
        teacher = self._by_language.get(language, self._fallback)
        if teacher is None:
            raise KeyError(f"no teacher for language {language!r}: the teachers ({', '.join(self.specs)}) cover "
                           f"{', '.join(sorted(self._by_language))}; add a teacher for it")
        return teacher

    def check_covers(self, languages: Iterable[str]) -> None:
        """Raise a ``ValueError`` naming the languages no teacher teaches."""
        missing = [lang for lang in languages if self._fallback is None and lang not in self._by_language]
        if missing:
            raise ValueError(f"no teacher for {', '.join(missing)}: the teachers ({', '.join(self.specs)}) cover "
                             f"{', '.join(sorted(self._by_language))}")

    @property
    def languages(self) -> list[str]:
        """Languages claimed by a teacher's experts (a set of language experts: the student's default languages)."""
        return list(self._by_language)

    def fingerprint(self, language: str | None) -> str:
        return self.teacher(language).fingerprint(language)

    def identity(self) -> dict:
        """Lineage of the teachers: spec, base and expert identities, and the languages each teaches."""
        rows = []
        for teacher, spec in zip(self.teachers, self.specs):
            taught = [lang for lang, t in self._by_language.items() if t is teacher]
            rows.append({"spec": spec, **teacher.identity(),
                         "teaches": "other languages" if teacher is self._fallback else taught})
        return {"teachers": rows}

    def to(self, device) -> TeacherSet:
        for teacher in self.teachers:
            teacher.model.to(device)
        return self

    @torch.no_grad()
    def logits(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor,
               languages: Sequence[str | None]) -> torch.Tensor:
        """Teacher-forced logits of a batch, each sample scored by its language's teacher.

        Args:
            input_features: (batch, n_mels, frames).
            decoder_input_ids: (batch, positions).
            languages: one Whisper code per sample.
        """
        groups: dict[tuple, tuple[Teacher, str | None, list[int]]] = {}
        for i, lang in enumerate(languages):
            teacher = self.teacher(lang)
            # One call per model, or per language where a model switches adapters by language.
            key = (id(teacher), lang if teacher.adapters else None)
            groups.setdefault(key, (teacher, lang, []))[2].append(i)
        if len(groups) == 1:
            teacher, lang, _ = next(iter(groups.values()))
            return teacher.logits(input_features, decoder_input_ids, lang)
        out = None
        for teacher, lang, rows in groups.values():
            idx = torch.tensor(rows, device=decoder_input_ids.device)
            part = teacher.logits(input_features[idx.to(input_features.device)], decoder_input_ids[idx], lang)
            if out is None:
                out = part.new_empty((len(languages), *part.shape[1:]))
            out[idx.to(out.device)] = part
        return out


def _kind(expert: Expert):
    """The expert's entry in the table of kinds (``lora_experts.kinds``; this package registers ``clsr``)."""
    from distill.clsr.kind import CLSR  # noqa: F401  (registers the clsr entry)
    from lora_experts.kinds import expert_kind

    return expert_kind(expert.kind)


def _apply(teacher: Teacher, expert: Expert, spec: str, sha: str) -> None:
    """Apply one expert to a teacher model as its kind does (see the module docstring); refuses one made for
    another base, and kinds that cannot be applied."""
    from registry.expert_file import check_compatible

    kind = _kind(expert)
    kind.require("apply", f"teacher expert {spec}")
    check_compatible(expert.manifest, teacher.base, what=f"teacher expert {spec}")
    applied = kind.apply(teacher.model, expert, name=f"teacher{len(teacher.experts)}", restorable=False)
    if kind.switchable:
        for lang in expert.languages:
            teacher.adapters[lang] = applied.activate
    else:
        teacher.routes.append(applied.activate)
    teacher.experts.append({"spec": spec, "sha256": sha, "kind": expert.kind, "languages": expert.languages})


def load_teachers(specs: str | Sequence[str], student_base, *, default_base: str | None = None, registry=None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TeacherSet:
    """Load the teachers named by ``specs`` and check them against the student.

    Args:
        specs: one teacher spec (``openai/whisper-large-v2``, ``whisper-base+uk-teacher``), or several: each an
            expert (on ``default_base``) or ``base+expert``; see the module docstring.
        student_base: the student's ``registry.bases.Base``; every teacher must share its tokenizer.
        default_base: base spec for experts named without one (default: the student's base name).
        registry: registry directory for expert specs (default ``<home>/registry``).
        device, dtype: where and in what dtype the teacher weights live.

    Returns:
        A :class:`TeacherSet` of frozen teachers in eval mode.
    """
    from registry.bases import load_base

    single = isinstance(specs, str)
    specs = [specs] if single else [s for s in specs if s.strip()]
    if not specs:
        raise ValueError("no teacher given")
    fallback = None if single else (default_base or student_base.name)
    teachers: list[Teacher] = []
    shared: dict[str, Teacher] = {}  # base spec -> the teacher whose model holds that base's switchable experts
    loaded = []
    for spec in specs:
        base_spec, expert_spec = parse_spec(spec, fallback)
        expert, sha = resolve_expert(expert_spec, registry) if expert_spec else (None, None)
        switchable = expert is not None and _kind(expert).switchable  # LoRA adapters share one model
        teacher = shared.get(base_spec) if switchable else None
        if teacher is None:
            base = load_base(base_spec, device=device, dtype=dtype)
            check_same_tokenizer(base, student_base)
            base.model.requires_grad_(False).eval()
            teacher = Teacher(base.model, base)
            teachers.append(teacher)
            loaded.append(spec)
            if switchable:
                shared[base_spec] = teacher
        else:
            loaded[teachers.index(teacher)] += f",{spec}"
        if expert is not None:
            _apply(teacher, expert, expert_spec, sha)
            teacher.model.requires_grad_(False).eval()
    return TeacherSet(teachers, loaded, one_for_all=single)
