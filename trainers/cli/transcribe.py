"""``whisper-experts transcribe``: audio files in, each 30 s window routed to its language's expert, transcripts out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainers.cli.common import add_clsr_gates_argument, split_list

DESCRIPTION = """\
Transcribe audio and video files with a base Whisper and a pack of experts (whisper-experts pack create). Inputs are
read with libsndfile (wav, flac, ogg/opus, mp3) or PyAV/FFmpeg (m4a, aac, webm, mp4 video, ...), mixed down to
mono and resampled to 16 kHz (a file that cannot be read gets an error entry, the others are still
transcribed, and the exit code is 1); long audio is cut
into windows of at most 30 s, each ending in the quietest 100 ms of its last 5 s (--cut fixed: every 30 s), and
the windows of all files are decoded together in batches. Each window is routed to
its own expert in the same forward pass:
  --language auto   Whisper's language ID (first decoder step, on the base model) picks the window's language
                    and that language's expert; below --threshold, or for a language with no expert in the
                    pack, the base model decodes it (still with the detected language token)
  --language auto --router R
                    a learned router (whisper-experts router train) picks the window's expert and language
                    from the base model's encoder output, instead of language ID (--threshold and --candidates
                    then do not apply)
  --language uk     every window is Ukrainian and uses the pack's uk expert
Silent windows (below -60 dBFS) are not decoded, and empty or silent files are reported, not transcribed.

output (--format):
  text   per file a line "FILE  [LANGUAGE PROBABILITY -> expert NAME]" and its transcript (default)
  json   one record per input file, in input order: file, text, language, language_probability, expert
         (null: the base model), duration, segments
  srt    SubRip subtitles; vtt: WebVTT subtitles (both imply --timestamps). With several inputs, --out is a
         directory that gets one FILE-STEM.srt / .vtt per input
--timestamps takes segment times from Whisper's timestamp tokens (else each window is one segment).

examples:
  whisper-experts transcribe talk.wav --pack packs/eu3.safetensors
  whisper-experts transcribe a.mp3 b.flac c.ogg --pack packs/eu3.safetensors --format json --out out.json
  whisper-experts transcribe lecture.wav --pack packs/eu3.safetensors --language uk --format srt --out lecture.srt
  whisper-experts transcribe *.wav --pack packs/eu3.safetensors --format vtt --out subtitles/
  whisper-experts transcribe *.wav --pack packs/eu3.safetensors --candidates uk,pt,nl,de   # LID among these only
  whisper-experts transcribe *.wav --pack packs/eu3.safetensors --router packs/eu3-router.safetensors
  whisper-experts transcribe clip.wav --base whisper-base        # no pack: the base model alone
"""


def _base_spec(args) -> str:
    """--base, else the base the (first) pack was made for, else whisper-base."""
    from registry.packs import base_of_packs

    return base_of_packs(args.base, args.pack)


def _subtitle_paths(transcripts, out: Path | None, fmt: str) -> list[Path | None]:
    """Where each input's subtitles go: --out itself for one input, else files in the --out directory."""
    if len(transcripts) == 1:
        return [out]
    if out is None or (out.exists() and not out.is_dir()) or out.suffix.lower() == f".{fmt}":
        raise ValueError(f"{len(transcripts)} inputs give {len(transcripts)} {fmt} files: pass --out DIRECTORY")
    paths, used = [], set()
    for t in transcripts:
        stem = Path(t.file).stem or "input"
        path, n = out / f"{stem}.{fmt}", 1
        while path in used:
            n += 1
            path = out / f"{stem}-{n}.{fmt}"
        used.add(path)
        paths.append(path)
    return paths


def _write(text: str, path: Path | None) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    from registry.atomic import atomic_write_text

    atomic_write_text(path, text)
    print(f"wrote {path}", file=sys.stderr)


