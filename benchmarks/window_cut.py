"""Where long audio is cut into windows: at the quietest 100 ms near 30 s (``transcribe``'s default) against every
30 s, on real recorded speech joined into long files.

    python benchmarks/window_cut.py                                   # cs,nl test clips, whisper-base; ~15 min
    python benchmarks/window_cut.py --languages cs --seconds 120 --pack packs/real.safetensors
    python benchmarks/window_cut.py --table-only                      # rewrite the table from the JSON

Each language's held-out test clips (``--data``, the Fish Fillets corpus) are joined in order, back to back
(``--gap`` seconds of digital silence between them; default 0: only the recordings' own pauses), into files of
about ``--seconds``. Every file is transcribed twice with the same model, language given, greedy: ``--cut
quiet`` and ``--cut fixed``; the joined references score both. A fixed cut splits whatever is being said at
30 s, 60 s, ...; the quiet cut moves each boundary back to the quietest 100 ms of the window's last 5 s.

Rows: per language and pooled, the WER of each cut with its 95% bootstrap interval over files, and the quiet
cut's change against the fixed cut (paired bootstrap over the same files). Also the audio level where each
cut falls (RMS of the 100 ms around it): what the quiet cut buys is cutting in pauses. Writes
``<out>/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402

SR = 16000


def joined(data: str, language: str, seconds: float, gap: float, limit: int | None) -> list[dict]:
    """The test clips of ``language`` joined into files of about ``seconds``: audio and reference of each."""
    import numpy as np

    from inference.evaluation import utterances_from_dataset
    from trainers.corpus.loading import load_corpus

    utts = utterances_from_dataset(load_corpus(data)["test"], [language], limit)
    silence = np.zeros(int(SR * gap), np.float32)
    files, parts, texts, pos = [], [], [], 0
    for n, u in enumerate(utts):
        audio = u.audio.astype(np.float32)
        parts += [audio, silence]
        texts.append(u.text)
        pos += len(audio) + len(silence)
        if pos >= seconds * SR or n == len(utts) - 1:
            files.append({"audio": np.concatenate(parts), "reference": " ".join(texts)})
            parts, texts, pos = [], [], 0
    return files


def cut_levels(audio, starts: list[int]) -> list[float]:
    """The audio level (RMS, dBFS) of the 100 ms around each window boundary."""
    import numpy as np

    half = SR // 20
    levels = []
    for s in starts[1:]:
        frame = np.asarray(audio[max(0, s - half):s + half], np.float64)
        levels.append(round(float(10 * np.log10(np.mean(frame ** 2) + 1e-12)), 1))
    return levels


def run(args) -> dict:
    import torch

    from inference.confidence import bootstrap_ci, paired_bootstrap, utterance_counts
    from inference.evaluation import normalize
    from inference.transcribe import ExpertWhisper, window_starts

    torch.manual_seed(0)
    whisper = ExpertWhisper.from_pack(args.base, args.pack, device="cpu")
    result = {"base": Path(args.base).name, "pack": args.pack, "seconds": args.seconds, "gap": args.gap,
              "languages": {}}
    for lang in args.languages.split(","):
        files = joined(args.data, lang, args.seconds, args.gap, args.limit)
        refs = [normalize(f["reference"]) for f in files]
        entry = {"files": len(files), "audio_s": round(sum(len(f["audio"]) for f in files) / SR, 1)}
        for cut in ("fixed", "quiet"):
            t0 = time.time()
            out = whisper.transcribe([f["audio"] for f in files], language=lang, cut=cut, progress=args.progress,
                                     batch_size=args.batch_size)
            hyps = [normalize(t.text) for t in out]
            counts = utterance_counts(refs, hyps)
            entry[cut] = {"word_errors": counts.word_errors.tolist(), "words": counts.words.tolist(),
                          "wer": float(counts.word_errors.sum() / max(counts.words.sum(), 1)),
                          "cut_db": [x for f in files for x in cut_levels(f["audio"], window_starts(f["audio"], cut))],
                          "seconds": round(time.time() - t0, 1)}
            entry[cut]["ci95"] = list(bootstrap_ci(counts.word_errors, counts.words))
            print(f"{lang} {cut}: WER {100 * entry[cut]['wer']:.1f} on {len(files)} files, "
                  f"{len(entry[cut]['cut_db'])} boundaries", flush=True)
        d = paired_bootstrap(entry["fixed"]["word_errors"], entry["quiet"]["word_errors"], entry["fixed"]["words"])
        entry["quiet_vs_fixed"] = {"difference": d.difference, "ci95": [d.low, d.high], "relative": d.relative}
        result["languages"][lang] = entry
    langs = list(result["languages"].values())
    if len(langs) > 1:
        pooled = {cut: [sum((e[cut][k] for e in langs), []) for k in ("word_errors", "words")]
                  for cut in ("fixed", "quiet")}
        d = paired_bootstrap(pooled["fixed"][0], pooled["quiet"][0], pooled["fixed"][1])
        result["pooled"] = {"fixed": d.a, "quiet": d.b, "difference": d.difference, "ci95": [d.low, d.high],
                            "relative": d.relative}
    return result


def table(result: dict) -> str:
    import numpy as np

    from inference.confidence import format_change, format_ci

    lines = [f"Command: `{result['command']}`", "",
             "| language | files | audio s | cut | WER % [95% CI] | boundaries | level at the cut, median dBFS | "
             "quiet vs fixed [paired 95% CI] |",
             "|---|---|---|---|---|---|---|---|"]
    for lang, e in result["languages"].items():
        for cut in ("fixed", "quiet"):
            c = e[cut]
            change = format_change(e["quiet_vs_fixed"]) if cut == "quiet" else ""
            level = f"{np.median(c['cut_db']):.0f}" if c["cut_db"] else "–"
            lines.append(f"| {lang} | {e['files']} | {e['audio_s']} | {cut} | {format_ci(c['wer'], c['ci95'])} | "
                         f"{len(c['cut_db'])} | {level} | {change} |")
    if "pooled" in result:
        p = result["pooled"]
        lines.append(f"| pooled | | | quiet vs fixed | {100 * p['fixed']:.1f} -> {100 * p['quiet']:.1f} | | | "
                     f"{format_change(p)} |")
    lines += ["", f"{result['base']}{' with ' + result['pack'] if result['pack'] else ''}, language given, greedy; "
              f"held-out test clips joined in order into files of about {result['seconds']:g} s "
              f"({result['gap']:g} s between clips). Intervals: bootstrap over files; the change is paired on the "
              "same files. Level at the cut: RMS of the 100 ms around each boundary."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--languages", default="cs,nl", help="comma-separated (default cs,nl)")
    p.add_argument("--data", default="data/fillets", help="the real corpus (whisper-experts corpus fetch fillets)")
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--pack", help="an expert pack (default: the base model alone)")
    p.add_argument("--seconds", type=float, default=120.0, help="length of each joined file (default 120)")
    p.add_argument("--gap", type=float, default=0.0, help="seconds of silence between clips (default 0)")
    p.add_argument("--limit", type=int, help="test clips per language (default all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="window_cut")
    p.add_argument("--table-only", action="store_true", help="only rewrite the table from the JSON")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    if args.table_only:
        if not path.is_file():
            p.error(f"no results in {path} yet")
        result = json.loads(path.read_text())
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        result = run(args)
        result["command"] = recorded(Path(__file__).name, argv)
        path.write_text(json.dumps(result, indent=2))
    md = table(result)
    (out / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
