"""Transcription with a pack of experts: audio in, each 30 s window routed to its own expert, transcripts out.

The pipeline, as openai/whisper's ``transcribe`` reads but with fixed windows so every window of every file
can share one batch::

    files / arrays --load_audio--> 16 kHz mono --cut--> 30 s windows (silent ones are not decoded)
        --batch (windows of all files)--> log-mel --encoder (base model, once)--> language ID (first decoder step)
        --routing policy--> expert per window --generate (one call, ExpertBank routing)--> tokens
        --assemble--> per file: text, language, expert, segments

Language ID runs on the base model. When no expert routed in a batch adapts the encoder, ``generate`` reuses
the encoder output of the language-ID pass instead of running the encoder again.

    whisper = ExpertWhisper.from_pack("whisper-base", "packs/eu3.safetensors")
    for t in whisper.transcribe(["a.wav", "b.mp3"], language="auto"):
        print(t.file, t.language, t.expert, t.text)

Windows are at most 30 s. By default (``cut="quiet"``) each window that is not the last ends at the quietest
100 ms of its last 5 s, so a pause, not a word, is split between two windows; ``cut="fixed"`` cuts every 30 s
(a word on a boundary may be split). With ``timestamps`` the segments inside a window come from Whisper's
timestamp tokens, else each window is one segment.

A server decodes windows of many requests together: :func:`cut_windows` cuts one input, each window may carry
its own :class:`~inference.window_routing.Route` (expert and language chosen per request), and
:meth:`ExpertWhisper.decode_windows` decodes any such mix, one ``generate`` call per batch; a window's
transcript does not depend on the other windows of its batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from inference.audio import SAMPLE_RATE, AudioError, EmptyAudioError, is_silent, load_audio
from inference.bank import ExpertBank, expert_bank
from inference.batched_layer import BASE_ONLY
from inference.decoding import RepetitionGuard, cut_loop, duration_bound, log_mel
from inference.packs import load_pack
from inference.router import LearnedRouter, audio_frames
from inference.routing import LearnedRouting
from inference.window_routing import FROM_LANGUAGE, Route, route_windows
from registry.bases import Base, load_base

WINDOW_SECONDS = 30  # Whisper's context
CUTS = ("quiet", "fixed")  # how long audio is cut into windows (see cut_windows)
CUT_SEARCH_SECONDS = 5.0  # "quiet": a window ends in the quietest frame of its last this many seconds
CUT_FRAME = SAMPLE_RATE // 10  # 100 ms frames
TIME_PRECISION = 0.02  # seconds per timestamp token step


@dataclass(frozen=True)
class TranscribeOptions:
    """How audio is transcribed. Frozen: derive variants with ``dataclasses.replace``."""

    language: str | tuple[str, ...] = "auto"  # "auto": language ID per window; a code; or one code per input
    batch_size: int = 16  # windows per generate() call
    threshold: float = 0.5  # language ID: below this probability the base model serves the window
    candidates: tuple[str, ...] | None = None  # language ID chooses among these codes (None: every language)
    timestamps: bool = False  # segments from Whisper's timestamp tokens (else one segment per window)
    task: str = "transcribe"  # or "translate"
    num_beams: int = 1  # 1 = greedy
    max_new_tokens: int | None = None  # per window; None: 8 tokens per second of audio + 16
    silence_db: float = -60.0  # windows quieter than this RMS level (dBFS) are not decoded
    cut: str = "quiet"  # "quiet": windows end at the quietest 100 ms near 30 s; "fixed": every 30 s
    repetition_guard: bool = True  # stop repetition loops and keep one copy (inference.decoding)
    progress: bool = True  # a progress bar over windows
    router: Any = None  # a learned router (file or LearnedRouter): with "auto" it routes instead of language ID
    on_error: str = "raise"  # an unreadable input: "raise" AudioError, or "record" it in its transcript's error


@dataclass
class Segment:
    """A stretch of one file: seconds from the file's start, its text, and who decoded it."""

    start: float
    end: float
    text: str
    language: str | None = None
    language_probability: float | None = None
    expert: str | None = None  # None: the base model
    seek: float | None = None  # where the window it was decoded in starts, seconds from the file's start