def _run(args) -> int:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    from inference.transcribe import ExpertWhisper, TranscribeOptions
    from inference.transcript_formats import SUBTITLE_FORMATS, render

    for code in ([args.language] if args.language != "auto" else []) + (split_list(args.candidates) or []):
        if code not in LANGUAGES:  # refused before any model is loaded
            raise ValueError(f"unknown language {code!r}; Whisper language codes are: {', '.join(sorted(LANGUAGES))}")
    timestamps = args.timestamps or args.format in SUBTITLE_FORMATS
    options = TranscribeOptions(batch_size=args.batch_size, threshold=args.threshold,
                                candidates=tuple(split_list(args.candidates) or ()) or None, timestamps=timestamps,
                                task=args.task, num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                                progress=not args.no_progress, router=args.router, on_error="record", cut=args.cut)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir() and args.format not in SUBTITLE_FORMATS:
        raise ValueError(f"--out {out} is a directory; name a file for --format {args.format}")
    whisper = ExpertWhisper.from_pack(_base_spec(args), args.pack, names=split_list(args.experts), force=args.force,
                                      device=args.device, clsr_gates=args.clsr_gates)
    if args.language != "auto":
        whisper.check_language(args.language)
        if args.router:
            print(f"note: --language {args.language} is given, so the router is not used", file=sys.stderr)
        if args.language not in whisper.bank.expert_for_language():
            print(f"note: no expert for {args.language!r} in the pack ({', '.join(whisper.bank.names) or 'none'}); "
                  "the base model transcribes it", file=sys.stderr)
    transcripts = whisper.transcribe(args.audio, language=args.language, options=options)
    for t in transcripts:
        if t.note:
            print(f"note: {t.file}: {t.note}", file=sys.stderr)
    if args.format in SUBTITLE_FORMATS:
        for t, path in zip(transcripts, _subtitle_paths(transcripts, out, args.format)):
            if not t.error:
                _write(render([t], args.format), path)
    else:
        _write(render(transcripts, args.format), out)
    failed = [t for t in transcripts if t.error]
    for t in failed:
        print(f"error: {t.error}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(transcripts)} input(s) could not be read; the others were transcribed",
              file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("transcribe", help="transcribe audio files, each utterance routed to its expert",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3, ...)")
    p.add_argument("--pack", action="append", metavar="FILE",
                   help="expert pack (.safetensors); repeat to load several; none: the base model alone")
    p.add_argument("--base", help="base model: name, directory or hub id (default: the pack's base, else "
                                  "whisper-base)")
    p.add_argument("--experts", help="load only these experts of the pack (comma-separated names)")
    p.add_argument("--language", default="auto",
                   help="'auto' (language ID per 30 s window; default) or a Whisper code for all inputs")
    p.add_argument("--candidates", help="language ID chooses among these codes only (comma-separated)")
    p.add_argument("--router", metavar="FILE",
                   help="learned router for --language auto (whisper-experts router train), instead of language ID")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="language-ID probability below which the base model decodes a window (default 0.5)")
    p.add_argument("--format", choices=["text", "json", "srt", "vtt"], default="text", help="output (default text)")
    p.add_argument("--timestamps", action="store_true", help="segment times from Whisper's timestamp tokens")
    p.add_argument("--out", help="write here instead of stdout (a directory for srt/vtt of several inputs)")
    p.add_argument("--batch-size", type=int, default=16, help="30 s windows per decoding batch (default 16)")
    p.add_argument("--cut", choices=["quiet", "fixed"], default="quiet",
                   help="how audio longer than 30 s is cut into windows: 'quiet' (default) ends each window at the "
                        "quietest 100 ms of its last 5 s, so pauses rather than words are split; 'fixed' every 30 s")
    p.add_argument("--beams", type=int, default=1, help="beam size (default 1: greedy)")
    p.add_argument("--max-new-tokens", type=int, help="token limit per window (default: 8 per second of audio + 16)")
    p.add_argument("--task", choices=["transcribe", "translate"], default="transcribe",
                   help="transcribe (default) or translate into English")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--force", action="store_true",
                   help="attach experts trained on other weights of the same architecture and tokenizer")
    add_clsr_gates_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
