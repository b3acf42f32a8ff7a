"""Merge speed: fusing 8 whisper-base LoRA experts of rank 16, ours vs peft's ``add_weighted_adapter``.

    python benchmarks/merge_speed.py                      # 8 experts, rank 16, median of 3, 1 thread (~2.5 min)
    python benchmarks/merge_speed.py --repeats 1 --threads 2 --out /tmp/merge

The issue's goal: merging 8 whisper-base experts of rank 16 takes under a second. In one run, on the same
``--experts`` random LoRA experts of rank ``--rank`` with whisper-base's module shapes (d_model 512, ffn 2048;
decoder-only, our default targets: self-attention q/k/v/out, cross-attention q/out, fc1/fc2 of the 6 decoder
layers, 48 modules), weights 1/n each, each method's default options, everything on the CPU:

  ours: ``lora_experts.merge.merge`` over the experts' task vectors, for every method in ``MERGE_METHODS``
        (aliases once). Timed: the call, from task vectors to the merged task vector.
  peft: ``PeftModel.add_weighted_adapter`` on a randomly initialised whisper-base-sized
        ``WhisperForConditionalGeneration`` holding the same experts as PEFT adapters (loaded through the PEFT
        format, untimed), with the combination type a user would pick for that method. Timed: the call, which
        also creates the new adapter's layers; deleting it afterwards is not timed.

Same name is not always same method: peft's ``cat``/``svd`` give our ``linear``/``svd`` result (the "same
result" column checks it on every module), but peft's ``ties``, ``dare_*`` and ``magnitude_prune`` prune the
A and B factors separately (rank x in, out x rank), not the deltas, so they do far less work and give a
different result. peft's ``*_svd`` variants apply those methods to the dense deltas, as ours do, then
truncate to rank r by SVD; they are timed as a second peft column. ``lors`` has no peft counterpart;
``task_arithmetic`` is peft ``cat`` with the target-plus-mean-of-supports weights.

Each time is the median of ``--repeats`` calls after one untimed warm-up call per side. Writes
``<out>/merge_speed.{json,md}``; records ``torch.get_num_threads()``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402

ALPHA = 32.0  # LoraExpertConfig's default: scaling alpha / r = 2 at rank 16
# whisper-base's dimensions (openai/whisper-base config.json)
WHISPER_BASE = {"d_model": 512, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "encoder_layers": 6,
                "decoder_layers": 6, "encoder_attention_heads": 8, "decoder_attention_heads": 8,
                "vocab_size": 51865, "num_mel_bins": 80, "max_source_positions": 1500,
                "max_target_positions": 448}
# our method -> (peft combination type, peft density) for the like-named peft call; None: no counterpart.
# peft's density is the fraction kept: our TIES/magnitude density 0.2, our DARE drop_rate 0.5 -> keep 0.5.
PEFT_SAME_NAME = {"linear": ("cat", None), "svd": ("svd", None), "ties": ("ties", 0.2),
                  "dare_linear": ("dare_linear", 0.5), "dare_ties": ("dare_ties", 0.5),
                  "magnitude_prune": ("magnitude_prune", 0.2), "lors": None, "task_arithmetic": ("cat", None)}
# the same method on dense deltas in peft: then truncated to rank r by SVD.
PEFT_DENSE = {"ties": ("ties_svd", 0.2), "dare_linear": ("dare_linear_svd", 0.5),
              "dare_ties": ("dare_ties_svd", 0.5), "magnitude_prune": ("magnitude_prune_svd", 0.2)}


def decoder_expert_shapes(d_model: int, ffn: int, layers: int) -> dict[str, tuple[int, int]]:
    """(out, in) of every module a default decoder-only expert adapts, by Whisper module path."""
    shapes = {}
    for i in range(layers):
        prefix = f"model.decoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{prefix}.self_attn.{proj}"] = (d_model, d_model)
        for proj in ("q_proj", "out_proj"):
            shapes[f"{prefix}.encoder_attn.{proj}"] = (d_model, d_model)
        shapes[f"{prefix}.fc1"] = (ffn, d_model)
        shapes[f"{prefix}.fc2"] = (d_model, ffn)
    return shapes


def random_expert(shapes: dict, rank: int, seed: int) -> dict:
    """LoRA tensors ``<module>.lora_A`` (rank, in) / ``.lora_B`` (out, rank), both random (a trained expert's B is
    nonzero; pruning a zero B would be trivially fast)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (o, i) in shapes.items():
        out[f"{module}.lora_A"] = torch.randn(rank, i, generator=g) / i ** 0.5
        out[f"{module}.lora_B"] = 0.01 * torch.randn(o, rank, generator=g)
    return out


