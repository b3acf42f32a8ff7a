"""An OpenAI-compatible transcription server on a pack of experts (``whisper-experts serve``).

Requests name an expert, a language, the base or ``auto`` as their ``model``; their windows (up to 30 s) are batched
across requests and decoded together, each window by its own expert, in one ``generate`` call on one model
thread. Packs can be reloaded without a restart.

- :mod:`inference.serve.factory`: :func:`build_app`, the whole server as one ASGI app (for any ASGI host)
- :mod:`inference.serve.app`: the HTTP routes (FastAPI) and the request path
- :mod:`inference.serve.batcher`: the dynamic batcher and the model thread
- :mod:`inference.serve.catalog`: what a ``model`` names; the ``/v1/models`` list
- :mod:`inference.serve.responses`: response formats and OpenAI's error shape
- :mod:`inference.serve.state`: configuration, served generations and pack reloads
- :mod:`inference.serve.sources`: packs from fsspec URLs, downloaded afresh on every load
- :mod:`inference.serve.metrics`: Prometheus text

Nothing here is imported by ``whisper-experts --help``; FastAPI and uvicorn come with the ``serve`` extra.
"""

__all__ = ["ServeConfig", "ServerState", "PackLoader", "create_app", "build_app"]


def __getattr__(name):
    # Lazy: `from inference.serve import create_app` without importing FastAPI for the other names.
    if name == "build_app":
        from inference.serve.factory import build_app

        return build_app
    if name == "create_app":
        from inference.serve.app import create_app

        return create_app
    if name in ("ServeConfig", "ServerState", "PackLoader"):
        from inference.serve import state

        return getattr(state, name)
    raise AttributeError(name)
