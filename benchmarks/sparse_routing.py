"""Routing sparse experts per sample: the block-diagonal sparse matmul vs the simple alternatives, on one layer.

    python benchmarks/sparse_routing.py                 # ~1 min on 2 busy CPU cores (1 thread)
    python benchmarks/sparse_routing.py --density 0.05 --experts 8

One linear layer of whisper-base's shape (fc1: 2048 x 512), ``--experts`` random sparse experts at ``--density``,
``--rows`` rows each routed to one expert (round robin), the update ``D_e x`` of every row for the encoder
(``--frames`` frames per row) and one decoder step (1 frame per row):

  base layer         the dense ``W x`` itself, for scale
  block-diagonal     ``inference.batched_sparse.BatchedSparseDelta`` (what the expert bank runs): one CSR matmul
  dense gathered     each row's dense delta gathered from an (experts, out, in) stack, one batched matmul
  loop per expert    one CSR matmul per expert on its rows (a Python loop over the experts in the batch)

Reported: milliseconds per update (median of ``--repeats``, after a warm-up; the block-diagonal matrix and the
gathered dense deltas are built once per routing, as the bank caches them, and timed apart), the largest
difference from the dense reference, and the memory each keeps per routing. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from inference.batched_layer import Routing
from inference.batched_sparse import BatchedSparseDelta
from lora_experts.sparse import SparseDelta


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-features", type=int, default=2048)
    p.add_argument("--in-features", type=int, default=512)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--frames", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    g = torch.Generator().manual_seed(0)
    out_f, in_f = args.out_features, args.in_features
    weight = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    deltas = []
    for _ in range(args.experts):
        idx = torch.nonzero(torch.rand(out_f * in_f, generator=g) < args.density).flatten()
        deltas.append(SparseDelta(idx, 0.01 * torch.randn(idx.numel(), generator=g), weight.shape))
    layer = BatchedSparseDelta(deltas, weight)
    dense = torch.stack([d.dense() for d in deltas])
    csr = [dense[e].to_sparse_csr() for e in range(args.experts)]
    experts = torch.arange(args.rows) % args.experts
    routing = Routing(experts[:, None], torch.ones(args.rows, 1), version=1)
    print(f"layer {out_f} x {in_f}, {args.experts} experts at density {args.density}, {args.rows} rows, "
          f"{args.threads} thread(s)\n")
    print("| update | frames per row | ms | build per routing, ms | max abs diff | kept per routing |")
    print("|---|---|---|---|---|---|")
    for frames in (args.frames, 1):
        x = torch.randn(args.rows, frames, in_f, generator=g)
        build_block, _ = _time(lambda: (layer.clear_cache(), layer._blocks(*routing.expand(args.rows), True)), 1)
        build_dense, gathered = _time(lambda: dense[experts], 1)

        def loop():
            y = torch.zeros(args.rows, frames, out_f)
            for e in experts.unique().tolist():
                rows = (experts == e).nonzero().flatten()
                xs = x.index_select(0, rows).reshape(-1, in_f)
                y.index_copy_(0, rows, torch.sparse.mm(csr[e], xs.t()).t().reshape(len(rows), frames, out_f))
            return y

        variants = [("base layer (dense W x)", lambda: torch.nn.functional.linear(x, weight), "-", "-"),
                    ("block-diagonal CSR (ours)", lambda: layer.update(x, routing), build_block,
                     f"{args.rows} x nnz coordinates"),
                    ("dense deltas gathered per row", lambda: torch.bmm(x, gathered.transpose(1, 2)), build_dense,
                     f"{args.rows} x {out_f} x {in_f} floats"),
                    ("one CSR matmul per expert (loop)", loop, "-", "-")]
        reference = torch.bmm(x, gathered.transpose(1, 2))
        for name, fn, build, kept in variants:
            ms, out = _time(fn, args.repeats)
            diff = "-" if name.startswith("base") else f"{float((out - reference).abs().max()):.1e}"
            build = build if isinstance(build, str) else f"{build:.1f}"
            print(f"| {name} | {frames} | {ms:.2f} | {build} | {diff} | {kept} |")


if __name__ == "__main__":
    main()
