"""Training speed of a decoder-only LoRA expert: encoder cache vs none, and framework overhead vs plain PEFT.

    python benchmarks/train_speed.py                       # whisper-base, batch 16 (~6 min on 2 CPU cores)
    python benchmarks/train_speed.py --base /path/to/tiny --steps 3

In one run, on the same utterances and batches:
  (a) our Lightning recipe with the encoder-output cache,
  (b) our Lightning recipe without it (the frozen encoder runs every step),
  (c) a hand-written PEFT + PyTorch loop (get_peft_model, AdamW, the same cached encoder outputs).
Reports samples/s and the ratios a/b (cache speed-up; goal >= 3x) and c/a (framework overhead; goal <= 5%).

A step's time is the wall time between the ends of consecutive steps, so it includes everything the loop
does per step (data fetching, hooks, logging, the optimizer and scheduler), not only forward and backward.
The first step of each run is a warm-up and is not timed. (a) and (c) run ``--rounds`` times, alternating,
on the same batches, and the overhead compares median step times, so drift in machine load hits both.
Writes ``<out>/train_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402


class StepTimer:
    """Step times as differences between the ends of consecutive steps (the first step is a warm-up)."""

    def __init__(self):
        self.last = None
        self.times: list[float] = []
        self.samples = 0

    def step_end(self, batch) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
            self.samples += batch["labels"].shape[0]
        self.last = now

    def result(self) -> dict:
        import statistics

        elapsed = sum(self.times)
        return {"samples_per_s": self.samples / elapsed, "steps": len(self.times), "seconds": elapsed,
                "median_step_s": statistics.median(self.times), "step_s": [round(t, 3) for t in self.times]}

    def callback(self):
        import lightning as L

        timer = self

        class _CB(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                timer.step_end(batch)

        return _CB()


def lightning_run(base, data, cache: bool, steps: int, batch_size: int, cache_dir: str,
                  cross_attention_kv: bool = False, lora=None, encoder_layer: int | None = None,
                  precision: str = "32-true") -> dict:
    """Time ``steps`` training steps (after one warm-up) of our Lightning recipe on uk utterances.

    Args:
        cache: cache the frozen encoder side (its outputs, or the input of ``encoder_layer``).
        lora: the expert's ``LoraExpertConfig`` (default: rank 16, decoder-only, ``cross_attention_kv``).
        encoder_layer: with ``cache``, cache the input of this encoder layer (a top-encoder ``lora``).
        precision: Lightning precision.
    """
    import lightning as L

    from lora_experts.config import LoraExpertConfig
    from lora_experts.model import remove_experts
    from trainers.data import ExpertDataModule
    from trainers.lora_module import LoraExpertModule

    L.seed_everything(0, verbose=False)
    lora = lora or LoraExpertConfig(rank=16, cross_attention_kv=cross_attention_kv)
    module = LoraExpertModule(base.model, base.processor, lora, lr=1e-4)
    dm = ExpertDataModule(data, base.processor, ["uk"], batch_size, max_train=batch_size * (steps + 1),
                          max_validation=1, encoder=base.model.model.encoder if cache else None,
                          encoder_layer=encoder_layer, cache_dir=cache_dir, base_fingerprint=base.fingerprint,
                          progress=False)
    dm.setup()
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps + 1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer.callback()],
                        num_sanity_val_steps=0, use_distributed_sampler=False, precision=precision)
    trainer.fit(module, datamodule=dm)
    remove_experts(base.model)
    return timer.result()


def plain_peft_run(base, data, steps: int, batch_size: int, cache_dir: str) -> dict:
    """The same training, hand-written: peft's get_peft_model and a bare PyTorch loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.modeling_outputs import BaseModelOutput

    from lora_experts.config import LoraExpertConfig
    from trainers.data import IGNORE, ExpertDataModule

    torch.manual_seed(0)
    dm = ExpertDataModule(data, base.processor, ["uk"], batch_size, max_train=batch_size * (steps + 1),
                          max_validation=1, encoder=base.model.model.encoder, cache_dir=cache_dir,
                          base_fingerprint=base.fingerprint)
    dm.setup()
    cfg = LoraExpertConfig(rank=16)
    peft_model = get_peft_model(base.model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules=cfg.target_regex()))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    timer = StepTimer()
    for i, batch in enumerate(dm.train_dataloader()):
        if i > steps:
            break
        enc = BaseModelOutput(last_hidden_state=batch["encoder_hidden_states"])
        logits = peft_model(encoder_outputs=enc, decoder_input_ids=batch["decoder_input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"], ignore_index=IGNORE)
        loss.backward()
        opt.step()
        opt.zero_grad()
        timer.step_end(batch)
    peft_model.unload()
    return timer.result()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--data", default="data/uk-expert", help="corpus with uk train utterances (synthesized if missing)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (plus one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of (a) and (c) (default 2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--cross-attention-kv", action="store_true",
                   help="only time (a) with and without cross-attention k/v LoRA (what the opt-in costs)")
    args = p.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from registry.bases import load_base
    from trainers.corpus.synth import SynthConfig, synthesize_corpus

    if not (Path(args.data) / "dataset_dict.json").is_file():
        synthesize_corpus(SynthConfig(languages=("uk",), per_language=200, seed=1), args.data)
    base = load_base(args.base, device="cpu")
    cache_dir = str(Path(args.data) / ".cache")
    if args.cross_attention_kv:
        plain = lightning_run(base, args.data, True, args.steps, args.batch_size, cache_dir)
        kv = lightning_run(base, args.data, True, args.steps, args.batch_size, cache_dir, cross_attention_kv=True)
        md = (f"| expert targets | samples/s | s/step |\n|---|---|---|\n"
              f"| default (cross-attention q/out) | {plain['samples_per_s']:.2f} | "
              f"{plain['seconds'] / plain['steps']:.2f} |\n"
              f"| + cross-attention k/v | {kv['samples_per_s']:.2f} | {kv['seconds'] / kv['steps']:.2f} |\n")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "train_speed_cross_kv.md").write_text(md)
        print(md)
        return 0
    import statistics

    rounds = {"lightning_cache": [], "plain_peft_cache": []}
    for r in range(args.rounds):  # alternate, so slow drift in machine load hits both alike
        order = ("lightning_cache", "plain_peft_cache") if r % 2 == 0 else ("plain_peft_cache", "lightning_cache")
        for name in order:
            run = lightning_run if name == "lightning_cache" else plain_peft_run
            extra = (True,) if name == "lightning_cache" else ()
            rounds[name].append(run(base, args.data, *extra, args.steps, args.batch_size, cache_dir))
    results = {name: {"median_step_s": statistics.median(t for x in runs for t in x["step_s"]),
                      "samples_per_s": sum(x["samples_per_s"] for x in runs) / len(runs), "runs": runs}
               for name, runs in rounds.items()}
    results["lightning_no_cache"] = lightning_run(base, args.data, False, args.steps, args.batch_size, cache_dir)
    # Same batches in every run: samples/s from median step times compares like with like.
    per_step = args.batch_size
    a, c = (per_step / results[k]["median_step_s"] for k in ("lightning_cache", "plain_peft_cache"))
    b = per_step / results["lightning_no_cache"]["median_step_s"]
    results["ratios"] = {"cache_speedup": a / b, "framework_overhead": c / a - 1}
    results["meta"] = {"base": base.name, "batch_size": args.batch_size, "steps": args.steps,
                       "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "command": recorded(Path(__file__).name, argv)}
    md = ("| variant | samples/s | vs (a) |\n|---|---|---|\n"
          f"| (a) Lightning, encoder cache | {a:.2f} | 1.00x |\n"
          f"| (b) Lightning, no cache | {b:.2f} | {b / a:.2f}x |\n"
          f"| (c) plain PEFT + PyTorch loop, encoder cache | {c:.2f} | {c / a:.2f}x |\n\n"
          f"Cache speed-up (a)/(b): **{a / b:.1f}x**; framework overhead (c)/(a) - 1: **{100 * (c / a - 1):+.1f}%** "
          f"({base.name}, batch {args.batch_size}, rank 16 decoder-only LoRA; median step time over "
          f"{args.rounds} alternating runs of {args.steps} timed steps for (a) and (c), one run for (b); "
          f"{torch.get_num_threads()} threads).\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps(results, indent=2))
    (out / "train_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
