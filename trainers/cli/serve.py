"""``whisper-experts serve``: an OpenAI-compatible transcription server on packs of experts."""

from __future__ import annotations

import argparse
import sys

from inference.serve.factory import API_KEY_ENV  # a light module: --help stays free of model code
from trainers.cli.common import add_clsr_gates_argument

DESCRIPTION = f"""\
Serve OpenAI's audio transcription API (POST /v1/audio/transcriptions, /v1/audio/translations) with a base
Whisper and packs of experts (whisper-experts pack create). OpenAI's clients work unchanged: point their
base_url at http://HOST:PORT/v1. A request's `model` chooses who serves it:
  auto (or whisper-1)   language ID per 30 s window (or the learned router of --router) picks each window's
                        language and expert, as `transcribe --language auto` does
  EXPERT                that expert, in the request's `language` or else the expert's own
  LANGUAGE (uk)         that language's expert in the packs, else the base model
  base / BASE NAME      the base model alone
response_format: json (text, language, expert, duration), text, srt, vtt, verbose_json (segments). `prompt`
and `temperature` are accepted and not used (decoding is greedy).

Windows of concurrent requests are batched together (up to --max-batch windows, waiting at most --max-wait-ms
for batch-mates) and decoded in one generate call, each window by its own expert; a request's text does not
depend on what it is batched with. The model runs on one thread; CUDA is used when present.

Packs change without a restart: `kill -HUP PID` re-reads them from disk (packs given as URLs are downloaded
again), and POST /admin/packs with {{"action": "reload" | "load" | "unload" | "replace", "pack": PATH | URL |
"packs": [...]}} loads others; requests in flight finish on the packs they started with. GET /v1/models lists
the base and the experts, GET /health the packs and queue, GET /metrics Prometheus metrics. With --api-key (or
${API_KEY_ENV}) /v1 and /admin need "Authorization: Bearer KEY". SIGINT/SIGTERM stop taking requests and
finish those in flight. Several replicas behind a load balancer, Ray Serve, KServe: docs/serving.md.

examples:
  whisper-experts serve --pack packs/eu3.safetensors
  whisper-experts serve --pack packs/eu3.safetensors --router packs/eu3-router.safetensors --port 9000
  whisper-experts serve --pack s3://my-bucket/packs/eu3.safetensors --host 0.0.0.0   # needs s3fs
  curl http://127.0.0.1:8000/v1/audio/transcriptions -F file=@talk.m4a -F model=auto -F response_format=verbose_json
  python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); \\
print(c.audio.transcriptions.create(model='uk', file=open('talk.wav', 'rb')).text)"
"""


def _run(args) -> int:
    try:
        import uvicorn
    except ImportError as e:
        raise RuntimeError(f"the server needs FastAPI and uvicorn ({e}); install them with "
                           "pip install 'whisper-experts[serve]'") from e
    from inference.serve.factory import build_app

    app = build_app(args.pack or (), base=args.base, device=args.device, router=args.router,
                    max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                    max_upload_mb=args.max_upload_mb, timeout=args.timeout, api_key=args.api_key,
                    threshold=args.threshold, force=args.force, clsr_gates=args.clsr_gates)
    state = app.state.server
    served = state.current
    print(f"serving {served.whisper.base.name} with {', '.join(served.whisper.bank.names) or 'no experts'} on "
          f"http://{args.host}:{args.port}/v1 (packs loaded in {served.load_seconds:.2f} s"
          f"{'; API key required' if state.config.api_key else ''})", file=sys.stderr)
    # uvicorn handles SIGINT/SIGTERM: stop accepting, wait for requests in flight, then the app's lifespan
    # drains the batcher. SIGHUP (pack reload) is installed by the app.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible transcription server on packs of experts",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", action="append", metavar="FILE",
                   help="expert pack (.safetensors), or its fsspec URL (s3://, https://, file://; downloaded again "
                        "on every reload); repeat to serve several; none: the base model alone")
    p.add_argument("--base", help="base model: name, directory or hub id (default: the pack's base, else "
                                  "whisper-base)")
    p.add_argument("--router", metavar="FILE",
                   help="learned router (whisper-experts router train): routes model 'auto' instead of language ID")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most 30 s windows decoded in one generate call (default 16; 1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long a window waits for batch-mates before a smaller batch is decoded (default 20)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests in progress at once; more are refused with 503 and Retry-After (default 64)")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="largest upload in MB; larger: 413 (default 25)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a request may take, upload to answer; then 504 and its decoding stops (default 300)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 and /admin (default: ${API_KEY_ENV}; "
                                     "unset: no key)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="language-ID probability below which the base model serves a window (default 0.5)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--force", action="store_true",
                   help="attach experts trained on other weights of the same architecture and tokenizer")
    add_clsr_gates_argument(p)
    p.add_argument("--graceful-timeout", type=int, default=None, metavar="S",
                   help="on SIGTERM, wait at most S seconds for requests in flight (default: until they finish)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=_run)
