"""Base vs LoRA expert: test WER per language on held-out sentences spoken by held-out voices.

    python benchmarks/expert_wer.py --languages uk          # ~10 min per language on 2 CPU cores
    python benchmarks/expert_wer.py --languages uk,pt,nl --epochs 8
    python benchmarks/expert_wer.py --languages uk --side both --encoder-start 4   # + top 2 encoder layers
    python benchmarks/expert_wer.py --languages pt --cross-attention-kv             # + cross-attention k/v
    python benchmarks/expert_wer.py --languages uk --side both --encoder-start 3 --dropout 0 \\
        --precision bf16-mixed --run-dir 'runs/{lang}-expert-enc3'   # top 3 encoder layers, bf16 autocast
    python benchmarks/expert_wer.py --languages ''                                  # only rewrite the table

Per language: synthesize (or reuse) ``data/<lang>-expert`` with 400 train / 30 validation / 50 test
utterances (disjoint sentences; test voices unseen in training), train a rank-16 LoRA expert (decoder-only
by default; ``--side both --encoder-start K`` also adapts encoder layers K.. on cached inputs of layer K;
best validation WER kept, early stopping), and decode the test split with the base alone and with the
expert (always in float32: ``--precision`` changes training only; ``bf16-mixed`` uses the CPU's bfloat16
matrix units where it has them). Writes ``<out>/expert_wer.{json,md}`` and each expert under ``--run-dir``
(default ``runs/<lang>-expert/``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--languages", default="uk")
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--train", type=int, default=400, help="training utterances per language (default 400)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--side", default="decoder", choices=["decoder", "encoder", "both"])
    p.add_argument("--encoder-start", type=int, default=0, help="adapt encoder layers from this index up")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--cross-attention-kv", action="store_true", help="also adapt cross-attention k/v")
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--seed", type=int, default=1, help="corpus seed (default 1)")
    p.add_argument("--precision", default=None, help="Lightning training precision, e.g. bf16-mixed (default: "
                   "32-true on CPU, bf16-mixed on CUDA)")
    p.add_argument("--run-dir", default="runs/{lang}-expert", help="where each expert and its logs go ({lang} is "
                   "replaced; default runs/{lang}-expert)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from registry.expert_file import save_expert
    from trainers.corpus.synth import SynthConfig, synthesize_corpus
    from trainers.train_lora import TrainConfig, train_lora_expert

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "expert_wer.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for lang in [x.strip() for x in args.languages.split(",") if x.strip()]:
        data = Path(f"data/{lang}-expert")
        total = args.train + 80
        if not (data / "dataset_dict.json").is_file():
            synthesize_corpus(SynthConfig(languages=(lang,), per_language=total, train_fraction=args.train / total,
                                          validation_fraction=30 / total, test_fraction=50 / total,
                                          seed=args.seed), data)
        t0 = time.time()
        cfg = TrainConfig(data=str(data), languages=(lang,), base=args.base, rank=args.rank, alpha=2.0 * args.rank,
                          epochs=args.epochs, lr=args.lr, batch_size=16, run_dir=args.run_dir.format(lang=lang),
                          patience=args.patience,
                          side=args.side, encoder_start=args.encoder_start, dropout=args.dropout,
                          cross_attention_kv=args.cross_attention_kv, precision=args.precision)
        expert, report = train_lora_expert(cfg)
        save_expert(expert, Path(cfg.run_dir) / "expert.safetensors")
        b, e = report["test"]["base"][lang], report["test"]["expert"][lang]
        variant = args.side if args.side != "both" else f"decoder + encoder layers {args.encoder_start}.."
        if args.cross_attention_kv:
            variant += " + cross-attn k/v"
        if args.dropout != p.get_default("dropout"):
            variant += f", dropout {args.dropout:g}"
        if args.precision and args.precision != "32-true":
            variant += f", {args.precision} training"
        results[f"{lang} | {variant}"] = {"language": lang, "variant": variant, "base": b, "expert": e,
                                          "train_utterances": expert.manifest["data"]["utterances"],
                         "best_epoch": report["best_epoch"], "history": report["history"],
                         "seconds": round(time.time() - t0), "parameters": expert.num_parameters,
                         "config": {"rank": args.rank, "lr": args.lr, "epochs": args.epochs, "side": args.side,
                                    "encoder_start": args.encoder_start, "dropout": args.dropout,
                                    "cross_attention_kv": args.cross_attention_kv, "precision": args.precision,
                                    "run_dir": cfg.run_dir}}
        results_path.write_text(json.dumps(results, indent=2))
    rows = ["| language | expert (rank 16) | train utt. | test n | base WER % | expert WER % | rel. WER | base CER % | "
            "expert CER % | rel. CER | train min |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(results.items()):
        b, e = r["base"], r["expert"]
        lang, variant = r.get("language", key), r.get("variant", "decoder")
        rows.append(f"| {lang} | {variant} | {r['train_utterances']} | {e['n']} | {100 * b['wer']:.1f} | "
                    f"{100 * e['wer']:.1f} | "
                    f"{100 * (e['wer'] / b['wer'] - 1):+.0f}% | {100 * b['cer']:.1f} | {100 * e['cer']:.1f} | "
                    f"{100 * (e['cer'] / b['cer'] - 1):+.0f}% | {r['seconds'] / 60:.0f} |")
    md = "\n".join(rows) + "\n"
    (out / "expert_wer.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
