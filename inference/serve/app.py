"""The HTTP routes: OpenAI's audio transcription API on a pack of experts, plus models, health, metrics, admin.

========================================  ===================================================================
``POST /v1/audio/transcriptions``         multipart ``file``, ``model`` (see :mod:`inference.serve.catalog`),
                                          ``language``, ``prompt`` and ``temperature`` (accepted, not used:
                                          decoding is greedy and unprompted, so that a request's text does
                                          not depend on its batch), ``response_format``
                                          (:mod:`inference.serve.responses`)
``POST /v1/audio/translations``           the same, translated into English
``GET /v1/models``, ``/v1/models/{id}``   the base, ``auto`` and every expert with its languages
``GET /health``                           generation, experts, queue (no API key needed)
``GET /metrics``                          Prometheus text (:mod:`inference.serve.metrics`; no API key needed)
``GET``/``POST /admin/packs``             what is served; ``{"action": "reload" | "load" | "unload" |
                                          "replace", "pack": PATH | "packs": [PATH...]}`` loads a new
                                          generation (SIGHUP does ``reload``)
========================================  ===================================================================

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 bad field or undecodable audio,
401 missing or wrong API key, 404 unknown model, 413 upload over ``--max-upload-mb``, 503 queue full (with
``Retry-After``) or shutting down, 504 over ``--timeout``. A client that disconnects has its windows that are
not decoded yet dropped. The API key and upload size are checked before the body is read (:class:`Gate`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import threading
import time
from contextlib import asynccontextmanager

from fastapi import Body, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.audio import AudioError, EmptyAudioError, load_audio
from inference.serve import catalog
from inference.serve.batcher import BatcherClosed, Job
from inference.serve.responses import FORMATS, TIMED_FORMATS, APIError, render
from inference.serve.state import DecodeKey, ServerState
from inference.transcribe import SAMPLE_RATE, ExpertWhisper, cut_windows

log = logging.getLogger(__name__)
TOO_LARGE = "whisper_experts.too_large"  # scope flag set by Gate when a body without Content-Length ran over
POLL_SECONDS = 0.1  # how often a waiting request checks whether its client is still there


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Gate:
    """ASGI middleware: the API key and the upload size limit, checked before a body is read."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, key = scope["path"], self.state.config.api_key
        headers = dict(scope.get("headers") or [])
        if key and (path.startswith("/v1/") or path.startswith("/admin/")):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
                error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' (the key the "
                                 "server was started with)", code="invalid_api_key")
                self.state.metrics.inc("errors_total", type="unauthorized")
                if path.startswith("/v1/audio/"):
                    self.state.metrics.inc("requests_total", status="401")
                return await _error_response(error)(scope, receive, send)
        if path.startswith("/v1/audio/"):
            limit = int(self.state.config.max_upload_mb * 1024 * 1024)
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                self.state.metrics.inc("errors_total", type="too_large")
                self.state.metrics.inc("requests_total", status="413")
                return await _error_response(_too_large(self.state))(scope, receive, send)
            receive = self._counting(scope, receive, limit)
        return await self.app(scope, receive, send)

    @staticmethod
    def _counting(scope, receive, limit):
        """A receive that ends the body once it runs over ``limit`` (chunked uploads name no length)."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    scope[TOO_LARGE] = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        return counted


def _too_large(state: ServerState) -> APIError:
    return APIError(413, f"The upload is larger than this server's limit of {state.config.max_upload_mb:g} MB; "
                         "send a shorter or more compressed recording", param="file", code="file_too_large")


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state`` (start its batcher with the app's lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

        def on_sighup():
            task = loop.create_task(state.reload_logged())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        hup = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP")
        if hup:  # signal handlers can only be installed from the main thread (not when embedded in a thread)
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            # uvicorn has already waited for the requests in flight; decode anything left, then stop the thread.
            await asyncio.to_thread(state.batcher.stop, True)

    app = FastAPI(title="whisper-experts", summary="OpenAI-compatible transcription with language experts",
                  lifespan=lifespan)
    app.state.server = state
    app.add_middleware(Gate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        if request.scope.get(TOO_LARGE):
            error = _too_large(state)
        else:
            first = (e.errors() or [{}])[0]
            param = str(first.get("loc", ["", ""])[-1]) or None
            error = APIError(400, f"{param}: {first.get('msg', 'invalid request')}", param=param,
                             code="invalid_value")
        if request.url.path.startswith("/v1/audio/"):
            state.metrics.inc("requests_total", status=str(error.status))
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error_response(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404
                                        else None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    async def transcription(request: Request, task: str, file: UploadFile, model: str, language: str | None,
                            response_format: str) -> Response:
        start = time.monotonic()
        try:
            response = await _transcribe(state, request, task, file, model, language or None, response_format)
            status = response.status_code
        except APIError as e:
            response, status = _error_response(e), e.status
            state.metrics.inc("errors_total", type=e.code or str(e.status))
        except Exception as e:  # noqa: BLE001 - one request's failure is its own 500, never the server's
            log.exception("request failed")
            response, status = _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                        type="server_error")), 500
            state.metrics.inc("errors_total", type="internal")
        state.metrics.inc("requests_total", status=str(status))
        state.metrics.observe("request_seconds", time.monotonic() - start)
        return response

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request, file: UploadFile = File(...), model: str = Form(...),
                             language: str | None = Form(None), prompt: str | None = Form(None),
                             response_format: str = Form("json"), temperature: float = Form(0.0)):
        """OpenAI's transcription endpoint; ``prompt`` and ``temperature`` are accepted and not used."""
        return await transcription(request, "transcribe", file, model, language, response_format)

    @app.post("/v1/audio/translations")
    async def translations(request: Request, file: UploadFile = File(...), model: str = Form(...),
                           prompt: str | None = Form(None), response_format: str = Form("json"),
                           temperature: float = Form(0.0)):
        """OpenAI's translation endpoint: speech in any language, English text out."""
        return await transcription(request, "translate", file, model, None, response_format)

    @app.get("/v1/models")
    async def list_models():
        """The base, ``auto`` and every expert now served (OpenAI's list shape)."""
        served = state.current
        return {"object": "list", "data": catalog.models(served.whisper, int(served.loaded_at))}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        served = state.current
        for entry in catalog.models(served.whisper, int(served.loaded_at)):
            if entry["id"] == model_id:
                return entry
        raise APIError(404, str(catalog.UnknownModelError(model_id, catalog.model_ids(served.whisper))),
                       param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok", **state.current.describe(), "queue_windows": state.batcher.queued,
                "requests_in_flight": state.in_flight}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/admin/packs")
    async def packs():
        return state.current.describe()

    @app.post("/admin/packs")
    async def change_packs(body: dict = Body(default={})):
        """Load a new generation; requests in flight finish on the one they started on."""
        packs = list(state.current.packs)
        action = body.get("action", "reload")
        named = body.get("packs") if body.get("packs") is not None else [body["pack"]] if body.get("pack") else []
        if not isinstance(named, list) or not all(isinstance(p, str) for p in named):
            raise APIError(400, "'packs' is a list of pack file paths", param="packs")
        if action == "load":
            packs += [p for p in named if p not in packs]
        elif action == "unload":
            missing = [p for p in named if p not in packs]
            if missing:
                raise APIError(404, f"not loaded: {', '.join(missing)} (loaded: {', '.join(packs) or 'none'})",
                               param="pack", code="pack_not_loaded")
            packs = [p for p in packs if p not in named]
        elif action == "replace":
            packs = named
        elif action != "reload":
            raise APIError(400, f"unknown action {action!r}: reload, load, unload or replace", param="action")
        if action in ("load", "unload") and not named:
            raise APIError(400, f"'{action}' needs 'pack' (a path) or 'packs' (a list of paths)", param="pack")
        try:
            served = await state.reload(packs)
        except (OSError, ValueError, LookupError) as e:
            raise APIError(400, f"the packs did not load, still serving generation {state.current.generation}: "
                                f"{e}", param="packs", code="pack_load_failed") from e
        return served.describe()

    return app


