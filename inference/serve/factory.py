"""The server as one ASGI application, built in one call: what ``whisper-experts serve`` runs before uvicorn.

Any ASGI host can serve what :func:`build_app` returns: uvicorn or gunicorn with uvicorn workers, Ray Serve's
``serve.ingress`` (``examples/ray_serve.py``), a KServe custom container. Each replica loads its own copy of the
base and of the packs; packs given as fsspec URLs are downloaded on every load (:mod:`inference.serve.sources`),
so replicas hold no state of their own and an ordinary HTTP load balancer can spread requests over them
(``docs/serving.md``).

This module imports nothing heavy until :func:`build_app` is called.
"""

from __future__ import annotations

import dataclasses
import os

API_KEY_ENV = "WHISPER_EXPERTS_API_KEY"  # the API key when none is given


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def _check(config) -> None:
    """Refuse values the server cannot run with, naming the option and its command-line flag."""
    for name in ("max_batch", "max_queue"):
        if getattr(config, name) < 1:
            raise ValueError(f"{_flag(name)} must be at least 1, got {getattr(config, name)}")
    for name in ("max_upload_mb", "timeout"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{_flag(name)} must be positive, got {getattr(config, name)}")
    if config.max_wait_ms < 0:
        raise ValueError(f"{_flag('max_wait_ms')} must not be negative, got {config.max_wait_ms}")


def build_app(packs=(), base: str | None = None, device: str | None = None, **config):
    """Load a base and packs of experts and return the server's FastAPI application (not started).

    Args:
        packs: pack files, or fsspec URLs of packs (``s3://bucket/eu.safetensors``, ``https://...``,
            ``file://...``), downloaded now and again on every reload; none: the base model alone.
        base: base model name, directory or hub id (default: the base the first pack was made for, else
            ``whisper-base``).
        device: ``cpu``, ``cuda``, ``cuda:1`` (default: CUDA when available).
        **config: fields of :class:`~inference.serve.state.ServeConfig` (``router``, ``max_batch``,
            ``max_wait_ms``, ``max_queue``, ``max_upload_mb``, ``timeout``, ``api_key``, ``threshold``,
            ``force``, ``silence_db``, ``max_new_tokens``, ``clsr_gates``); ``api_key`` defaults to
            ``$WHISPER_EXPERTS_API_KEY``.

    Returns:
        The application; ``app.state.server`` is its :class:`~inference.serve.state.ServerState` (the loaded
        generation is ``.current``). Its lifespan starts and drains the batcher: serve it with an ASGI server
        that runs lifespan events (uvicorn and Ray Serve do).

    Raises:
        TypeError: an option that is not a ``ServeConfig`` field (the message lists those that are).
        ValueError: an option out of range; a missing, corrupt or damaged pack, or one for another base.
        OSError: a pack URL that cannot be downloaded (:class:`~inference.serve.sources.PackSourceError`, naming
            the URL); a pack path that does not exist.
        RuntimeError: FastAPI is not installed.
    """
    try:
        from inference.serve.app import create_app
    except ImportError as e:
        raise RuntimeError(f"the server needs FastAPI ({e}); install it with pip install 'whisper-experts[serve]'"
                           ) from e
    from inference.serve.sources import is_url, local_copy
    from inference.serve.state import PackLoader, ServeConfig, ServerState
    from registry.bases import load_base
    from registry.packs import base_of_packs

    fields = sorted(f.name for f in dataclasses.fields(ServeConfig) if f.name != "packs")
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise TypeError(f"build_app() got unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                        f"the options are ServeConfig's fields: {', '.join(fields)}")
    if isinstance(packs, (str, os.PathLike)):
        packs = [packs]  # one pack, not the characters of its path
    packs = tuple(str(p) for p in packs)
    config["api_key"] = config.get("api_key") or os.environ.get(API_KEY_ENV) or None
    serve_config = ServeConfig(packs=packs, **config)
    _check(serve_config)
    # The first pack names the base; a URL is downloaded once here and that copy serves the first load.
    first = local_copy(packs[0]) if base is None and packs else None
    downloaded = {packs[0]: first} if first is not None and is_url(packs[0]) else {}
    loaded = load_base(base_of_packs(base, [first] if first is not None else []), device=device)
    state = ServerState(PackLoader(loaded, serve_config, downloaded), serve_config)
    return create_app(state)
