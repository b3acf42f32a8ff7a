"""Transcription speed against faster-whisper on the same audio, in one run.

    python benchmarks/transcribe_speed.py --expert cs=runs/real/cs-enc3-all/expert.safetensors \\
        --expert nl=runs/real/nl-enc3-all/expert.safetensors

The audio: ``--files`` files per language of about ``--seconds`` seconds each, made by joining held-out real
clips of the Fish Fillets corpus (``--data``) with half a second of silence between them, so both systems see
several 30 s windows per file. Every variant decodes greedily, without timestamps, each window on its own
(faster-whisper: ``beam_size=1``, ``temperature=0``, ``condition_on_previous_text=False``,
``without_timestamps=True``, no VAD), language given unless said otherwise:

- **faster-whisper int8**: the first expert merged into the base and exported to CTranslate2 int8
  (``whisper-experts registry export --format ct2``), ``WhisperModel.transcribe`` file by file, as people run it;
- **ours, one language**: ``ExpertWhisper`` with a pack of the experts, the same files, language given, one
  batched call (``--batch-size`` windows per ``generate``), in each ``--dtypes`` precision;
- **ours, mixed**: every language's files in one call with ``--language auto`` (language ID per window picks
  each window's expert; windows of different languages share batches). faster-whisper cannot route, so its
  side of this row is its one-language time summed over the languages, each with its own merged export.

Wall seconds (median of ``--repeats`` after a warm-up), audio seconds per wall second, ours / faster-whisper,
and the WER of each output against the joined references (a check that both transcribe the same thing, not a
quality benchmark). Goal (issue: serve expert packs): ours at most 2x faster-whisper's time on the CPU for one
language. Writes ``benchmarks/results/transcribe_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from benchmarks.command import recorded  # noqa: E402

SILENCE = 0.5  # seconds between joined clips


def joined_audio(data: str, language: str, files: int, seconds: float, out: Path) -> list[tuple[Path, str, float]]:
    """``files`` wav files of about ``seconds`` each from the test split's clips of ``language`` (in order);
    returns (path, joined reference, audio seconds) per file."""
    import numpy as np
    import soundfile as sf

    from inference.evaluation import utterances_from_dataset
    from trainers.corpus.loading import load_corpus

    utts = utterances_from_dataset(load_corpus(data)["test"], [language])
    out.mkdir(parents=True, exist_ok=True)
    made, pos = [], 0
    gap = np.zeros(int(16000 * SILENCE), dtype=np.float32)
    for k in range(files):
        parts, texts, total = [], [], 0.0
        while total < seconds and pos < len(utts):
            u = utts[pos]
            pos += 1
            parts += [u.audio.astype(np.float32), gap]
            texts.append(u.text)
            total += u.seconds + SILENCE
        if not parts:
            break
        path = out / f"{language}-{k:02d}.wav"
        sf.write(path, np.concatenate(parts), 16000, subtype="PCM_16")
        made.append((path, " ".join(texts), total))
    return made


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``repeats`` calls after one warm-up call; the last call's result."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def wer(refs: list[str], hyps: list[str]) -> float:
    from inference.evaluation import error_rates

    return error_rates(refs, hyps)["wer"]


def run(args) -> dict:
    import torch

    from inference.transcribe import ExpertWhisper
    from lora_experts.export import export_ct2_expert
    from registry.bases import load_base
    from registry.expert_file import load_expert
    from registry.packs import create_pack

    torch.set_num_threads(args.threads)
    work = Path(args.runs)
    experts = dict(spec.split("=", 1) for spec in args.expert)
    languages = list(experts)
    audio = {lang: joined_audio(args.data, lang, args.files, args.seconds, work / "audio") for lang in languages}
    pack = work / "pack.safetensors"
    create_pack(pack, {f"{lang}-expert": load_expert(path) for lang, path in experts.items()})

    from faster_whisper import WhisperModel

    rows, fw_total = [], {}
    for lang in languages:
        ct2 = work / f"ct2-{lang}-int8"
        if not (ct2 / "model.bin").is_file():
            export_ct2_expert(load_expert(experts[lang]), ct2, f"{lang}-expert", quantization="int8")
        model = WhisperModel(str(ct2), device="cpu", compute_type="int8", cpu_threads=args.threads)

        def fw(model=model, lang=lang):
            texts = []
            for path, _, _ in audio[lang]:
                segments, _ = model.transcribe(str(path), language=lang, beam_size=1, temperature=0.0,
                                               condition_on_previous_text=False, without_timestamps=True,
                                               vad_filter=False)
                texts.append(" ".join(s.text.strip() for s in segments))
            return texts

        seconds, texts = timed(fw, args.repeats)
        fw_total[lang] = seconds
        refs = [r for _, r, _ in audio[lang]]
        rows.append({"variant": "faster-whisper int8, merged export", "language": lang, "seconds": seconds,
                     "audio_seconds": sum(s for _, _, s in audio[lang]), "wer": wer(refs, texts)})
        del model

    base_name = load_expert(experts[languages[0]]).manifest["base"].get("name") or "whisper-base"
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        whisper = ExpertWhisper.from_pack(load_base(base_name, device="cpu", dtype=dtype), pack)
        for lang in languages:
            files = [str(p) for p, _, _ in audio[lang]]
            seconds, ts = timed(lambda: whisper.transcribe(files, language=lang, batch_size=args.batch_size,
                                                           progress=False), args.repeats)
            refs = [r for _, r, _ in audio[lang]]
            rows.append({"variant": f"ours, pack, language given, {dtype_name}", "language": lang,
                         "seconds": seconds, "audio_seconds": sum(s for _, _, s in audio[lang]),
                         "wer": wer(refs, [t.text for t in ts]), "vs_faster_whisper": seconds / fw_total[lang]})
        if len(languages) > 1:
            files = [str(p) for lang in languages for p, _, _ in audio[lang]]
            refs = [r for lang in languages for _, r, _ in audio[lang]]
            seconds, ts = timed(lambda: whisper.transcribe(files, language="auto", candidates=tuple(languages),
                                                           batch_size=args.batch_size, progress=False), args.repeats)
            rows.append({"variant": f"ours, pack, mixed languages routed by language ID, {dtype_name}",
                         "language": "+".join(languages), "seconds": seconds,
                         "audio_seconds": sum(s for lang in languages for _, _, s in audio[lang]),
                         "wer": wer(refs, [t.text for t in ts]),
                         "vs_faster_whisper": seconds / sum(fw_total.values())})
    return {"rows": rows, "experts": experts, "threads": args.threads, "batch_size": args.batch_size,
            "repeats": args.repeats, "files": args.files, "seconds_per_file": args.seconds}


def markdown(result: dict, command: str, machine: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| variant | language | audio s | wall s | audio s per wall s | ours / faster-whisper | WER % (check) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['vs_faster_whisper']:.2f}x" if "vs_faster_whisper" in r else ""
        lines.append(f"| {r['variant']} | {r['language']} | {r['audio_seconds']:.0f} | {r['seconds']:.1f} | "
                     f"{r['audio_seconds'] / r['seconds']:.1f} | {ratio} | {100 * r['wer']:.1f} |")
    lines += ["", f"{result['files']} files per language of about {result['seconds_per_file']:.0f} s (held-out real "
              f"clips joined); greedy, no timestamps, windows decoded independently; {result['threads']} threads; "
              f"our batch {result['batch_size']} windows; median of {result['repeats']} after a warm-up. The mixed "
              "row's faster-whisper side is the sum of its one-language times (it cannot route). Machine: "
              f"{machine}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expert", action="append", required=True, metavar="LANG=FILE",
                   help="a LoRA expert and the language of its test audio (repeat for the mixed row)")
    p.add_argument("--data", default="data/fillets", help="the real corpus (whisper-experts corpus fetch fillets)")
    p.add_argument("--files", type=int, default=3, help="files per language (default 3)")
    p.add_argument("--seconds", type=float, default=90, help="about this much audio per file (default 90)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="our precisions (default float32,bfloat16)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--runs", default="runs/transcribe_speed")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    from real_speech import machine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = recorded(Path(__file__).name, argv, drop=("--table-only",))
    if args.table_only:
        result = json.loads((out / "transcribe_speed.json").read_text())
    else:
        result = run(args)
        result["machine"], result["command"] = machine(), command
        (out / "transcribe_speed.json").write_text(json.dumps(result, indent=1))
    (out / "transcribe_speed.md").write_text(markdown(result, result.get("command", command),
                                                      result.get("machine", machine())))
    print((out / "transcribe_speed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