def timed(fn, repeats: int, after=None) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn(r)``; ``after(r)`` (untimed) runs after each."""
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - start)
        if after is not None:
            after(r)
    return times


def peft_model_with(experts: list[dict], workdir: Path):
    """A random whisper-base-sized Whisper wrapped in a PeftModel holding ``experts`` as adapters e0, e1, ..."""
    import torch
    from peft import PeftModel
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from lora_experts.peft_format import write_peft_adapter

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**WHISPER_BASE)).eval()
    peft_model = None
    for i, tensors in enumerate(experts):
        path = write_peft_adapter(tensors, {"alpha": ALPHA}, workdir / f"e{i}", "whisper-base-sized")
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=f"e{i}")
        else:
            peft_model.load_adapter(str(path), adapter_name=f"e{i}")
    return peft_model


def peft_deltas(peft_model, adapter: str) -> dict:
    """Parameter name -> the adapter's dense delta, for comparison with our task vectors."""
    prefix = "base_model.model."
    return {f"{name[len(prefix):]}.weight": module.get_delta_weight(adapter) for name, module in
            peft_model.named_modules() if hasattr(module, "lora_A") and adapter in module.lora_A}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a busy 2-core machine 2 threads were ~10x slower)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method and side; the median is reported")
    p.add_argument("--experts", type=int, default=8, help="experts fused (default 8)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of each expert (default 16)")
    p.add_argument("--no-peft-dense", dest="peft_dense", action="store_false",
                   help="skip peft's *_svd variants (the slow column)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    import peft
    import torch
    from transformers.utils import logging as hf_logging

    from lora_experts.merge import MERGE_METHODS, merge
    from lora_experts.task_vectors import dense, lora_task_vector

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    shapes = decoder_expert_shapes(WHISPER_BASE["d_model"], WHISPER_BASE["decoder_ffn_dim"],
                                   WHISPER_BASE["decoder_layers"])
    experts = [random_expert(shapes, args.rank, seed) for seed in range(args.experts)]
    task_vectors = [lora_task_vector(t, {"alpha": ALPHA}) for t in experts]
    n = args.experts
    uniform = [1.0 / n] * n
    # task_arithmetic's default weights: the target at 1, the supports averaged (lam 1).
    arithmetic = [1.0] + [1.0 / (n - 1)] * (n - 1) if n > 1 else [1.0]
    methods = {}
    for name, fn in MERGE_METHODS.items():  # an alias ("dare" = "dare_linear") is timed once
        if fn not in methods.values():
            methods[name] = fn

    with tempfile.TemporaryDirectory() as workdir:
        peft_model = peft_model_with(experts, Path(workdir))
        adapters = [f"e{i}" for i in range(n)]
        names = iter(range(10**6))

        def run_peft(combination, density, weights, keep=False):
            name = f"m{next(names)}"
            peft_model.add_weighted_adapter(adapters, weights, name, combination_type=combination, density=density)
            if not keep:
                peft_model.delete_adapter(name)
            return name

        # Warm-up, untimed: first calls pay for allocator growth and lazy initialisation.
        merge(task_vectors, uniform, "linear", device="cpu")
        run_peft("cat", None, uniform)

        rows = {}
        for method in methods:
            weights = None if method == "task_arithmetic" else uniform
            torch.manual_seed(0)
            row = {"ours_runs": timed(lambda r: merge(task_vectors, weights, method, device="cpu"), args.repeats)}
            row["ours_s"] = statistics.median(row["ours_runs"])
            result = merge(task_vectors, weights, method, device="cpu")
            row["ours_relative_error"] = result.relative_error
            counterpart = PEFT_SAME_NAME.get(method)
            if counterpart is not None:
                combination, density = counterpart
                pw = arithmetic if method == "task_arithmetic" else uniform
                runs = []
                for _ in range(args.repeats):  # the timed call creates the adapter; deleting it is not timed
                    start = time.perf_counter()
                    name = run_peft(combination, density, pw, keep=True)
                    runs.append(time.perf_counter() - start)
                    if combination in ("cat", "svd") and "max_abs_difference" not in row:  # exact: same result as ours?
                        theirs = peft_deltas(peft_model, name)
                        row["max_abs_difference"] = max(float((dense(result.task_vector[k]) - v).abs().max())
                                                        for k, v in theirs.items())
                        row["max_abs_delta"] = max(float(v.abs().max()) for v in theirs.values())
                    peft_model.delete_adapter(name)
                row.update(peft=combination, peft_density=density, peft_runs=runs, peft_s=statistics.median(runs),
                           ratio=statistics.median(runs) / row["ours_s"])
            if args.peft_dense and method in PEFT_DENSE:
                combination, density = PEFT_DENSE[method]
                runs = timed(lambda r: run_peft(combination, density, uniform), args.repeats)
                row.update(peft_dense=combination, peft_dense_runs=runs, peft_dense_s=statistics.median(runs),
                           dense_ratio=statistics.median(runs) / row["ours_s"])
            rows[method] = row
            print(f"{method}: ours {row['ours_s']:.3f} s"
                  + (f", peft {row['peft']} {row['peft_s']:.3f} s" if "peft_s" in row else "")
                  + (f", peft {row['peft_dense']} {row['peft_dense_s']:.3f} s" if "peft_dense_s" in row else ""),
                  flush=True)

    meta = {"experts": n, "rank": args.rank, "alpha": ALPHA, "modules": len(shapes), "shapes": "whisper-base decoder",
            "repeats": args.repeats, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "device": "cpu",
            "torch": torch.__version__, "peft": peft.__version__,
            "command": recorded(Path(__file__).name, argv)}
    slowest = max(rows, key=lambda m: rows[m]["ours_s"])
    meta["goal"] = {"slowest_method": slowest, "seconds": rows[slowest]["ours_s"],
                    "under_one_second": rows[slowest]["ours_s"] < 1.0}

    def cell(row, key, fmt="{:.3f}"):
        return fmt.format(row[key]) if key in row else "-"

    lines = ["| method | ours (s) | peft, same name | peft (s) | peft / ours | same result | "
             "peft on dense deltas + SVD | peft (s) | peft / ours |", "|---" * 9 + "|"]
    for method, row in rows.items():
        if "max_abs_difference" in row:
            same = f"yes (max diff {row['max_abs_difference']:.1e})"
        elif "peft" in row:
            same = "no: prunes A, B factors"
        else:
            same = "-"
        lines.append(f"| {method} | {cell(row, 'ours_s')} | {row.get('peft', 'none')} | {cell(row, 'peft_s')} | "
                     f"{cell(row, 'ratio', '{:.1f}x')} | {same} | {row.get('peft_dense', '-')} | "
                     f"{cell(row, 'peft_dense_s')} | {cell(row, 'dense_ratio', '{:.1f}x')} |")
    md = "\n".join(lines) + (
        f"\n\n{n} experts of rank {args.rank} on whisper-base's {len(shapes)} decoder modules (d_model 512, ffn 2048), "
        f"weights 1/{n}, default options; median of {args.repeats} call(s) after a warm-up, CPU, "
        f"{torch.get_num_threads()} thread(s) of {os.cpu_count()} cores; torch {torch.__version__}, peft "
        f"{peft.__version__}. Slowest of ours: {slowest}, {rows[slowest]['ours_s']:.3f} s "
        f"(goal: under 1 s: {'met' if meta['goal']['under_one_second'] else 'NOT met'}).\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge_speed.json").write_text(json.dumps({"meta": meta, "methods": rows}, indent=2))
    (out / "merge_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
