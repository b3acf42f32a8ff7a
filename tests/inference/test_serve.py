"""The transcription server on a tiny random Whisper, served by uvicorn in a thread: OpenAI's client for the
formats, httpx for the errors, a request's text alone equal to its text in a mixed batch, concurrent requests
sharing one generate call, client disconnects, queue limits, pack reloads in flight, graceful shutdown, and
the ``serve`` command itself (help, SIGHUP, SIGTERM). No assertion is about speed."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from inference.audio import load_audio  # noqa: E402
from inference.serve.app import create_app  # noqa: E402
from inference.serve.metrics import parse  # noqa: E402
from inference.serve.state import PackLoader, ServeConfig, ServerState  # noqa: E402
from inference.transcribe import ExpertWhisper  # noqa: E402
from registry.bases import load_base  # noqa: E402
from registry.packs import create_pack  # noqa: E402
from tests.lora_experts.random_experts import linear_shapes, lora_expert  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SR = 16000
TRANSCRIBE = "/v1/audio/transcriptions"


def _wav(seconds: float, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32), SR,
             format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_base(tiny_whisper_dir):
    return load_base(str(tiny_whisper_dir), device="cpu")


@pytest.fixture(scope="module")
def packs(tiny_base, tmp_path_factory):
    """eu: uk-x, pt-x (decoder only) and nl-x (adapts the encoder too); ru: ru-y."""
    ident = {"name": tiny_base.name, "fingerprint": tiny_base.fingerprint,
             "tokenizer_fingerprint": tiny_base.tokenizer_fingerprint}
    shapes = linear_shapes(tiny_base.model, ("q_proj", "v_proj", "fc1", "fc2"))
    decoder = {m: s for m, s in shapes.items() if ".decoder." in m}
    d = tmp_path_factory.mktemp("packs")
    create_pack(d / "eu.safetensors", {"uk-x": lora_expert(decoder, 4, 16.0, 1, ["uk"], ident),
                                       "pt-x": lora_expert(decoder, 2, 8.0, 2, ["pt"], ident),
                                       "nl-x": lora_expert(shapes, 8, 16.0, 3, ["nl"], ident)})
    create_pack(d / "ru.safetensors", {"ru-y": lora_expert(decoder, 4, 16.0, 4, ["ru"], ident)})
    return {"eu": str(d / "eu.safetensors"), "ru": str(d / "ru.safetensors")}


@contextlib.contextmanager
def serving(tiny_base, packs=(), **config):
    """(base URL, server state, uvicorn server) of a server running in a thread on a free port."""
    cfg = ServeConfig(packs=tuple(packs), max_new_tokens=4, threshold=0.0, **config)
    state = ServerState(PackLoader(tiny_base, cfg), cfg)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", state, server
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@contextlib.contextmanager
def blocked(state):
    """The model thread stops inside its next decode until the block ends (or ``release`` is set)."""
    entered, release = threading.Event(), threading.Event()
    original = state.batcher.decode

    def decode(served, key, windows):
        entered.set()
        release.wait(120)
        original(served, key, windows)

    state.batcher.decode = decode
    try:
        yield entered, release
    finally:
        release.set()
        state.batcher.decode = original


def _post(url, wav, model="auto", timeout=120, **data):
    return httpx.post(url + TRANSCRIBE, files={"file": ("clip.wav", wav)}, data={"model": model, **data},
                      timeout=timeout)


def _until(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def _metrics(url) -> dict:
    return parse(httpx.get(url + "/metrics").text)


def test_openai_client_gets_every_format_and_the_library_text(tiny_base, packs):
    openai = pytest.importorskip("openai")
    wav = _wav(1.5, 0)
    with serving(tiny_base, [packs["eu"]]) as (url, state, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        plain = client.audio.transcriptions.create(model="uk-x", file=("a.wav", wav), prompt="ignored",
                                                   temperature=0.0)
        assert plain.text and plain.language == "uk" and plain.expert == "uk-x"
        verbose = client.audio.transcriptions.create(model="pt", file=("a.wav", wav), response_format="verbose_json")
        assert verbose.language == "pt" and verbose.expert == "pt-x" and verbose.duration == 1.5
        assert verbose.segments and verbose.segments[0].start >= 0 and verbose.segments[-1].end <= 1.5
        text = client.audio.transcriptions.create(model="uk-x", file=("a.wav", wav), response_format="text")
        assert text.strip() == plain.text
        srt = client.audio.transcriptions.create(model="nl-x", file=("a.wav", wav), response_format="srt")
        assert srt.startswith("1\n00:00:0") and " --> " in srt
        base = client.audio.transcriptions.create(model="base", file=("a.wav", wav), language="uk")
        assert base.expert is None and base.language == "uk"
        english = httpx.post(url + "/v1/audio/translations", files={"file": ("a.wav", wav)}, data={"model": "auto"},
                             timeout=120)
        assert english.status_code == 200 and isinstance(english.json()["text"], str)
        listed = {m.id: m for m in client.models.list().data}
        assert {tiny_base.name, "auto", "uk-x", "pt-x", "nl-x"} <= set(listed)
        assert listed["nl-x"].languages == ["nl"] and listed["nl-x"].pack == packs["eu"]
    # The server's text is the library's: ExpertWhisper.transcribe in the uk expert's language.
    whisper = ExpertWhisper.from_pack(dataclasses.replace(tiny_base, model=copy.deepcopy(tiny_base.model)),
                                      packs["eu"])
    (alone,) = whisper.transcribe([load_audio(wav)], language="uk", max_new_tokens=4, progress=False)
    assert alone.text == plain.text and alone.expert == "uk-x"


def test_a_request_alone_and_in_a_mixed_batch_gives_the_same_text_in_one_generate_call(tiny_base, packs):
    clips = {"uk-x": _wav(2, 1), "nl-x": _wav(3, 2), "auto": _wav(2, 3), "pt": _wav(1, 4)}
    with serving(tiny_base, [packs["eu"]], max_batch=1) as (url, _, _):
        alone = {m: _post(url, wav, m).json() for m, wav in clips.items()}
    # A batch goes only when it is full, so the four requests are decoded together whatever their timing.
    with serving(tiny_base, [packs["eu"]], max_batch=len(clips), max_wait_ms=600_000) as (url, state, _):
        with ThreadPoolExecutor(len(clips)) as pool:
            futures = {m: pool.submit(_post, url, wav, m) for m, wav in clips.items()}
            mixed = {m: f.result().json() for m, f in futures.items()}
        metrics = _metrics(url)
    assert metrics["whisper_experts_generate_calls_total"] == 1
    assert metrics["whisper_experts_batch_requests_sum"] == 4 and metrics["whisper_experts_batch_windows_sum"] == 4
    assert {m: (r["text"], r["expert"], r["language"]) for m, r in mixed.items()} == \
        {m: (r["text"], r["expert"], r["language"]) for m, r in alone.items()}
    assert mixed["uk-x"]["expert"] == "uk-x" and mixed["pt"]["expert"] == "pt-x" and mixed["nl-x"]["language"] == "nl"
    assert metrics['whisper_experts_expert_windows_total{expert="uk-x"}'] == 1


def test_errors_in_openai_shape_and_the_server_keeps_serving(tiny_base, packs):
    small = _wav(1, 5)
    with serving(tiny_base, [packs["eu"]], max_upload_mb=0.1, api_key="sekret") as (url, state, _):
        auth = {"Authorization": "Bearer sekret"}

        def post(**kw):
            kw.setdefault("files", {"file": ("a.wav", small)})
            kw.setdefault("data", {"model": "auto"})
            return httpx.post(url + TRANSCRIBE, headers=kw.pop("headers", auth), timeout=120, **kw)

        def error(r, status, code=None):
            assert r.status_code == status, r.text
            body = r.json()["error"]
            assert set(body) == {"message", "type", "param", "code"} and body["message"]
            assert code is None or body["code"] == code
            return body

        error(post(headers={}), 401, "invalid_api_key")
        error(post(headers={"Authorization": "Bearer wrong"}), 401)
        error(httpx.get(url + "/v1/models"), 401)
        assert httpx.get(url + "/health").status_code == 200  # health and metrics need no key
        error(post(files={"file": ("big.wav", _wav(4, 6))}), 413, "file_too_large")
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nauto\r\n--{boundary}\r\n"
                f"Content-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n\r\n").encode() + \
            _wav(4, 6) + f"\r\n--{boundary}--\r\n".encode()
        chunked = httpx.post(url + TRANSCRIBE, content=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                             headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        error(chunked, 413, "file_too_large")  # no Content-Length: counted as it arrives
        assert "invalid_audio" == error(post(files={"file": ("x.m4a", b"\x00not audio" * 50)}), 400)["code"]
        error(post(files={"file": ("empty.wav", b"")}), 400)
        listed = error(post(data={"model": "no-such-expert"}), 404, "model_not_found")["message"]
        assert "uk-x" in listed and "auto" in listed
        error(post(data={"model": "auto", "language": "xx"}), 400, "invalid_language")
        error(post(data={"model": "auto", "response_format": "docx"}), 400)
        error(post(files={}, data={"model": "auto"}), 400)  # no file
        ok = post()
        assert ok.status_code == 200 and ok.json()["text"]
        counts = _metrics(url)
        assert counts['whisper_experts_requests_total{status="413"}'] == 2
        assert counts['whisper_experts_errors_total{type="invalid_audio"}'] == 1


def test_full_queue_gets_503_and_a_slow_request_504(tiny_base, packs):
    with serving(tiny_base, [packs["eu"]], max_queue=1) as (url, state, _):
        with blocked(state) as (entered, release), ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post, url, _wav(1, 7), "uk-x")
            _until(entered.is_set)
            busy = _post(url, _wav(1, 8), "uk-x")
            assert busy.status_code == 503 and busy.headers["Retry-After"] and \
                busy.json()["error"]["code"] == "queue_full"
            state.config = dataclasses.replace(state.config, max_queue=2, timeout=0.5)
            late = _post(url, _wav(1, 9), "pt-x")  # queued behind the blocked decode past its timeout
            assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
            assert _metrics(url)["whisper_experts_windows_dropped_total"] == 1  # and never decoded
            release.set()
            assert first.result().status_code == 200
        _until(lambda: state.in_flight == 0 and state.batcher.queued == 0)
        state.config = dataclasses.replace(state.config, timeout=300.0)  # 0.5 s is too short on a loaded machine
        assert _post(url, _wav(1, 9), "uk-x").status_code == 200


def test_a_client_that_leaves_has_its_windows_dropped(tiny_base, packs):
    with serving(tiny_base, [packs["eu"]], max_batch=1) as (url, state, _):
        with blocked(state) as (entered, release), ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post, url, _wav(1, 10), "uk-x")
            _until(entered.is_set)
            with pytest.raises(httpx.TimeoutException):  # 3 windows queued behind the blocked one; it gives up
                _post(url, _wav(75, 11), "pt-x", timeout=1.0)
            _until(lambda: _metrics(url)["whisper_experts_windows_dropped_total"] == 3)
            release.set()
            assert first.result().status_code == 200
        calls = _metrics(url)["whisper_experts_generate_calls_total"]
        assert calls == 1 and state.batcher.queued == 0  # the left request's windows were never decoded


def test_packs_reload_while_requests_are_in_flight(tiny_base, packs, tmp_path):
    wav = _wav(2, 12)
    with serving(tiny_base, [packs["eu"]]) as (url, state, _):
        before = _post(url, wav, "uk-x").json()
        with blocked(state) as (entered, release), ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(_post, url, wav, "uk-x")
            _until(entered.is_set)
            swapped = httpx.post(url + "/admin/packs", json={"action": "replace", "packs": [packs["ru"]]}, timeout=120)
            assert swapped.status_code == 200 and swapped.json()["experts"] == ["ru-y"]
            assert swapped.json()["generation"] == 2
            assert {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]} >= {"ru-y", "auto"}
            release.set()
            old = in_flight.result()
        assert old.status_code == 200 and old.json() == before  # finished on the packs it started with
        assert _post(url, wav, "uk-x").status_code == 404 and _post(url, wav, "ru-y").json()["expert"] == "ru-y"
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(b"not a pack")
        refused = httpx.post(url + "/admin/packs", json={"action": "load", "pack": str(broken)}, timeout=120)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "pack_load_failed"
        assert httpx.get(url + "/admin/packs").json()["generation"] == 2  # the failed load changed nothing
        loaded = httpx.post(url + "/admin/packs", json={"action": "load", "pack": packs["eu"]}, timeout=120).json()
        assert loaded["experts"] == ["ru-y", "uk-x", "pt-x", "nl-x"]
        unloaded = httpx.post(url + "/admin/packs", json={"action": "unload", "pack": packs["ru"]}, timeout=120)
        assert unloaded.json()["experts"] == ["uk-x", "pt-x", "nl-x"]
        assert _post(url, wav, "uk-x").json() == before
        metrics = _metrics(url)
        assert metrics['whisper_experts_pack_loads_total{result="ok"}'] == 4
        assert metrics['whisper_experts_pack_loads_total{result="failed"}'] == 1


def test_shutdown_finishes_the_requests_in_flight(tiny_base, packs):
    with serving(tiny_base, [packs["eu"]]) as (url, state, server):
        with blocked(state) as (entered, release), ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(_post, url, _wav(1, 13), "uk-x")
            _until(entered.is_set)
            server.should_exit = True  # what SIGTERM does
            time.sleep(0.2)
            release.set()
            assert in_flight.result().status_code == 200
    assert not state.batcher._thread.is_alive()


def test_serve_help_imports_no_heavy_module():
    code = ("import sys\nfrom trainers.cli import main\n"
            "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules]\n"
            "sys.exit(f'imported {heavy}' if heavy else 0)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-500:]
    assert "POST /admin/packs" in run.stdout and "--max-batch" in run.stdout


def test_serve_command_reloads_on_sighup_and_drains_on_sigterm(tiny_whisper_dir, packs, project_home):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "WHISPER_EXPERTS_API_KEY": "k", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainers.cli", "serve", "--base", str(tiny_whisper_dir),
                             "--pack", packs["eu"], "--port", str(port), "--log-level", "info", "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        _until(up, 300)
        r = httpx.post(url + TRANSCRIBE, files={"file": ("a.wav", _wav(1, 14))}, data={"model": "uk"},
                       headers={"Authorization": "Bearer k"}, timeout=120)
        assert r.status_code == 200 and r.json()["expert"] == "uk-x"
        proc.send_signal(signal.SIGHUP)
        _until(lambda: httpx.get(url + "/health").json()["generation"] == 2, 120)
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down cleanly, then re-raises SIGTERM so the exit status says how the process ended
        assert proc.wait(120) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_one_failing_request_fails_alone_and_generations_never_share_a_call():
    import asyncio

    from inference.serve.batcher import Batcher, Job
    from inference.transcribe import Segment, Window

    calls = []

    def decode(served, key, windows):
        calls.append((served, [w.item for w in windows]))
        if any(w.item == 1 for w in windows):
            raise RuntimeError("undecodable window")
        for w in windows:
            w.segments = [Segment(0.0, 1.0, "ok")]

    async def run():
        loop = asyncio.get_running_loop()
        batcher = Batcher(decode, max_batch=3, max_wait_ms=600_000).start()
        jobs = [Job("old", "key", [Window(i, 0.0, np.zeros(SR, np.float32))], loop.create_future(), loop)
                for i in range(3)]
        for job in jobs:
            batcher.submit(job)
        results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        # Two generations: each goes alone once the other's windows cannot fill its batch.
        mixed = [Job(served, "key", [Window(10 + i, 0.0, np.zeros(SR, np.float32))], loop.create_future(), loop)
                 for i, served in enumerate(["old", "new"])]
        batcher.max_wait = 0.0
        for job in mixed:
            batcher.submit(job)
        await asyncio.gather(*(j.future for j in mixed))
        batcher.stop()
        return results, batcher

    results, batcher = asyncio.run(run())
    assert results[0] is None and results[2] is None and isinstance(results[1], RuntimeError)
    assert [items for _, items in calls[:4]] == [[0, 1, 2], [0], [1], [2]]  # the batch, then each alone
    assert sorted(calls[4:]) == [("new", [11]), ("old", [10])]
    assert batcher.metrics.value("generate_calls_total") == 4  # the failed calls are not counted


def test_a_learned_router_routes_auto_and_a_reload_it_does_not_fit_is_refused(tiny_base, packs, tmp_path):
    from inference.router import LearnedRouter, router_slots

    served = PackLoader(tiny_base, ServeConfig(packs=(packs["eu"],))).load((packs["eu"],))
    bank = served.whisper.bank
    router = LearnedRouter(router_slots(bank), bank.names, tiny_base.model.config.d_model, base=bank.base)
    path = router.save(tmp_path / "router.safetensors")
    with serving(tiny_base, [packs["eu"]], router=str(path)) as (url, state, _):
        r = _post(url, _wav(2, 15), "auto", response_format="verbose_json").json()
        slot = next(s for s in router.slots if s[0] == r["expert"])  # the router's choice, in its language
        assert r["language"] == slot[1] and r["segments"][0]["expert"] == r["expert"]
        refused = httpx.post(url + "/admin/packs", json={"action": "replace", "packs": [packs["ru"]]}, timeout=120)
        assert refused.status_code == 400 and "router" in refused.json()["error"]["message"]
        assert httpx.get(url + "/health").json()["experts"] == ["uk-x", "pt-x", "nl-x"]


def test_verbose_json_seek_is_where_the_segments_window_starts():
    from inference.serve.responses import as_verbose_json
    from inference.transcribe import Segment, Transcript

    segments = [Segment(0.0, 12.0, "one", seek=0.0), Segment(12.0, 27.25, "two", seek=0.0),
                Segment(27.25, 40.0, "three", seek=27.25), Segment(45.0, 50.0, "four")]  # no seek: a 30 s grid
    t = Transcript("a.wav", "one two three four", "cs", None, "cs-x", 50.0, segments)
    assert [s["seek"] for s in as_verbose_json(t)["segments"]] == [0, 0, 2725, 3000]
