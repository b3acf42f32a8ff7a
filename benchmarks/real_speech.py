"""Language experts on real recorded speech: Czech and Dutch voice acting (Fish Fillets NG, Debian packages).

    python benchmarks/real_speech.py --languages cs,nl                     # the default recipe on all train clips
    python benchmarks/real_speech.py --languages cs --train 100,300        # the learning curve
    python benchmarks/real_speech.py --languages cs --variant decoder      # the old decoder-only default
    python benchmarks/real_speech.py --languages cs --adopt runs/cs-enc3/expert.safetensors   # score a trained one
    python benchmarks/real_speech.py --table-only                          # only rewrite the tables
    python benchmarks/real_speech.py --compare 'cs | enc3 | 300' 'cs | enc0 | 300'   # two rows, paired
    python benchmarks/real_speech.py --languages nl --train 300 --variant specaug            # augmentation
    python benchmarks/real_speech.py --languages nl --train 300 --variant noise              # (also: speed)
    python benchmarks/real_speech.py --languages cs --train 300 --variant enc0               # all encoder layers
    python benchmarks/real_speech.py --languages cs --train 300 --variant enc3-r64           # rank 64, not 16
    python benchmarks/real_speech.py --languages cs --train 300 --lr 3e-4                    # another learning rate
    python benchmarks/real_speech.py --languages cs --train 100 --extra-data data/cs-espeak --tag +espeak
    python benchmarks/real_speech.py --languages cs --train-data data/cs-espeak --train all --tag espeak-only

Synthetic or other corpora: ``--extra-data DIR[:WEIGHT]`` adds training corpora to the real clips (validation
stays real), ``--train-data DIR`` trains on another corpus alone (validated on it) and tests on the real clips;
``--tag`` names such rows.

The corpus is made once with ``whisper-experts corpus fetch fillets`` (whole game levels per split: no test
scene, speaker line or sentence is trained on). whisper-base decodes each test split once, greedy, language
forced, bounded by audio duration only; that report is reused by every row. Each expert (rank 16 unless the
variant says otherwise, the variant's layers and precision, at most ``--epochs`` epochs, best validation WER
kept) is trained on the first ``--train`` clips spread evenly over the training split ("all": every clip), then
decodes the same test clips the same way. Every WER carries its 95% bootstrap interval (utterances resampled),
and every expert row the paired-bootstrap interval of its difference to the base on the same clips.

Writes ``benchmarks/results/real_speech.{json,md}`` (a rerun's new result replaces its row in the table; the
earlier one stays in the JSON under ``replaced``); runs live under ``--runs`` (default ``runs/real``).
Minutes are wall-clock on the machine named in the table (training only; the cache of frozen layers included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.configs import DECODER_RECIPE  # noqa: E402  (after the path insert)

RESULTS = Path(__file__).parent / "results"
# Recipes compared; "enc3" adapts encoder layers 3.. as well (their input cached once), in bf16 autocast.
DEFAULT_LR = 1e-3
ENC3 = {"side": "both", "encoder_start": 3, "dropout": 0.0}
VARIANTS = {
    # the default before these measurements, in float32 as it then ran on CPUs
    "decoder": {**DECODER_RECIPE, "precision": "32-true"},
    "enc3": {**ENC3, "precision": "bf16-mixed"},
    "enc3-fp32": {**ENC3, "precision": "32-true"},  # explicit: the machine's default may be bf16
    "specaug": {**ENC3, "precision": "bf16-mixed", "spec_augment": True},
    "speed": {**ENC3, "precision": "bf16-mixed", "speed_perturb": (0.9, 1.0, 1.1)},
    "noise": {**ENC3, "precision": "bf16-mixed", "noise_snr_db": 15.0, "noise_kind": "pink"},
    "enc0": {"side": "both", "encoder_start": 0, "dropout": 0.0, "precision": "bf16-mixed"},
    "enc3-r64": {**ENC3, "precision": "bf16-mixed", "rank": 64, "alpha": 128.0},
}
DESCRIBED = {"decoder": "decoder only, float32", "enc3": "decoder + encoder layers 3.., bf16 autocast",
             "enc3-fp32": "decoder + encoder layers 3.., float32",
             "specaug": "encoder 3.. + decoder, bf16, SpecAugment",
             "speed": "encoder 3.. + decoder, bf16, speed 0.9/1/1.1",
             "noise": "encoder 3.. + decoder, bf16, + a pink-noise copy at 15 dB SNR",
             "enc0": "decoder + every encoder layer, bf16 autocast",
             "enc3-r64": "decoder + encoder layers 3.., bf16 autocast, rank 64"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    return f"{cpu}, {device}, torch {torch.__version__}"


def _test_utterances(data: str, language: str):
    from inference.evaluation import utterances_from_dataset
    from trainers.corpus.loading import load_corpus

    return utterances_from_dataset(load_corpus(data)["test"], [language])


def base_report(data: str, language: str, runs: Path, base_name: str) -> dict:
    """whisper-base on the test split of ``language`` (decoded once, then read back)."""
    path = runs / f"base-{language}-test.json"
    if path.is_file():
        return json.loads(path.read_text())
    from inference.evaluation import DecodeOptions, evaluate
    from registry.bases import load_base

    base = load_base(base_name)
    report = evaluate(base.model, base.processor, _test_utterances(data, language), DecodeOptions()).as_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False))
    return report


def expert_report(expert_path: Path, data: str, language: str) -> dict:
    """The expert (attached to its base) on the test split, stored beside the expert file."""
    path = expert_path.with_name("test.json")
    if path.is_file() and path.stat().st_mtime >= expert_path.stat().st_mtime:
        return json.loads(path.read_text())
    from inference.evaluation import DecodeOptions, evaluate
    from lora_experts.model import attach_expert
    from registry.bases import load_base
    from registry.expert_file import check_compatible, load_expert

    expert = load_expert(expert_path)
    base = load_base(expert.manifest["base"]["name"])
    check_compatible(expert.manifest, base, what=str(expert_path))
    attach_expert(base.model, expert.tensors, expert.manifest["hyperparameters"])
    report = evaluate(base.model, base.processor, _test_utterances(data, language), DecodeOptions()).as_dict()
    path.write_text(json.dumps(report, ensure_ascii=False))
    return report


def train(data: str, language: str, variant: str, n: int | None, run_dir: Path, args) -> dict:
    from registry.expert_file import save_expert
    from trainers.train_lora import TrainConfig, train_lora_expert

    recipe = {"rank": 16, "alpha": 32.0, **VARIANTS[variant]}  # rank 16 unless the variant says otherwise
    cfg = TrainConfig(data=args.train_data or data, languages=(language,), base=args.base, epochs=args.epochs,
                      patience=args.patience, lr=args.lr, batch_size=16, max_train=n, run_dir=str(run_dir),
                      test=False, extra_data=tuple(args.extra_data or ()), **recipe)
    t0 = time.time()
    expert, report = train_lora_expert(cfg)
    save_expert(expert, run_dir / "expert.safetensors")
    info = {"best_epoch": report["best_epoch"], "best_val_wer": report["best_val_wer"],
            "minutes": round((time.time() - t0) / 60, 1), "history": report["history"]}
    (run_dir / "train.json").write_text(json.dumps(info, indent=2))
    return info


def row(language: str, variant: str, n: int | None, expert_path: Path, data: str, runs: Path, args,
        info: dict) -> dict:
    from inference.evaluation import paired_comparison, paired_counts
    from registry.expert_file import read_manifest

    base = base_report(data, language, runs, args.base)
    ours = expert_report(expert_path, data, language)
    manifest = read_manifest(expert_path)
    recipe = DESCRIBED.get(variant, variant) + (f", lr {args.lr:g}" if args.lr != DEFAULT_LR else "") \
        + (f" ({args.tag})" if args.tag else "")
    return {"language": language, "variant": variant, "recipe": recipe, "tag": args.tag, "lr": args.lr,
            "train_data": args.train_data, "extra_data": args.extra_data,
            "train_clips": manifest.get("data", {}).get("utterances"),
            "train_hours": manifest.get("data", {}).get("hours"),
            "requested": n or "all", "base": base["languages"][language], "expert": ours["languages"][language],
            "paired": paired_comparison(base, ours)[language], "expert_file": str(expert_path), **info,
            "machine": args.machine,
            # per-utterance counts, so any two rows can be compared pairwise later, without their run directories
            "utterances": paired_counts(ours)}


def table(results: dict) -> str:
    from inference.confidence import format_change, format_ci

    lines = ["| language | recipe | train clips (h) | test n | base WER % [95% CI] | expert WER % [95% CI] | "
             "change [paired 95% CI] | base CER % | expert CER % | train min |", "|" + "---|" * 10]
    for key in sorted(results, key=lambda k: (results[k]["language"], results[k]["variant"],
                                              results[k].get("tag") or "", results[k]["train_clips"] or 0,
                                              -(results[k].get("lr") or DEFAULT_LR))):
        r = results[key]
        b, e, change = r["base"], r["expert"], format_change(r["paired"])
        clips = f"{r['train_clips']}" + (f" ({r['train_hours']:.2f})" if r.get("train_hours") else "")
        lines.append(f"| {r['language']} | {r['recipe']} | {clips} | {e['n']} | "
                     f"{format_ci(b['wer'], b.get('wer_ci95'))} | {format_ci(e['wer'], e.get('wer_ci95'))} | "
                     f"{change} | {100 * b['cer']:.1f} | {100 * e['cer']:.1f} | {r.get('minutes', '?')} |")
    machines = sorted({r["machine"] for r in results.values()})
    return "\n".join(lines) + "\n\nMachine: " + "; ".join(machines) + "\n"


def baseline_table(runs: Path) -> str:
    """whisper-base alone on each language's test split (the reports every expert row is compared with)."""
    from inference.confidence import format_ci

    lines = ["| language | test clips | audio min | whisper-base WER % [95% CI] | CER % [95% CI] | loops cut |",
             "|---|---|---|---|---|---|"]
    for path in sorted(runs.glob("base-*-test.json")):
        for lang, r in json.loads(path.read_text())["languages"].items():
            lines.append(f"| {lang} | {r['n']} | {r['audio_seconds'] / 60:.1f} | "
                         f"{format_ci(r['wer'], r.get('wer_ci95'))} "
                         f"| {format_ci(r['cer'], r.get('cer_ci95'))} | {r.get('guarded', 0)} |")
    return "\n".join(lines) + "\n"


