"""Sparse sub-network experts vs LoRA experts at a similar number of stored parameters, and their masks' overlap.

    python benchmarks/sparse_vs_lora.py --languages uk,pt,nl      # ~1.5-2 h on 2 free CPU cores (~30 min/language)
    python benchmarks/sparse_vs_lora.py --languages uk,pt,nl --lora-from 'runs/{lang}-expert/expert.safetensors'
    python benchmarks/sparse_vs_lora.py --languages ''             # only rewrite the tables from the JSON

Per language, on whisper-base and ``data/<lang>-expert`` (400 train / 30 validation / 50 test utterances, the
corpora of benchmarks/expert_wer.py; made if missing):

1. a rank-16 decoder-only LoRA expert (``train_lora_expert``; cached as ``<work>/<lang>-lora.safetensors``, or
   taken from ``--lora-from``), seeded per language: LoRA's A starts random, and experts that share that start
   share low-rank structure that would show as mask overlap between unrelated languages (experts reused with
   ``--lora-from`` were all trained with seed 0: read their overlap with that in mind);
2. a sparse expert by two-phase sparse fine-tuning (``trainers.train_sparse``) with that LoRA expert as phase 1:
   its delta's top entries over the same matrices become the mask, then only those entries are fine-tuned from
   the base. ``--sparsity match`` (default) keeps as many entries as the LoRA expert has parameters;
3. test WER/CER of the base, the LoRA expert and the sparse expert (same utterances, same decoding), size on
   disk (the whole ``.safetensors`` file), stored parameters, training time (sparse: phase 1 + phase 2).

Then the language x language Jaccard overlap of the sparse experts' masks (overall and per layer, beside the
overlap two random masks of those densities would have) and its heatmap. Writes
``<out>/sparse_vs_lora.{json,md}`` and ``<out>/sparse_overlap.png`` (the README's tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def corpus_for(lang: str, data: str | None, seed: int) -> str:
    if data:  # one corpus holding every language (e.g. a tiny smoke-test corpus)
        return data
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    path = Path(f"data/{lang}-expert")
    if not (path / "dataset_dict.json").is_file():
        total = 480
        synthesize_corpus(SynthConfig(languages=(lang,), per_language=total, train_fraction=400 / total,
                                      validation_fraction=30 / total, test_fraction=50 / total, seed=seed), path)
    return str(path)


def lora_expert(lang: str, data: str, args, work: Path):
    """(LoRA expert, training seconds or None when reused) for ``lang``."""
    from registry.expert_file import load_expert, save_expert
    from trainers.configs import DECODER_RECIPE
    from trainers.train_lora import TrainConfig, train_lora_expert

    if args.lora_from:
        return load_expert(args.lora_from.format(lang=lang)), None
    path, timing = work / f"{lang}-lora.safetensors", work / f"{lang}-lora.json"
    if path.is_file() and timing.is_file():
        return load_expert(path), json.loads(timing.read_text())["seconds"]
    t0 = time.time()
    cfg = TrainConfig(data=data, languages=(lang,), base=args.base, rank=args.rank, alpha=2.0 * args.rank,
                      seed=language_seed(lang),
                      epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                      max_train=args.max_train, patience=args.patience, test=False, progress=False,
                      run_dir=str(work / f"run-{lang}-lora"), **DECODER_RECIPE)
    expert, _ = train_lora_expert(cfg)
    seconds = time.time() - t0
    save_expert(expert, path)
    timing.write_text(json.dumps({"seconds": seconds}))
    return expert, seconds


def language_seed(lang: str) -> int:
    return zlib.crc32(lang.encode()) % 10_000


def matched_sparsity(lora, base_model) -> float:
    """The sparsity at which the sparse expert keeps as many entries as ``lora`` has parameters."""
    params = dict(base_model.named_parameters())
    candidates = sum(params[f"{k[: -len('.lora_A')]}.weight"].numel() for k in lora.tensors if k.endswith(".lora_A"))
    return 1 - lora.num_parameters / candidates


def test_rows(base, experts: dict, utterances) -> dict:
    from inference.evaluation import DecodeOptions, evaluate
    from inference.language_matrix import expert_applied

    def row(report):
        r = next(iter(report.as_dict()["languages"].values()))
        return {k: r[k] for k in ("wer", "cer", "n")}

    opts = DecodeOptions(batch_size=16)
    out = {"base": row(evaluate(base.model, base.processor, utterances, opts, progress=False))}
    for name, expert in experts.items():
        with expert_applied(base.model, expert):
            out[name] = row(evaluate(base.model, base.processor, utterances, opts, progress=False))
    return out


def run_language(lang: str, args, work: Path) -> dict:
    from inference.evaluation import utterances_from_dataset
    from registry.bases import load_base
    from registry.expert_file import expert_bytes, save_expert
    from trainers.corpus.loading import load_corpus
    from trainers.train_sparse import SparseTrainConfig, train_sparse_expert

    data = corpus_for(lang, args.data, args.seed)
    lora, lora_seconds = lora_expert(lang, data, args, work)
    base = load_base(args.base, device="cpu")
    sparsity = matched_sparsity(lora, base.model) if args.sparsity == "match" else float(args.sparsity)
    cfg = SparseTrainConfig(data=data, languages=(lang,), base=args.base, sparsity=sparsity, sparse_lr=args.sparse_lr,
                            epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                            max_train=args.max_train, patience=args.patience, test=False, progress=False,
                            seed=language_seed(lang), run_dir=str(work / f"run-{lang}-sparse"))
    t0 = time.time()
    sparse, report = train_sparse_expert(cfg, phase1=lora, phase1_name=f"{lang}-lora")
    phase2 = time.time() - t0
    save_expert(sparse, work / f"{lang}-sparse.safetensors")
    utterances = utterances_from_dataset(load_corpus(data)["test"], [lang], args.test_limit)
    return {
        "test": test_rows(base, {"lora": lora, "sparse": sparse}, utterances),
        "sparsity": sparsity, "sparse_hyperparameters": {k: v for k, v in sparse.manifest["hyperparameters"].items()
                                                         if k != "shapes"},
        "parameters": {"lora": lora.num_parameters, "sparse": sparse.num_parameters},
        "bytes": {"lora": len(expert_bytes(lora)), "sparse": report["size"]["file_bytes"],
                  "sparse_index": report["size"]["index_bytes"], "sparse_values": report["size"]["value_bytes"]},
        "seconds": {"lora": lora_seconds, "sparse_phase2": round(phase2, 1),
                    "sparse_total": None if lora_seconds is None else round(lora_seconds + phase2, 1)},
        "history": {"sparse": report["history"]}, "best_val_wer": {"sparse": report["best_val_wer"]},
    }


def overlap_section(work: Path, languages, out: Path) -> tuple[dict, str]:
    from lora_experts.sparse_masks import mask_overlap, percent, plot_overlap
    from registry.expert_file import load_expert

    experts = {lang: load_expert(work / f"{lang}-sparse.safetensors") for lang in languages}
    overlap = mask_overlap(experts)
    langs, chance = list(experts), overlap.chance()
    plot_overlap(overlap, str(out / "sparse_overlap.png"), title="sparse experts: mask Jaccard % (whole mask)")
    md = ["\nMask overlap (Jaccard %, all entries):\n", overlap.markdown(),
          "\nRandom masks with the same entries per matrix would overlap by "
          + ", ".join(f"{a}-{b} {100 * chance[i, j]:.1f}%" for i, a in enumerate(langs)
                      for j, b in enumerate(langs) if i < j) + ".\n",
          "\nPer layer (Jaccard % of each language pair):\n"]
    pairs = [(i, j) for i in range(len(langs)) for j in range(i + 1, len(langs))]
    md.append("| layer | " + " | ".join(f"{langs[i]}-{langs[j]}" for i, j in pairs) + " |")
    md.append("|" + "---|" * (len(pairs) + 1))
    for layer, m in overlap.per_layer().items():
        md.append(f"| {layer} | " + " | ".join(percent(m[i, j]) for i, j in pairs) + " |")
    return overlap.as_dict(), "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--languages", default="uk,pt,nl")
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--data", help="one corpus with every language (default data/<lang>-expert per language)")
    p.add_argument("--sparsity", default="match", help="'match' (entries = LoRA parameters) or a fraction")
    p.add_argument("--sparse-lr", type=float, default=1e-4, help="phase-2 learning rate (default 1e-4)")
    p.add_argument("--lora-from", help="reuse LoRA experts, a path pattern with {lang} (training time unknown)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=1, help="corpus seed (default 1, as benchmarks/expert_wer.py)")
    p.add_argument("--work", default="runs/sparse-vs-lora", help="experts and training logs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results_path = out / "sparse_vs_lora.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"languages": {}}
    for lang in [x for x in args.languages.split(",") if x.strip()]:
        results["languages"][lang.strip()] = run_language(lang.strip(), args, work)
        results_path.write_text(json.dumps(results, indent=2))
    langs = sorted(results["languages"])
    rows = ["| language | base WER % | LoRA WER % | sparse WER % | LoRA CER % | sparse CER % | LoRA params | "
            "sparse entries (sparsity) | LoRA file | sparse file | LoRA train min | sparse train min (phase 2) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def minutes(s):
        return "reused" if s is None else f"{s / 60:.1f}"

    for lang in langs:
        r = results["languages"][lang]
        t = r["test"]
        rows.append(f"| {lang} | {100 * t['base']['wer']:.1f} | {100 * t['lora']['wer']:.1f} | "
                    f"{100 * t['sparse']['wer']:.1f} | {100 * t['lora']['cer']:.1f} | {100 * t['sparse']['cer']:.1f} | "
                    f"{r['parameters']['lora']:,} | {r['parameters']['sparse']:,} ({100 * r['sparsity']:.2f}%) | "
                    f"{r['bytes']['lora'] / 1e6:.2f} MB | {r['bytes']['sparse'] / 1e6:.2f} MB | "
                    f"{minutes(r['seconds']['lora'])} | {minutes(r['seconds']['sparse_total'])} "
                    f"({minutes(r['seconds']['sparse_phase2'])}) |")
    md = "\n".join(rows) + (f"\n\nTest WER/CER % (normalized), {t['base']['n']} held-out utterances per language; "
                            "sparse training time includes phase 1 (the LoRA expert).\n" if langs else "\n")
    if len(langs) >= 2 and all((work / f"{lang}-sparse.safetensors").is_file() for lang in langs):
        results["overlap"], overlap_md = overlap_section(work, langs, out)
        results_path.write_text(json.dumps(results, indent=2))
        md += overlap_md + "\n"
    (out / "sparse_vs_lora.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
