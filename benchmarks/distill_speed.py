"""Cost of knowledge distillation per training step of a CLSR student: no KD vs cached teacher vs online teacher.

    python benchmarks/distill_speed.py                          # whisper-base student and teacher, uk+pt, batch 16
    python benchmarks/distill_speed.py --side both              # the paper's layout (encoder FFNs too; slow on CPU)
    python benchmarks/distill_speed.py --teacher whisper-base+uk-teacher --path lowrank
    python benchmarks/distill_speed.py --base /path/to/tiny --teacher /path/to/tiny --steps 2 --batch-size 4

On the same one-language batches, in one process:
  (a) CLSR, no KD (CE + gate budget),
  (b) CLSR + KD from the cached teacher (top-k log-probabilities read from disk per batch),
  (c) CLSR + KD from the online teacher (a teacher forward per step).
Each variant reads its batches as the trainer would (``trainers.train_distill.encoder_cache_plan``): with
``--side decoder`` (default) the student leaves the encoder alone, so (a) and (b) train on cached encoder
outputs, while (c) reads the audio features every step because its teacher runs the whole model on them.
The teacher cache is filled once before the timed runs; its fill time and the probability mass its top-k keeps are
reported beside the step times. Every run trains the same batches, so the ratio of median step times is the ratio
of epoch costs: the goal is (b)/(a) <= 1.2. Step times are measured as in ``train_speed.py`` (between the ends of
consecutive steps, first step untimed); the variants run ``--rounds`` times in alternating order so drift in machine
load hits all alike. Writes ``<out>/distill_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.command import recorded  # noqa: E402

from benchmarks.train_speed import StepTimer  # noqa: E402

VARIANTS = {"none": "(a) CLSR, no KD", "cached": "(b) CLSR + KD, cached teacher",
            "online": "(c) CLSR + KD, online teacher"}


def timed_run(base, data, languages, source, steps: int, clsr, precision: str) -> dict:
    """``steps`` timed steps (plus one warm-up) of a fresh CLSR student; the base is restored afterwards."""
    import lightning as L

    from distill.clsr import convert_from_clsr
    from trainers.clsr_module import ClsrExpertModule

    L.seed_everything(0, verbose=False)
    module = ClsrExpertModule(base.model, base.processor, languages, clsr, teacher=source, lr=1e-4)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps + 1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer.callback()],
                        num_sanity_val_steps=0, use_distributed_sampler=False, precision=precision)
    try:
        trainer.fit(module, datamodule=data)
    finally:
        convert_from_clsr(base.model.cpu())
    return timer.result()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="whisper-base", help="student base")
    p.add_argument("--teacher", default=None, help="teacher spec (default: the student's base)")
    p.add_argument("--data", default="data/uk-pt-distill", help="corpus (synthesized for --languages if missing)")
    p.add_argument("--languages", default="uk,pt")
    p.add_argument("--path", choices=["full", "lowrank"], default="full", help="CLSR language path")
    p.add_argument("--side", default="decoder", choices=["decoder", "both", "encoder"], help="CLSR layout")
    p.add_argument("--encoder-start", type=int, default=0, help="with --side both/encoder: CLSR encoder layers >= K")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (plus one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of every variant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache", default=None,
                   help="work directory for the teacher and encoder caches (default: a fresh temporary one)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from distill.clsr import ClsrConfig
    from distill.sources import CachedTeacher, OnlineTeacher
    from distill.teacher_cache import TeacherCache
    from distill.teachers import load_teachers
    from registry.bases import load_base
    from trainers.corpus.synth import SynthConfig, synthesize_corpus
    from trainers.language_batches import DistillDataModule
    from trainers.train_distill import encoder_cache_plan

    languages = [x.strip() for x in args.languages.split(",") if x.strip()]
    per_language = math.ceil((args.steps + 1) / len(languages)) * args.batch_size
    if not (Path(args.data) / "dataset_dict.json").is_file():
        synthesize_corpus(SynthConfig(languages=tuple(languages), per_language=int(per_language / 0.7) + 4, seed=1),
                          args.data)
    cuda = torch.cuda.is_available()
    base = load_base(args.base, device="cpu")
    teachers = load_teachers(args.teacher or args.base, base, device="cuda" if cuda else "cpu")
    clsr = ClsrConfig(kind=args.path, side=args.side, encoder_start=args.encoder_start)
    work = Path(args.cache or tempfile.mkdtemp(prefix="distill-speed-"))

    modules = {}  # one data module per encoder-cache plan: variants that read the same batches share it

    def data_for(source):
        """The batches the trainer would read with this teacher source (encoder outputs cached or not)."""
        plan = encoder_cache_plan(clsr, source)
        if plan not in modules:
            cache, layer = plan
            modules[plan] = DistillDataModule(
                args.data, base.processor, languages, args.batch_size, max_train=per_language, max_validation=1,
                encoder=base.model.model.encoder if cache else None, encoder_layer=layer,
                cache_dir=str(work / "encoder") if cache else None, base_fingerprint=base.fingerprint, progress=False)
            modules[plan].setup()
        return modules[plan]

    plain = data_for(OnlineTeacher(teachers))
    cached = CachedTeacher(teachers, TeacherCache(str(work / "teacher"), args.top_k), batch_size=args.batch_size)
    t0 = time.perf_counter()
    fill = cached.prepare(plain.datasets["train"].rows)
    fill["wall_seconds"] = round(time.perf_counter() - t0, 2)
    sources = {"none": None, "cached": cached, "online": OnlineTeacher(teachers)}
    datas = {name: data_for(source) for name, source in sources.items()}
    precision = "bf16-mixed" if cuda else "32-true"

    runs: dict[str, list] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            runs[name].append(timed_run(base, datas[name], languages, sources[name], args.steps, clsr, precision))
    median = {name: statistics.median(t for run in rs for t in run["step_s"]) for name, rs in runs.items()}
    ratios = {"cached_vs_none": median["cached"] / median["none"], "online_vs_none": median["online"] / median["none"]}
    epoch_steps = len(datas["none"].train_dataloader())
    results = {"median_step_s": median, "ratios": ratios, "cache_fill": fill, "runs": runs,
               "meta": {"base": base.name, "teacher": args.teacher or args.base, "path": args.path,
                        "side": args.side, "encoder_start": args.encoder_start,
                        "languages": languages, "batch_size": args.batch_size, "steps": args.steps,
                        "rounds": args.rounds, "top_k": args.top_k, "device": "cuda" if cuda else "cpu",
                        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "command": recorded(Path(__file__).name, argv)}}
    rows = "\n".join(f"| {label} | {median[name]:.3f} | {args.batch_size / median[name]:.2f} | "
                     f"{median[name] / median['none']:.2f}x |" for name, label in VARIANTS.items())
    mass = fill["mass_kept"]
    md = ("| variant | median s/step | samples/s | epoch cost vs (a) |\n|---|---|---|---|\n" + rows + "\n\n"
          f"Cached KD costs **{ratios['cached_vs_none']:.2f}x** a no-KD epoch (goal <= 1.2x), online KD "
          f"**{ratios['online_vs_none']:.2f}x**. The one-time cache fill took {fill['wall_seconds']:.1f} s for "
          f"{fill['utterances']} utterances (about {fill['wall_seconds'] / (epoch_steps * median['none']):.2f} no-KD "
          f"epochs of this data); its top-{args.top_k} keeps {100 * mass['mean']:.1f}% of the teacher's probability "
          f"mass on average (min {100 * mass['min']:.1f}%). Student {base.name} ({args.path} paths, CLSR on the "
          f"{args.side if args.side != 'both' else f'encoder from layer {args.encoder_start} and the decoder'}; "
          f"{'(a) and (b) on cached encoder outputs' if encoder_cache_plan(clsr, None)[0] else 'no encoder cache'}), "
          f"teacher "
          f"{args.teacher or args.base}, batch {args.batch_size}, {args.rounds} alternating rounds of {args.steps} "
          f"timed steps, {'CUDA bf16-mixed' if cuda else f'CPU, {torch.get_num_threads()} threads'}.\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_speed.json").write_text(json.dumps(results, indent=2))
    (out / "distill_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
