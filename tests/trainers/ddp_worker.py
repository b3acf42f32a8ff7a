"""Helpers that run in the processes of a distributed test (used by test_ddp.py); kept light to import.

As a script it runs ``whisper-experts ARGS`` and has every rank dump the expert it ends with:

    python tests/trainers/ddp_worker.py DUMP_DIR train --strategy ddp --devices 2 ...

Lightning's ``ddp`` strategy starts the other ranks by running this same script again, so each rank wraps the
recipe the same way and writes ``DUMP_DIR/rank<r>.safetensors`` (the expert tensors it returned) and
``DUMP_DIR/rank<r>.json`` (rank, world size, validation history).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def gather_in_process(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: gather validation rows that overlap in one row, write the union to OUT/<rank>.json."""
    import torch

    from trainers.distributed import gather_union

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Row 2 is on both ranks (the padding repeat); each rank holds a row the other lacks.
        rows = {0: ("a", "a"), 2: ("c", "x")} if rank == 0 else {1: ("b", "b"), 2: ("c", "x")}
        Path(out, f"{rank}.json").write_text(json.dumps(gather_union(rows)))
    finally:
        torch.distributed.destroy_process_group()


def _dumping(train, dump: Path):
    def run(cfg):
        from safetensors.torch import save_file

        expert, report = train(cfg)
        rank = report["rank"]
        save_file(expert.tensors, str(dump / f"rank{rank}.safetensors"))
        (dump / f"rank{rank}.json").write_text(json.dumps({k: report[k] for k in ("rank", "world_size", "history")}))
        return expert, report

    return run


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run as a file
    import trainers.train_lora as recipe
    from trainers.cli import main

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    recipe.train_lora_expert = _dumping(recipe.train_lora_expert, out)
    sys.exit(main(sys.argv[2:]))
