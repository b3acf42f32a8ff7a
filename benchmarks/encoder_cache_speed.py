"""The one-time encoder cache pass: log-mels read as Python lists (before) vs as numpy slices (now), in one run.

    python benchmarks/encoder_cache_speed.py                       # 64 real nl clips, whisper-base, layer 3 (~2 min)
    python benchmarks/encoder_cache_speed.py --clips 256 --device cuda

Training with the default recipe caches the hidden states entering encoder layer 3 of every training clip
(``trainers.data.EncoderCache``) once, then trains on the cache. On an H200 that pass took 2 min 28 s for 1,203
Czech clips, 1 s per batch of 8, while the three encoder layers it runs take milliseconds: each clip's float16
log-mels (80 x 3,000) were read from the featurized dataset as Python lists. Now a batch slice of the dataset's
numpy-format column is read as one array (``trainers.data.feature_column``).

Both sides run the same ``EncoderCache`` code on the same featurized clips (the first ``--clips`` training clips
of ``--language`` in ``--data``), ``--base`` loaded in float32, batch 8, after an untimed warm-up batch:

  before: the dataset's plain ``input_features`` column (each row becomes 240,000 Python floats);
  now:    ``feature_column(rows)`` (numpy format).

Columns: the whole pass (read + encoder + float16 store) and the read alone (the same slices, no encoder), in
seconds per clip, and before/now ratios. The read-alone ratio is what a GPU sees, where the encoder's share is
small; on a CPU the encoder's share dominates the pass. Writes ``<out>/encoder_cache_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402


def read_seconds(column, n: int, batch: int) -> float:
    import numpy as np

    start = time.perf_counter()
    for i in range(0, n, batch):
        np.stack([np.asarray(f, dtype=np.float32) for f in column[i:i + batch]])
    return time.perf_counter() - start


def pass_seconds(column, encoder, layer: int, device: str, batch: int) -> float:
    from trainers.data import EncoderCache

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        EncoderCache(Path(tmp) / "c.npy", encoder, column, batch_size=batch, progress=False, layer=layer,
                     device=device)
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fillets", help="a corpus (whisper-experts corpus fetch fillets)")
    p.add_argument("--language", default="nl")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--base", default="whisper-base")
    p.add_argument("--layer", type=int, default=3, help="cache the input of this encoder layer (train's default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    import torch

    from registry.bases import load_base
    from trainers.corpus.loading import load_corpus
    from trainers.data import feature_column, featurize

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    split = load_corpus(args.data)["train"]
    keep = [i for i, lang in enumerate(split["language"]) if lang == args.language][: args.clips]
    if not keep:
        raise SystemExit(f"no {args.language!r} training clips in {args.data}")
    base = load_base(args.base, device="cpu")
    rows = featurize(split.select(keep), base.processor, desc="features")
    n, b = len(rows), args.batch_size
    sides = {"before": rows["input_features"], "now": feature_column(rows)}
    encoder = base.model.model.encoder
    pass_seconds(feature_column(rows.select(range(b))), encoder, args.layer, device, b)  # warm-up
    result = {"clips": n, "base": args.base, "layer": args.layer, "batch_size": b, "device": device,
              "threads": torch.get_num_threads(), "sides": {}}
    for side, column in sides.items():
        result["sides"][side] = {"pass_s_per_clip": pass_seconds(column, encoder, args.layer, device, b) / n,
                                 "read_s_per_clip": read_seconds(column, n, b) / n}
        print(side, result["sides"][side], flush=True)
    before, now = result["sides"]["before"], result["sides"]["now"]
    result["pass_ratio"] = before["pass_s_per_clip"] / now["pass_s_per_clip"]
    result["read_ratio"] = before["read_s_per_clip"] / now["read_s_per_clip"]
    command = recorded(Path(__file__).name, argv)
    md = ["| log-mels read as | whole pass, ms / clip | read alone, ms / clip |", "|---|---|---|"]
    for side, label in (("before", "Python lists (before)"), ("now", "numpy slices (now)")):
        s = result["sides"][side]
        md.append(f"| {label} | {1000 * s['pass_s_per_clip']:.1f} | {1000 * s['read_s_per_clip']:.1f} |")
    md.append(f"| ratio before / now | {result['pass_ratio']:.2f}x | {result['read_ratio']:.1f}x |")
    md.append(f"\n{n} {args.language} training clips of `{args.data}`, {args.base} encoder up to layer {args.layer} "
              f"in float32 on {device} ({result['threads']} threads), batch {b}. Command: `{command}`\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_cache_speed.json").write_text(json.dumps({"command": command, **result}, indent=2))
    (out / "encoder_cache_speed.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
