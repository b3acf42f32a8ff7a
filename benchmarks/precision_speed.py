"""Training speed by precision: float32 vs bfloat16 autocast (``--precision bf16-mixed``), on the CPU.

    python benchmarks/precision_speed.py                      # whisper-base, batch 16 (~14 min on 2 CPU cores)
    python benchmarks/precision_speed.py --encoder-start 5 --steps 2

In one run, on the same utterances and batches, our Lightning recipe trains two experts for a few steps each:
  decoder      the default decoder-only expert on cached encoder outputs;
  encoder K..  decoder + encoder layers K.. on cached inputs of layer K (``--side both --encoder-start K``),
each in float32 and under bfloat16 autocast, with LoRA dropout 0.05 (the default) and 0 (a dropout mask over
every adapted layer's input, 1,500 frames per utterance on the encoder side, is itself a cost). Variants
alternate over ``--rounds`` rounds and are compared by median step time (a step: the end of one to the end of
the next, after one warm-up step), so drift in machine load hits them all; an untimed first round (one step per
variant) pays the one-off costs (kernel selection, allocator growth) that would otherwise land on whichever
variant runs first. bfloat16 pays off on CPUs with
bfloat16 matrix units (Intel AMX, ``amx_bf16`` in ``lscpu``); elsewhere it can be slower than float32.
Writes ``<out>/precision_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_speed import lightning_run  # noqa: E402


def cpu_flags() -> str:
    """The CPU's bfloat16-relevant feature flags (Linux), for the report."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return " ".join(sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512f"))) or "none"


def run(base, data: str, encoder_start: int | None, precision: str, dropout: float, steps: int,
        batch_size: int, cache_dir: str) -> dict:
    """A few timed training steps of one variant (the base is left as it was)."""
    from lora_experts.config import LoraExpertConfig

    side = "decoder" if encoder_start is None else "both"
    lora = LoraExpertConfig(rank=16, dropout=dropout, side=side, encoder_start=encoder_start or 0)
    return lightning_run(base, data, True, steps, batch_size, cache_dir, lora=lora, encoder_layer=encoder_start,
                         precision=precision)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--data", default="data/uk-expert", help="corpus with uk train utterances (synthesized if missing)")
    p.add_argument("--encoder-start", type=int, default=3, help="the encoder expert adapts layers K.. (default 3)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (plus one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds over all variants (default 2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from registry.bases import load_base
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    if not (Path(args.data) / "dataset_dict.json").is_file():
        synthesize_corpus(SynthConfig(languages=("uk",), per_language=args.batch_size * (args.steps + 1) + 8,
                                      train_fraction=0.9, validation_fraction=0.05, test_fraction=0.05), args.data)
    base = load_base(args.base)
    cache_dir = str(Path(args.data) / ".cache")
    variants = [(side, prec, drop) for side in (None, args.encoder_start) for drop in (0.05, 0.0)
                for prec in ("32-true", "bf16-mixed")]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    for v in variants:  # the untimed warm-up round
        run(base, args.data, v[0], v[1], v[2], 1, args.batch_size, cache_dir)
    for r in range(args.rounds):
        for v in variants:
            res = run(base, args.data, v[0], v[1], v[2], args.steps, args.batch_size, cache_dir)
            times[v] += res["step_s"]
            print(f"round {r + 1}: {v}: median step {res['median_step_s']:.2f} s", flush=True)

    def name(v):
        return "decoder" if v[0] is None else f"decoder + encoder {v[0]}.."

    rows, results = [], []
    for v in variants:
        med = statistics.median(times[v])
        ref = statistics.median(times[(v[0], "32-true", v[2])])
        results.append({"expert": name(v), "precision": v[1], "dropout": v[2], "median_step_s": med,
                        "samples_per_s": args.batch_size / med, "speedup_vs_fp32": ref / med, "step_s": times[v]})
        rows.append(f"| {name(v)} | {v[2]:g} | {v[1]} | {args.batch_size / med:.2f} | {med:.2f} | {ref / med:.2f}x |")
    md = ("| expert | LoRA dropout | precision | samples/s | s/step | vs 32-true |\n|---|---|---|---|---|---|\n"
          + "\n".join(rows) + f"\n\nwhisper-base, rank 16, batch {args.batch_size}; median of {args.rounds} x "
          f"{args.steps} timed steps per variant; {torch.get_num_threads()} threads; CPU flags: {cpu_flags()}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_speed.json").write_text(json.dumps({"results": results, "cpu_flags": cpu_flags(),
                                                          "threads": torch.get_num_threads(),
                                                          "args": vars(args)}, indent=2))
    (out / "precision_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
