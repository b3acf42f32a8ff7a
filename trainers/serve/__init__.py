"""An OpenAI-compatible transcription server on a pack of experts (``whisper-experts serve``).

Requests name an expert, a language, the base or ``auto`` as their ``model``; their 30 s windows are batched
across requests and decoded together, each window by its own expert, in one ``generate`` call on one model
thread. Packs can be reloaded without a restart.

- :mod:`trainers.serve.app`: the HTTP routes (FastAPI) and the request path
- :mod:`trainers.serve.batcher`: the dynamic batcher and the model thread
- :mod:`trainers.serve.catalog`: what a ``model`` names; the ``/v1/models`` list
- :mod:`trainers.serve.responses`: response formats and OpenAI's error shape
- :mod:`trainers.serve.state`: configuration, served generations and pack reloads
- :mod:`trainers.serve.metrics`: Prometheus text

Nothing here is imported by ``whisper-experts --help``; FastAPI and uvicorn come with the ``serve`` extra.
"""

__all__ = ["ServeConfig", "ServerState", "PackLoader", "create_app"]


def __getattr__(name):
    # Lazy: `from trainers.serve import create_app` without importing FastAPI for the other names.
    if name == "create_app":
        from trainers.serve.app import create_app

        return create_app
    if name in ("ServeConfig", "ServerState", "PackLoader"):
        from trainers.serve import state

        return getattr(state, name)
    raise AttributeError(name)
