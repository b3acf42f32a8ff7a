"""The transcription server as a Ray Serve deployment: N replicas of `whisper-experts serve`, no code of our own.

    WHISPER_EXPERTS_PACKS=s3://my-bucket/packs/eu3.safetensors serve run examples.ray_serve:app

(run from the repository root; `serve run` takes a module path, not a file name). Then, on Ray Serve's HTTP
port (8000) under the route prefix `/` (`serve run --route-prefix /asr ...` puts the API under /asr/v1):

    curl http://127.0.0.1:8000/v1/audio/transcriptions -F file=@talk.wav -F model=auto
    python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
    print(c.audio.transcriptions.create(model='auto', file=open('talk.wav', 'rb')).text)"

Each replica calls :func:`build_whisper_experts` when it starts (``serve.ingress`` accepts such a builder and
Ray runs the app's lifespan, which starts the batcher), so it loads its own base and downloads its own packs:
replicas hold no state, and Ray's proxy spreads requests over them. Configured by environment variables,
which are forwarded to the replicas:

    WHISPER_EXPERTS_PACKS      comma-separated pack paths or fsspec URLs (none: the base model alone)
    WHISPER_EXPERTS_BASE       base name, directory or hub id (default: the first pack's base)
    WHISPER_EXPERTS_DEVICE     cpu, cuda (default: CUDA when the replica has a GPU)
    WHISPER_EXPERTS_REPLICAS   replicas (default 1)
    WHISPER_EXPERTS_CPUS       CPUs each replica reserves (default 1); WHISPER_EXPERTS_GPUS: GPUs (default 0)
    WHISPER_EXPERTS_API_KEY    require "Authorization: Bearer KEY" on /v1 and /admin
    WHISPER_EXPERTS_HOME       where bases are imported and URL packs downloaded

Needs `pip install "ray[serve]"` beside whisper-experts[serve]. Behind Ray's proxy, POST /admin/packs reaches
one replica only: to change the packs of all, change WHISPER_EXPERTS_PACKS (or the files at its URLs) and
deploy again; Ray replaces the replicas one by one. SIGHUP reloads are not installed (the app does not run on
the replica's main thread). See docs/serving.md.
"""

from __future__ import annotations

import os

from ray import serve


def build_whisper_experts():
    """The server's ASGI app, built in a replica from the ``WHISPER_EXPERTS_*`` variables."""
    from inference.serve.factory import build_app

    packs = [p.strip() for p in os.environ.get("WHISPER_EXPERTS_PACKS", "").split(",") if p.strip()]
    return build_app(packs, base=os.environ.get("WHISPER_EXPERTS_BASE") or None,
                     device=os.environ.get("WHISPER_EXPERTS_DEVICE") or None)


# Replicas are started by Ray's workers, which need not share this shell's environment: pass ours along.
_ENV = {k: v for k, v in os.environ.items() if k.startswith("WHISPER_EXPERTS_") or k == "HF_HUB_OFFLINE"}


@serve.deployment(num_replicas=int(os.environ.get("WHISPER_EXPERTS_REPLICAS", "1")),
                  ray_actor_options={"num_cpus": float(os.environ.get("WHISPER_EXPERTS_CPUS", "1")),
                                     "num_gpus": float(os.environ.get("WHISPER_EXPERTS_GPUS", "0")),
                                     "runtime_env": {"env_vars": _ENV}})
@serve.ingress(build_whisper_experts)
class WhisperExperts:
    """One replica: the whole server (``inference.serve``) behind Ray's HTTP proxy."""


app = WhisperExperts.bind()
