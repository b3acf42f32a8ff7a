"""Pack load time: attaching a 64-expert pack to a live whisper-base, as the server does on every reload.

    python benchmarks/pack_load.py                          # 64 experts, rank 16, default targets, median of 5
    python benchmarks/pack_load.py --experts 8 --rank 8 --repeats 3 --out /tmp/pack_load

The issue's goal (issue 17, the server): a 64-expert pack loads in under 1 s. The model has whisper-base's
dimensions (d_model 512, 6 + 6 layers, ffn 2048) with random weights: load time does not depend on the
weights' values, and no download is needed. Each expert is a random LoRA expert of rank ``--rank`` (B nonzero)
on the project's default targets (decoder self-attention q/k/v/out, cross-attention q/out, fc1/fc2 of the 6
decoder layers, 48 modules), so the pack holds what ``pack create`` would write for trained experts.

Timed, each the median of ``--repeats`` runs after one untimed warm-up (every run on a fresh copy of the model
that shares its weights, as the server makes one per reload):

  load_pack            ``inference.packs.load_pack``: read the file memory-mapped, check manifests and each
                       expert's tensor digest, attach every expert to the bank (stacked per layer)
  load_pack, no verify the same without re-hashing the tensors (``verify=False``)
  server reload        ``inference.serve.state.PackLoader.load``: the copy, ``load_pack`` and the checked
                       decoding options, i.e. what ``POST /admin/packs`` or SIGHUP costs before the swap

Writes ``<out>/pack_load.{json,md}`` (default ``benchmarks/results``) with the command at the top.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402

WHISPER_BASE = {"d_model": 512, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "encoder_layers": 6,
                "decoder_layers": 6, "encoder_attention_heads": 8, "decoder_attention_heads": 8,
                "vocab_size": 51865, "num_mel_bins": 80, "max_source_positions": 1500, "max_target_positions": 448}
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "encoder_attn.q_proj",
           "encoder_attn.out_proj", "fc1", "fc2")
GOAL_SECONDS = 1.0


def whisper_base_sized():
    """A ``registry.bases.Base`` around a randomly initialised model of whisper-base's size."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from registry.bases import Base

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**WHISPER_BASE)).eval()
    return Base("whisper-base-sized", model, None, "b" * 16, "t" * 16)


def make_pack(base, path: Path, experts: int, rank: int) -> int:
    """Write a pack of ``experts`` random LoRA experts; returns its size in bytes."""
    import torch

    from registry.expert_file import Expert, new_manifest
    from registry.packs import create_pack

    shapes = {name: tuple(m.weight.shape) for name, m in base.model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".decoder.layers." in name and name.endswith(TARGETS)}
    hyper = {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "target_modules": ["q_proj"], "side": "decoder"}
    pack = {}
    for n in range(experts):
        g = torch.Generator().manual_seed(n)
        tensors = {}
        for module, (o, i) in shapes.items():
            tensors[f"{module}.lora_A"] = torch.randn(rank, i, generator=g) / i ** 0.5
            tensors[f"{module}.lora_B"] = torch.randn(o, rank, generator=g) * 0.01
        pack[f"expert-{n:02d}"] = Expert(tensors, new_manifest("lora", [f"x{n}"], base, hyper))
    create_pack(path, pack)
    return path.stat().st_size


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page cache, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    import dataclasses

    import torch

    from inference.packs import load_pack
    from inference.serve.state import PackLoader, ServeConfig, shared_copy

    base = whisper_base_sized()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pack.safetensors"
        size = make_pack(base, path, args.experts, args.rank)

        def attach(verify=True):
            load_pack(dataclasses.replace(base, model=shared_copy(base.model)), path, verify=verify)

        loader = PackLoader(base, ServeConfig(packs=(str(path),)))
        rows = [("load_pack", median_seconds(attach, args.repeats)),
                ("load_pack, no verify", median_seconds(lambda: attach(False), args.repeats)),
                ("server reload (PackLoader.load)", median_seconds(lambda: loader.load((str(path),)), args.repeats))]
    command = recorded(Path(__file__).name, argv)
    result = {"command": command, "experts": args.experts, "rank": args.rank, "modules_per_expert": len(TARGETS) * 6,
              "pack_mb": round(size / 2 ** 20, 1), "repeats": args.repeats, "threads": torch.get_num_threads(),
              "goal_seconds": GOAL_SECONDS, "seconds": {name: round(s, 4) for name, s in rows}}
    lines = [f"`{command}`", "",
             f"{args.experts} random LoRA experts of rank {args.rank} on whisper-base's 48 default decoder modules "
             f"({result['pack_mb']} MB pack), attached to a live whisper-base-sized model; median of {args.repeats}, "
             f"{result['threads']} torch threads. Goal: under {GOAL_SECONDS:g} s.", "",
             "| step | seconds | goal |", "|---|---|---|"]
    for name, s in rows:
        lines.append(f"| {name} | {s:.3f} | {'met' if s < GOAL_SECONDS else 'missed'} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pack_load.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "pack_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