@dataclass
class Transcript:
    """One input's result (``as_dict`` gives the JSON record).

    Attributes:
        language: the detected language (weighted by window duration) or the given one.
        language_probability: its language-ID probability (None when the language was given).
        expert: the expert that decoded most of the audio (None: the base model).
        note: why nothing was decoded (empty or silent audio), else None.
        error: why the input could not be read (with ``on_error="record"``), else None.
    """

    file: str
    text: str
    language: str | None
    language_probability: float | None
    expert: str | None
    duration: float
    segments: list[Segment] = field(default_factory=list)
    note: str | None = None
    error: str | None = None

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("file", "text", "language", "language_probability", "expert")}
        d["duration"] = round(self.duration, 3)
        d["segments"] = [dataclasses.asdict(s) for s in self.segments]
        if self.note:
            d["note"] = self.note
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class Window:
    """Up to 30 s of one input, decoded as one row of a batch; ``segments`` are filled by decoding."""

    item: int  # index of the input it comes from
    start: float  # seconds from the input's start
    audio: np.ndarray
    segments: list[Segment] = field(default_factory=list)
    posterior: tuple[list[str], np.ndarray] | None = None  # language ID: (codes, probabilities)
    route: Route | None = None  # the caller's routing of this window (None: the options' language)

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def window_starts(audio: np.ndarray, cut: str = "quiet") -> list[int]:
    """Sample offsets where the windows of ``audio`` start; every window is at most 30 s.

    ``"fixed"``: every 30 s. ``"quiet"``: a window longer audio follows ends in the quietest 100 ms frame of
    its last 5 s (the latest such frame when several are as quiet, within half a decibel), cut in its middle.
    """
    if cut not in CUTS:
        raise ValueError(f"cut must be one of {', '.join(CUTS)}, got {cut!r}")
    step = WINDOW_SECONDS * SAMPLE_RATE
    if cut == "fixed":
        return list(range(0, len(audio), step))
    search = int(CUT_SEARCH_SECONDS * SAMPLE_RATE)
    starts, start = [], 0
    while start < len(audio):
        starts.append(start)
        if len(audio) - start <= step:
            break
        low = start + step - search
        frames = np.asarray(audio[low:low + search // CUT_FRAME * CUT_FRAME], np.float64).reshape(-1, CUT_FRAME)
        energy = (frames ** 2).mean(axis=1)
        quietest = int(np.flatnonzero(energy <= energy.min() * 1.12 + 1e-12)[-1])  # 1.12: half a decibel
        start = low + quietest * CUT_FRAME + CUT_FRAME // 2
    return starts


def cut_windows(audio: np.ndarray, item: int = 0, silence_db: float = -60.0,
                route: Route | None = None, cut: str = "quiet") -> tuple[list[Window], str | None]:
    """Cut 16 kHz audio into windows of at most 30 s (:func:`window_starts`), leaving out silent ones.

    Returns:
        (the audible windows, a note when the audio is not empty but every window is silent, else None).
    """
    starts = window_starts(audio, cut)
    ends = starts[1:] + [len(audio)]
    windows = [Window(item, s / SAMPLE_RATE, audio[s:e], route=route) for s, e in zip(starts, ends)]
    audible = [w for w in windows if not is_silent(w.audio, silence_db)]
    if windows and not audible:
        return [], f"silent audio (below {silence_db:g} dBFS), nothing to transcribe"
    return audible, None


class RowLimit(LogitsProcessor):
    """Force end-of-text on each row once it has ``limits[sample]`` new tokens, so a window's transcript does
    not depend on the other windows of its batch (``generate`` takes one length bound for all rows)."""

    def __init__(self, eos_token_id: int, limits: Sequence[int], num_beams: int = 1):
        self.eos, self.limits, self.num_beams = eos_token_id, list(limits), num_beams
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        generated = input_ids.shape[1] - self.prompt_length
        for row in range(input_ids.shape[0]):
            if generated >= self.limits[row // self.num_beams]:
                scores[row] = torch.finfo(scores.dtype).min
                scores[row, self.eos] = 0.0
        return scores


def _input_name(source: Any, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<input {index}>"


def _segments(tokens: Sequence[int], tokenizer, eos: int, timestamp_begin: int | None, start: float,
              length: float) -> list[Segment]:
    """Split a window's tokens at timestamp tokens (``<|t0|> text <|t1|>``); times offset by ``start`` and
    clipped to the window. Without timestamp tokens the window is one segment."""
    spans: list[tuple[float, float, list[int]]] = []
    opened, last, text = None, 0.0, []
    for tok in tokens:
        if timestamp_begin is not None and tok >= timestamp_begin:
            t = min((tok - timestamp_begin) * TIME_PRECISION, length)
            if opened is None and not text:
                opened = t
            else:  # a closing timestamp (text before it) ends the segment
                spans.append((last if opened is None else opened, t, text))
                opened, last, text = None, t, []
        elif tok < eos:
            text.append(tok)
    if text:
        spans.append((last if opened is None else opened, length, text))
    out = []
    for s, e, toks in spans:
        words = tokenizer.decode(toks, skip_special_tokens=True).strip()
        if words:
            out.append(Segment(round(start + s, 3), round(start + max(s, e), 3), words, seek=round(start, 3)))
    return out or [Segment(round(start, 3), round(start + length, 3), "", seek=round(start, 3))]


def set_clsr_gates(model: torch.nn.Module, mode: str) -> None:
    """Make every CLSR expert of ``model`` use its gates ``mode``-wise at inference (``hard`` or ``soft``, see
    :func:`distill.clsr.set_gate_mode`), overriding what the experts record; nothing to do without CLSR experts."""
    from distill.clsr import check_gate_mode, is_clsr, set_gate_mode

    check_gate_mode(mode)  # refused even where no CLSR expert would use it
    if is_clsr(model):
        set_gate_mode(model, mode)


class ExpertWhisper:
    """A base Whisper with a bank of experts, transcribing files or arrays (see the module docstring).

    Args:
        base: the loaded base (``registry.bases.Base``); its model carries the bank.
        bank: the experts attached to ``base.model`` (empty: the base model alone).
    """

    def __init__(self, base: Base, bank: ExpertBank | None = None):
        self.base = base
        self.bank = bank if bank is not None else expert_bank(base.model)
        self.base.model.eval()

    def __repr__(self) -> str:
        return f"ExpertWhisper({self.base.name}, experts: {', '.join(self.bank.names) or 'none'})"

    @classmethod
    def from_pack(cls, base: str | Base = "whisper-base", pack: str | os.PathLike | Sequence | None = None, *,
                  names: Sequence[str] | None = None, force: bool = False, device: str | None = None,
                  dtype: torch.dtype = torch.float32, clsr_gates: str | None = None) -> "ExpertWhisper":
        """Load a base (name, directory, hub id, or a loaded ``Base``) and attach the experts of ``pack``.

        Args:
            pack: a pack file, several, or None (the base model alone).
            names: attach only these experts of the pack(s).
            force: attach experts trained on other weights of the same architecture and tokenizer.
            device, dtype: where and how to load the base (default: CUDA when available, float32).
            clsr_gates: ``hard`` or ``soft``: how inference uses every CLSR expert's gates
                (:func:`distill.clsr.set_gate_mode`); default: as each expert records (``gate_inference``).
        """
        if not isinstance(base, Base):
            base = load_base(base, device=device, dtype=dtype)
        packs = [] if pack is None else [pack] if isinstance(pack, (str, os.PathLike)) else list(pack)
        for path in packs:
            load_pack(base, Path(path), names=names, force=force)
        if clsr_gates is not None:
            set_clsr_gates(base.model, clsr_gates)
        return cls(base, expert_bank(base.model))

    # ------------------------------------------------------------------------------------------ checks
    def check_language(self, code: str, what: str = "language") -> None:
        """Refuse a code this base has no language token for, listing the ones it has."""
        known = self.base.languages
        if not self.base.multilingual:
            if code != "en":
                raise ValueError(f"{self.base.name} is an English-only Whisper; {what} {code!r} is not possible")
        elif code not in known:
            raise ValueError(f"unknown {what} {code!r} for {self.base.name}; Whisper language codes are: "
                             f"{', '.join(sorted(known))}")

    def resolve_options(self, language: str | Sequence[str] | None = None, options: TranscribeOptions | None = None,
                        **overrides) -> TranscribeOptions:
        """``options`` with ``language`` and ``overrides`` applied, checked against this base and bank (a
        router file is loaded); what :meth:`transcribe` does first, for callers of :meth:`decode_windows`."""
        return self._options(language, options, overrides)

    def _options(self, language, options, overrides) -> TranscribeOptions:
        opts = options or TranscribeOptions()
        if language is not None:
            overrides["language"] = language if isinstance(language, str) else tuple(language)
        if overrides.get("candidates") is not None:
            overrides["candidates"] = tuple(overrides["candidates"])
        opts = dataclasses.replace(opts, **overrides)
        codes = [opts.language] if isinstance(opts.language, str) else list(opts.language)
        if len(codes) > 1 and "auto" in codes:
            raise ValueError("language='auto' detects every input's language; with one code per input, give codes "
                             "only")
        for code in codes:
            if code != "auto":
                self.check_language(code)
        for code in opts.candidates or ():
            self.check_language(code, "language-ID candidate")
        if opts.batch_size < 1 or opts.num_beams < 1:
            raise ValueError("batch_size and num_beams must be at least 1")
        if opts.cut not in CUTS:
            raise ValueError(f"cut must be one of {', '.join(CUTS)}, got {opts.cut!r}")
        if opts.timestamps and getattr(self.base.model.generation_config, "no_timestamps_token_id", None) is None:
            raise ValueError(f"{self.base.name} has no timestamp tokens; transcribe without timestamps")
        if opts.router is not None:
            router = opts.router if isinstance(opts.router, LearnedRouter) else LearnedRouter.load(opts.router)
            LearnedRouting(self.bank, router)  # refuses a router trained for other experts, before any decoding
            opts = dataclasses.replace(opts, router=router)
        return opts

    # ------------------------------------------------------------------------------------------ transcribe
    def transcribe(self, inputs, language: str | Sequence[str] | None = None, options: TranscribeOptions | None = None,
                   **overrides) -> list[Transcript]:
        """Transcribe files or arrays; one :class:`Transcript` per input, in input order.

        Args:
            inputs: a path (wav, flac, ogg, mp3: anything libsndfile reads) or a float array at 16 kHz, or a
                list of them (``datasets`` audio dicts work too).
            language: ``"auto"`` (language ID per window routes it; the default), a Whisper code for all, or one
                code per input. Overrides ``options.language``.
            options: defaults for everything else; ``overrides`` replace single fields
                (``transcribe(files, batch_size=4, timestamps=True)``).

        Raises:
            ValueError: an unknown language code (the message lists the known ones), bad options.
            inference.audio.AudioError: a missing, corrupt or unreadable input (empty inputs are reported in
                the transcript's ``note`` instead); with ``on_error="record"`` the input's transcript carries
                the message in ``error`` and the other inputs are transcribed.
        """
        single = isinstance(inputs, (str, os.PathLike, dict)) or (isinstance(inputs, np.ndarray) and inputs.ndim == 1)
        items = [inputs] if single else list(inputs)
        opts = self._options(language, options, overrides)
        if not isinstance(opts.language, str) and len(opts.language) != len(items):
            raise ValueError(f"{len(opts.language)} languages for {len(items)} inputs: give one per input, or one "
                             "code (or 'auto') for all")
        if opts.on_error not in ("raise", "record"):
            raise ValueError(f"on_error must be 'raise' or 'record', got {opts.on_error!r}")
        audios, notes, errors, windows = [], {}, {}, []
        for i, source in enumerate(items):
            try:
                audio = load_audio(source)
            except EmptyAudioError as e:
                audio, notes[i] = np.zeros(0, np.float32), f"empty audio, nothing to transcribe ({e})"
            except AudioError as e:
                if opts.on_error == "raise":
                    raise
                audio, errors[i] = np.zeros(0, np.float32), str(e)
            audios.append(audio)
            audible, note = cut_windows(audio, i, opts.silence_db, cut=opts.cut)
            if note:
                notes[i] = note
            windows += audible
        bar = tqdm(total=len(windows), desc="transcribing", unit="window", disable=not opts.progress or not windows)
        for start in range(0, len(windows), opts.batch_size):
            batch = windows[start:start + opts.batch_size]
            self._decode(batch, opts)
            bar.update(len(batch))
        bar.close()
        out = [self._assemble(_input_name(src, i), audios[i], [w for w in windows if w.item == i], notes.get(i))
               for i, src in enumerate(items)]
        for i, message in errors.items():
            out[i].error = message
        return out

    def decode_windows(self, windows: Sequence[Window], options: TranscribeOptions) -> None:
        """Route and decode windows (of any inputs, each with its own :class:`Route` or the options' language),
        ``options.batch_size`` per ``generate`` call; fills each window's ``segments`` (and ``posterior`` when
        its language was detected). ``options`` should come from :meth:`resolve_options`."""
        for start in range(0, len(windows), options.batch_size):
            self._decode(list(windows[start:start + options.batch_size]), options)

    def _routes(self, batch: list[Window], opts: TranscribeOptions) -> list[Route]:
        """Each window's route: its own, else the language the options give its input (its expert serves it)."""
        codes = opts.language if not isinstance(opts.language, str) else None
        return [w.route if w.route is not None else Route(codes[w.item] if codes else opts.language, FROM_LANGUAGE)
                for w in batch]

    @torch.inference_mode()
    def _decode(self, batch: list[Window], opts: TranscribeOptions) -> None:
        """Route and decode one batch of windows in one ``generate`` call; fills their segments."""
        model, tokenizer = self.base.model, self.base.processor.tokenizer
        features = log_mel(self.base.processor, [w.audio for w in batch], model)
        routes = self._routes(batch, opts)
        encoder_states = None
        if any(r.language == "auto" for r in routes):  # language ID needs the base model's encoder output;
            with self.bank.route(None):                 # generate may reuse it
                encoder_states = model.get_encoder()(features).last_hidden_state
        # Each window by its route: the caller's language, language ID, or the learned router (opts.router).
        decision, posteriors = route_windows(self.bank, routes, encoder_states, multilingual=self.base.multilingual,
                                             threshold=opts.threshold, candidates=opts.candidates, router=opts.router,
                                             frames=audio_frames([w.seconds for w in batch]))
        routed = {int(e) for e in decision.experts[decision.weights > 0].tolist() if e != BASE_ONLY}
        if self._encoder_adapted(routed):
            encoder_states = None  # the routed experts change the encoder: generate runs it under routing

        gc = model.generation_config
        eos = gc.eos_token_id[0] if isinstance(gc.eos_token_id, (list, tuple)) else gc.eos_token_id
        cap = model.config.max_target_positions - 4
        limits = [min(opts.max_new_tokens, cap) if opts.max_new_tokens else duration_bound(w.seconds, cap)
                  for w in batch]
        processors = [RowLimit(eos, limits, opts.num_beams)]
        guard = RepetitionGuard(eos, num_beams=opts.num_beams) if opts.repetition_guard else None
        if guard is not None:
            processors.append(guard)
        kwargs = dict(max_new_tokens=max(limits), num_beams=opts.num_beams, do_sample=False,
                      logits_processor=LogitsProcessorList(processors), return_timestamps=opts.timestamps,
                      force_unique_generate_call=True, return_dict_in_generate=True)
        if self.base.multilingual:
            kwargs.update(language=list(decision.languages), task=opts.task)
        with self.bank.route(decision):
            if encoder_states is not None:
                out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states), **kwargs)
            else:
                out = model.generate(features, **kwargs)
        timestamp_begin = gc.no_timestamps_token_id + 1 if opts.timestamps else None
        for n, (w, seq) in enumerate(zip(batch, out.sequences.tolist())):
            if guard is not None and n in guard.fired:
                seq = cut_loop([t for t in seq if t != eos])
            w.segments = _segments(seq, tokenizer, eos, timestamp_begin, w.start, w.seconds)
            for s in w.segments:
                probability = decision.probabilities[n]
                s.language = decision.languages[n]
                s.language_probability = None if probability is None else round(probability, 4)
                s.expert = decision.names[n]
            w.posterior = posteriors[n]

    def _encoder_adapted(self, expert_ids) -> bool:
        """Whether any of these experts adapts an encoder module."""
        return any(m.startswith("model.encoder.") for i in expert_ids for m in self.bank.experts[i].modules)

    @staticmethod
    def _assemble(name: str, audio: np.ndarray, windows: list[Window], note: str | None) -> Transcript:
        return ExpertWhisper.assemble(name, len(audio) / SAMPLE_RATE, windows, note)

    @staticmethod
    def assemble(name: str, duration: float, windows: list[Window], note: str | None = None) -> Transcript:
        """One input's :class:`Transcript` from its decoded windows (in order) and its duration in seconds:
        the text joins the segments; language and expert are those of most of the audio."""
        if not windows:
            return Transcript(name, "", None, None, None, duration, [], note)
        segments = [s for w in windows for s in w.segments]
        text = " ".join(s.text for s in segments if s.text)
        weights = [w.seconds for w in windows]
        if windows[0].posterior is not None:  # language ID: the duration-weighted posterior decides the file
            codes = windows[0].posterior[0]
            mix = sum(wt * w.posterior[1] for wt, w in zip(weights, windows)) / sum(weights)
            best = int(np.argmax(mix))
            language, probability = codes[best], round(float(mix[best]), 4)
        else:
            language, probability = windows[0].segments[0].language, None
        served = Counter()
        for wt, w in zip(weights, windows):
            served[w.segments[0].expert] += wt
        return Transcript(name, text, language, probability, served.most_common(1)[0][0], duration, segments, note)