def compare(results: dict, a: str, b: str) -> int:
    """Row B against row A on the same test clips, from the per-utterance counts the rows keep."""
    from inference.confidence import format_change
    from inference.evaluation import paired_comparison

    missing = [k for k in (a, b) if not results.get(k, {}).get("utterances")]
    if missing:
        print(f"no per-utterance counts for {missing}; rows with them: "
              + ", ".join(repr(k) for k, r in results.items() if r.get("utterances")), file=sys.stderr)
        return 2
    for lang, d in paired_comparison({"utterances": results[a]["utterances"]},
                                     {"utterances": results[b]["utterances"]}).items():
        print(f"{lang}: {b!r} against {a!r} on {d['n']} clips: WER {100 * d['a']:.1f} -> {100 * d['b']:.1f}, "
              f"{format_change(d)}, p = {d['p_value']:.2f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--languages", default="cs,nl", help="among cs,nl (default both)")
    p.add_argument("--variant", default="enc3", choices=sorted(VARIANTS), help="recipe (default enc3)")
    p.add_argument("--train", default="all", help="training clips per language, comma-separated (default all)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--lr", type=float, default=DEFAULT_LR,
                   help=f"learning rate (default {DEFAULT_LR:g}); another value makes its own row")
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--data", default="data/fillets", help="the corpus (made here if missing)")
    p.add_argument("--runs", default="runs/real", help="where experts and reports go")
    p.add_argument("--adopt", metavar="EXPERT", help="score this already trained expert file as the run of "
                   "--languages (one), --variant and --train instead of training")
    p.add_argument("--table-only", action="store_true", help="only rewrite the tables from the stored results")
    p.add_argument("--compare", nargs=2, metavar=("ROW_A", "ROW_B"),
                   help="print B's WER minus A's on the same test clips, paired bootstrap (rows are the keys of "
                   "real_speech.json, e.g. 'cs | enc3 | 300' 'cs | enc0 | 300'), and stop")
    p.add_argument("--train-data", help="train (and validate) on this corpus instead, test on --data's clips")
    p.add_argument("--extra-data", action="append", metavar="DIR[:WEIGHT]",
                   help="a further training corpus (repeatable); validation and test stay --data's")
    p.add_argument("--tag", default="", help="names this row's data (with --train-data / --extra-data)")
    args = p.parse_args(argv)
    if (args.train_data or args.extra_data) and not args.tag:
        p.error("--train-data / --extra-data rows need a --tag naming them")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_path = RESULTS / "real_speech.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.compare:
        return compare(results, *args.compare)
    if not args.table_only:
        args.machine = machine()
        if not (Path(args.data) / "dataset_dict.json").is_file():
            from trainers.cli import main as cli

            if cli(["corpus", "fetch", "fillets", "--languages", "cs,nl", "--out", args.data]) != 0:
                return 1
        runs = Path(args.runs)
        for language in [x.strip() for x in args.languages.split(",") if x.strip()]:
            for size in args.train.split(","):
                n = None if size.strip() == "all" else int(size)
                # a row is named by language, variant, size, then the learning rate and tag where not default
                extra = ([f"lr{args.lr:g}"] if args.lr != DEFAULT_LR else []) + ([args.tag] if args.tag else [])
                tag = "-".join("".join(c if c.isalnum() or c in "-_." else "-" for c in x) for x in extra)
                run_dir = runs / "-".join([language, args.variant, size.strip()] + ([tag] if tag else []))
                if args.adopt:
                    expert_path = Path(args.adopt)
                    info = {"minutes": None}
                    log = expert_path.parent / "train.json"
                    if log.is_file():
                        info.update(json.loads(log.read_text()))
                else:
                    expert_path = run_dir / "expert.safetensors"
                    if expert_path.is_file() and (run_dir / "train.json").is_file():
                        info = json.loads((run_dir / "train.json").read_text())
                    else:
                        run_dir.mkdir(parents=True, exist_ok=True)
                        info = train(args.data, language, args.variant, n, run_dir, args)
                info = {k: v for k, v in info.items() if k != "history"}
                key = " | ".join([language, args.variant, size.strip()] + extra)
                new = row(language, args.variant, n, expert_path, args.data, runs, args, info)
                # read again: another run may have written its rows since this one started
                results = json.loads(results_path.read_text()) if results_path.is_file() else {}
                old = results.get(key)
                if old and old.get("expert") != new["expert"]:  # a rerun: the earlier result stays on record
                    new["replaced"] = [{k: v for k, v in old.items() if k != "replaced"}] + old.get("replaced", [])
                results[key] = new
                results_path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    md = baseline_table(Path(args.runs)) + "\n" + table(results)
    header = ("Real recorded speech (Fish Fillets NG voice acting, Debian packages), whisper-base, greedy, language "
              "forced, decoding bounded by audio duration; rank-16 LoRA experts unless the recipe says otherwise.\n\n"
              "Command: `python benchmarks/real_speech.py --languages cs,nl` (other rows: `--train 100,300`, "
              "`--variant decoder`; see the script's help)\n\n")
    (RESULTS / "real_speech.md").write_text(header + md)
    print(header + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