async def _transcribe(state: ServerState, request: Request, task: str, file: UploadFile, model: str,
                      language: str | None, fmt: str) -> Response:
    """One request: resolve its model, decode its audio, queue its windows, wait, answer."""
    if request.scope.get(TOO_LARGE):
        raise _too_large(state)
    if fmt not in FORMATS:
        raise APIError(400, f"response_format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}",
                       param="response_format", code="invalid_value")
    served = state.current  # pinned: a reload from here on does not change what serves this request
    try:
        route = catalog.resolve(served.whisper, model, language)
    except catalog.UnknownModelError as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from e
    except ValueError as e:
        raise APIError(400, str(e), param="language", code="invalid_language") from e
    if state.in_flight >= state.config.max_queue:
        raise APIError(503, f"The server is busy ({state.in_flight} requests in progress, --max-queue "
                            f"{state.config.max_queue}); retry shortly", type="server_error", code="queue_full",
                       headers={"Retry-After": "1"})
    state.in_flight += 1
    state.metrics.set("requests_in_flight", state.in_flight)
    try:
        return await _admitted(state, request, task, file, served, route, fmt)
    finally:
        state.in_flight -= 1
        state.metrics.set("requests_in_flight", state.in_flight)


async def _admitted(state, request, task, file, served, route, fmt) -> Response:
    data = await file.read()
    if request.scope.get(TOO_LARGE) or len(data) > state.config.max_upload_mb * 1024 * 1024:
        raise _too_large(state)
    name = file.filename or "upload"
    try:  # PyAV/libsndfile decoding is CPU work: off the event loop, and not on the model's thread
        audio = await asyncio.to_thread(load_audio, data)
    except EmptyAudioError as e:
        raise APIError(400, f"{name}: the audio is empty ({e})", param="file", code="empty_audio") from e
    except AudioError as e:
        raise APIError(400, f"could not decode {name} as audio: {e}", param="file", code="invalid_audio") from e
    windows, note = cut_windows(audio, 0, served.options.silence_db, route, served.options.cut)
    key = DecodeKey(timestamps=fmt in TIMED_FORMATS and served.timestamps, task=task)
    loop = asyncio.get_running_loop()
    job = Job(served, key, windows, loop.create_future(), loop)
    try:
        state.batcher.submit(job)
    except BatcherClosed as e:
        raise APIError(503, "The server is shutting down; retry on another instance", type="server_error",
                       code="shutting_down", headers={"Retry-After": "5"}) from e
    try:
        outcome = await _wait(job, request, state.config.timeout)
    finally:
        if not job.future.done():  # timed out, client gone, or this task was cancelled: stop spending on it
            state.batcher.cancel(job)
    if outcome == "timeout":
        raise APIError(504, f"The request took longer than the server's timeout of {state.config.timeout:g} s",
                       type="server_error", code="timeout")
    if outcome == "disconnected":
        state.metrics.inc("errors_total", type="client_disconnected")
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
    if job.future.exception() is not None:
        e = job.future.exception()
        raise APIError(500, f"decoding failed: {type(e).__name__}: {e}", type="server_error", code="decode_failed")
    transcript = ExpertWhisper.assemble(name, len(audio) / SAMPLE_RATE, windows, note)
    body, media_type = render(transcript, fmt, task)
    if isinstance(body, dict):
        return JSONResponse(body)
    return Response(body, media_type=media_type)


async def _wait(job: Job, request: Request, timeout: float) -> str:
    """Wait for the job: ``done``, ``timeout``, or ``disconnected`` (the client closed its connection)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return "timeout"
        done, _ = await asyncio.wait({job.future}, timeout=min(POLL_SECONDS, left))
        if done:
            return "done"
        if await request.is_disconnected():
            return "disconnected"
