"""Many languages in one expert: LoRS vs linear averaging vs TIES vs DARE vs each single expert.

    python benchmarks/multilingual_merge.py                           # uk,pt,nl,ru; ~40 min on 2 CPU cores
    python benchmarks/multilingual_merge.py --languages uk,pt,nl,ru --test-limit 50 --methods linear,ties,dare_linear,lors
    python benchmarks/multilingual_merge.py --languages ''            # only rewrite the table from the JSON

Per language, a rank-16 language expert trained on 400 synthesized utterances of ``data/<lang>-expert`` (the
corpora of benchmarks/expert_wer.py): the first file found of ``runs/<lang>-expert/expert.safetensors`` (the
experts of that benchmark), ``runs/fusion/<lang>-400.safetensors`` (benchmarks/fusion_low_resource.py), else
one is trained here (decoder-only, into ``runs/multilingual-merge``). Every language's expert is then merged into
ONE expert per method, with the same weights (``1/N`` each, i.e. averaging; TIES: weight 1 each, its disjoint mean
averages by itself) and the methods' default options:

- ``linear``: exact average of the task vectors (LoRA ranks concatenated);
- ``ties``: trim to the top 20% entries, elect signs, disjoint mean;
- ``dare_linear``: drop 50% of entries at random (seeded), rescale, average;
- ``lors``: LoRS-Merging, each expert's delta truncated to half its rank and magnitude-pruned to 50%, averaged.

Each language's test set (the first ``--test-limit`` utterances, held-out sentences and voices) is decoded under
the base, under every single expert and under every merged expert: a language x expert WER matrix
(``inference.language_matrix``, as ``whisper-experts eval --experts`` prints) whose mean column is the number to
compare. Writes ``<out>/multilingual_merge.{json,md,png}``; the goal is LoRS >= 5% relative better than
linear averaging on the mean WER, reported as it comes out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHOD_WEIGHTS = {"ties": "ones", "dare_ties": "ones"}  # sign-elected disjoint means average by themselves
SEARCHED = ("runs/{lang}-expert/expert.safetensors", "runs/fusion/{lang}-400.safetensors",
            "runs/multilingual-merge/{lang}-400.safetensors")


def expert_for(lang: str, args):
    """(language expert, where it came from): an existing expert file, else a decoder-only one trained here."""
    from registry.expert_file import load_expert, save_expert
    from trainers.configs import DECODER_RECIPE
    from trainers.train_lora import TrainConfig, train_lora_expert

    for pattern in SEARCHED:
        path = Path(pattern.format(lang=lang))
        if path.is_file():
            return load_expert(path), str(path)
    from benchmarks.fusion_low_resource import corpus_for

    path = Path(SEARCHED[-1].format(lang=lang))
    cfg = TrainConfig(data=corpus_for(lang, args.seed), languages=(lang,), base=args.base, rank=16, alpha=32.0,
                      epochs=8, lr=1e-3, batch_size=16, patience=3, test=False,
                      run_dir=str(path.parent / f"run-{lang}"), **DECODER_RECIPE)
    expert, _ = train_lora_expert(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_expert(expert, path)
    return expert, str(path)


def merged_experts(experts, names, methods, seed: int):
    """(row label, fused expert, merge info) per method."""
    from lora_experts.merge import fuse_experts

    out = []
    n = len(experts)
    for method in methods:
        weights = [1.0] * n if METHOD_WEIGHTS.get(method) == "ones" else [1.0 / n] * n
        t0 = time.time()
        fused, result = fuse_experts(experts, weights, method, names=names, seed=seed)
        info = {"method": method, "weights": weights, "options": result.options, "kind": fused.kind,
                "relative_error": result.relative_error, "merge_seconds": round(time.time() - t0, 2)}
        out.append((f"merged: {method}", fused, info))
    return out


def table(results: dict) -> str:
    """Markdown: rows (base, single experts, merged experts) x languages of test WER %, mean, and vs linear."""
    langs, rows = results["languages"], results["rows"]
    linear = next((r["mean_wer"] for r in rows if r["label"] == "merged: linear"), None)
    lines = ["| expert | " + " | ".join(langs) + " | mean WER % | vs linear |", "|" + "---|" * (len(langs) + 3)]
    for r in rows:
        cells = [f"**{w:.1f}**" if lang in r["own"] else f"{w:.1f}" for lang, w in zip(langs, r["wer"])]
        rel = f"{100 * (r['mean_wer'] / linear - 1):+.1f}%" if linear and r["label"].startswith("merged") else ""
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['mean_wer']:.1f} | {rel} |")
    n = ", ".join(f"{lang} {k}" for lang, k in zip(langs, results["n"]))
    return "\n".join(lines) + (f"\n\nNormalized test WER %, test utterances per language: {n}. Bold: the expert's "
                               "own language(s).\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--languages", default="uk,pt,nl,ru", help="languages to merge (default uk,pt,nl,ru)")
    p.add_argument("--methods", default="linear,ties,dare_linear,lors", help="merge methods to compare")
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--test-limit", type=int, default=30, help="test utterances per language (default 30)")
    p.add_argument("--seed", type=int, default=1, help="corpus seed (default 1, as benchmarks/expert_wer.py)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "multilingual_merge.json"
    langs = [x.strip() for x in args.languages.split(",") if x.strip()]
    if not langs:
        results = json.loads(json_path.read_text())
        (out / "multilingual_merge.md").write_text(table(results))
        print(table(results))
        return 0

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from benchmarks.fusion_low_resource import corpus_for
    from inference.evaluation import DecodeOptions, utterances_from_dataset
    from inference.language_matrix import language_matrix, plot_matrix
    from registry.bases import load_base
    from trainers.corpus.loading import load_corpus

    experts, sources = [], {}
    for lang in langs:
        expert, source = expert_for(lang, args)
        experts.append(expert)
        sources[lang] = source
    names = [f"{lang}-expert" for lang in langs]
    merged = merged_experts(experts, names, [m.strip() for m in args.methods.split(",") if m.strip()], args.seed)
    utterances = []
    for lang in langs:
        corpus = load_corpus(corpus_for(lang, args.seed))
        utterances += utterances_from_dataset(corpus["test"], [lang], limit=args.test_limit)
    base = load_base(args.base, device="cpu")
    rows = [(f"single: {lang}", e) for lang, e in zip(langs, experts)] + [(label, e) for label, e, _ in merged]
    t0 = time.time()
    matrix = language_matrix(base.model, base.processor, utterances, rows, DecodeOptions(batch_size=16))
    data = matrix.as_dict()
    results = {"languages": data["languages"], "n": data["n"], "experts": sources,
               "merges": [info for _, _, info in merged], "decode_seconds": round(time.time() - t0),
               "rows": [{"label": label, "own": own, "wer": wer, "cer": cer, "mean_wer": mean}
                        for label, own, wer, cer, mean in zip(data["rows"], data["own_languages"], data["wer"],
                                                              data["cer"], data["mean_wer"])]}
    json_path.write_text(json.dumps(results, indent=2))
    (out / "multilingual_merge.md").write_text(table(results))
    plot_matrix(matrix, str(out / "multilingual_merge.png"), title=f"test WER %: {', '.join(langs)} merged")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
