"""Cost of one fusion-search trial: the whole encoder run per trial against only the layers a candidate changes.

    python benchmarks/fusion_search_speed.py                     # the real-fusion experts, 48 Czech dev clips
    python benchmarks/fusion_search_speed.py --clips 151 --repeats 3

Every candidate of ``fuse --dev`` (``trainers.fusion``) is applied to the base and the dev clips decoded. Experts
of ``train``'s default recipe adapt encoder layers 3.. and the decoder, so the encoder layers below 3 give the
same output for every candidate: the scorer now runs them once and starts each trial from the input of layer 3
(``DevScorer(encoder_start=3)``), where it used to run the whole encoder on the log-mel features each trial
(``encoder_start=0``, still used when a candidate changes the convolutions). Both scorers are built on the same
clips, the same candidate is applied (target 1, support 0.25), and their calls alternate, so both see the same
machine load; the table gives the median seconds per trial, the ratio, and whether the two transcribed every clip
identically. The one-time cost (features, the lower layers) is reported too.

The experts default to those ``python benchmarks/real_fusion.py --supports sk:synth,pl:synth`` trains (Czech on
100 real clips, Slovak on espeak-ng speech); any two expert files of the base will do.

Writes ``<out>/fusion_search_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--experts", default="runs/real-fusion/cs-real-100.safetensors,runs/real-fusion/sk-espeak.safetensors",
               help="target expert file, then support expert files (comma-separated)")
p.add_argument("--data", default="data/fillets", help="corpus whose validation clips are decoded")
p.add_argument("--language", default="cs")
p.add_argument("--clips", type=int, default=48, help="validation clips decoded per trial (default 48)")
p.add_argument("--repeats", type=int, default=3, help="calls of each scorer (alternating; default 3)")
p.add_argument("--base", default="whisper-base")
p.add_argument("--out", default=str(Path(__file__).parent / "results"))


def main(argv=None) -> int:
    args = p.parse_args(argv)
    import torch

    from inference.evaluation import utterances_from_dataset
    from lora_experts.task_vectors import task_vector
    from registry.bases import load_base
    from registry.expert_file import check_compatible, load_expert
    from trainers.corpus.loading import load_corpus
    from trainers.fusion import DevScorer, FusionApplier, first_changed_encoder_layer

    files = [f.strip() for f in args.experts.split(",") if f.strip()]
    for f in files:
        if not Path(f).is_file():
            p.error(f"--experts: no expert file {f} (python benchmarks/real_fusion.py trains the defaults)")
    base = load_base(args.base, device="cpu")
    experts = [load_expert(f) for f in files]
    for f, e in zip(files, experts):
        check_compatible(e.manifest, base, what=f"expert {f}")
    tvs = [task_vector(e) for e in experts]
    start = first_changed_encoder_layer(tvs, base.model.config.encoder_layers)
    dev = utterances_from_dataset(load_corpus(args.data)["validation"], [args.language])[:args.clips]
    torch.manual_seed(0)
    setup, scorers = {}, {}
    for name, layer in (("whole encoder", 0), (f"layers {start}..", start)):
        t0 = time.perf_counter()
        scorers[name] = DevScorer(base.model, base.processor, dev, encoder_start=layer)
        setup[name] = time.perf_counter() - t0
    applier = FusionApplier(base.model, tvs, "linear")
    weights = [1.0] + [0.25] * (len(tvs) - 1)
    applier.apply(weights)
    seconds = {name: [] for name in scorers}
    hyps = {}
    try:
        for _ in range(args.repeats):
            for name, scorer in scorers.items():
                t0 = time.perf_counter()
                out = scorer()
                seconds[name].append(time.perf_counter() - t0)
                hyps[name] = out["hypotheses"]
    finally:
        applier.clear()
    full, part = scorers
    med = {name: statistics.median(s) for name, s in seconds.items()}
    results = {
        "command": recorded(Path(__file__).name, argv),
        "experts": files, "encoder_start": start, "clips": len(dev), "weights": weights,
        "threads": torch.get_num_threads(),
        "setup_seconds": setup, "trial_seconds": seconds, "median_trial_seconds": med,
        "speedup": med[full] / med[part], "identical_transcripts": hyps[full] == hyps[part]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion_search_speed.json").write_text(json.dumps(results, indent=2))
    md = ["| dev scorer | one-time setup s | s per trial (median) | speed-up |", "|---|---|---|---|"]
    for name in scorers:
        md.append(f"| {name} per trial | {setup[name]:.1f} | {med[name]:.1f} | {med[full] / med[name]:.2f}x |")
    md.append(f"\n{len(dev)} {args.language} validation clips, {args.base}, {len(files)} experts (lowest changed "
              f"encoder layer {start}), {args.repeats} alternating calls each, {torch.get_num_threads()} threads. "
              f"Identical transcripts: {'yes' if results['identical_transcripts'] else 'NO'}. "
              f"Command: `{results['command']}`\n")
    (out / "fusion_search_speed.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
