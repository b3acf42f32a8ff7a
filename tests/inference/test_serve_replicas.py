"""Stateless replicas: :func:`inference.serve.factory.build_app` on the tiny Whisper (what every replica and the
``serve`` command build), packs from fsspec URLs (``file://``, ``memory://``) downloaded on start and again on
every reload, atomically and never through a symlink, clear errors for options and URLs that do not work, and
the Ray Serve example's builder (when Ray is installed)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

fsspec = pytest.importorskip("fsspec")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from inference.serve import build_app  # noqa: E402
from inference.serve.sources import PackSourceError, download_path  # noqa: E402
from tests.inference import test_serve  # noqa: E402
from tests.inference.test_serve import TRANSCRIBE, _wav  # noqa: E402

tiny_base, packs = test_serve.tiny_base, test_serve.packs  # the server tests' fixtures: the tiny base, eu and ru packs

ROOT = Path(__file__).resolve().parents[2]
FAST = {"max_new_tokens": 4, "threshold": 0.0, "device": "cpu"}  # a few tokens per window: the tests are about wiring


def _experts(client) -> set[str]:
    return {m["id"] for m in client.get("/v1/models").json()["data"] if m["kind"] not in ("base", "auto")}


def test_build_app_serves_health_models_and_a_transcription(tiny_whisper_dir, packs):
    # No base given: the first pack names it (here the tiny Whisper's directory).
    app = build_app([packs["eu"]], **FAST)
    state = app.state.server
    assert state.loader.base.name == str(tiny_whisper_dir) and state.config.packs == (packs["eu"],)
    with TestClient(app) as client:  # runs the lifespan: the batcher starts, and drains at the end
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["experts"] == ["uk-x", "pt-x", "nl-x"]
        assert _experts(client) == {"uk-x", "pt-x", "nl-x"}
        r = client.post(TRANSCRIBE, files={"file": ("a.wav", _wav(1.5, 20))}, data={"model": "uk"})
        assert r.status_code == 200, r.text
        assert r.json()["expert"] == "uk-x" and r.json()["language"] == "uk" and isinstance(r.json()["text"], str)
    assert not state.batcher._thread.is_alive()


def test_build_app_takes_the_api_key_from_the_environment(tiny_whisper_dir, monkeypatch):
    monkeypatch.setenv("WHISPER_EXPERTS_API_KEY", "from-env")
    app = build_app(base=str(tiny_whisper_dir), **FAST)
    assert app.state.server.config.api_key == "from-env"
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
        assert client.get("/health").json()["experts"] == []  # no packs: the base model alone


def test_unknown_and_out_of_range_options_are_refused_before_anything_loads():
    with pytest.raises(TypeError, match=r"unknown option max_btach; the options are .*max_batch.*max_wait_ms"):
        build_app(base="/no/such/base", max_btach=4)
    with pytest.raises(ValueError, match=r"max_batch \(--max-batch\) must be at least 1, got 0"):
        build_app(base="/no/such/base", max_batch=0)
    with pytest.raises(ValueError, match=r"max_wait_ms \(--max-wait-ms\) must not be negative"):
        build_app(base="/no/such/base", max_wait_ms=-1)


def test_a_file_url_pack_is_downloaded_and_served_under_its_url(tiny_whisper_dir, packs):
    url = Path(packs["ru"]).resolve().as_uri()
    app = build_app([url], **FAST)  # the base comes from the downloaded copy's header
    copy = download_path(url)
    assert copy.is_file() and copy.read_bytes() == Path(packs["ru"]).read_bytes()
    with TestClient(app) as client:
        assert client.get("/health").json()["packs"] == [url]
        (entry,) = [m for m in client.get("/v1/models").json()["data"] if m["id"] == "ru-y"]
        assert entry["pack"] == url  # the URL, not the local copy
        r = client.post(TRANSCRIBE, files={"file": ("a.wav", _wav(1, 21))}, data={"model": "ru-y"})
        assert r.status_code == 200 and r.json()["expert"] == "ru-y"


def test_a_memory_url_pack_is_downloaded_again_on_reload(tiny_whisper_dir, packs, tmp_path):
    url = "memory://serve-replicas/current.safetensors"
    memory = fsspec.filesystem("memory")
    memory.pipe_file("/serve-replicas/current.safetensors", Path(packs["eu"]).read_bytes())
    # Someone planted a symlink where the download goes: it is replaced, never written through.
    copy = download_path(url)
    copy.parent.mkdir(parents=True, exist_ok=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    copy.unlink(missing_ok=True)
    copy.symlink_to(victim)
    app = build_app([url], base=str(tiny_whisper_dir), **FAST)
    assert victim.read_text() == "untouched" and not copy.is_symlink()
    with TestClient(app) as client:
        assert _experts(client) == {"uk-x", "pt-x", "nl-x"}
        # The bucket now holds another pack under the same URL; a reload serves what it holds now.
        memory.pipe_file("/serve-replicas/current.safetensors", Path(packs["ru"]).read_bytes())
        reloaded = client.post("/admin/packs", json={"action": "reload"})
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["experts"] == ["ru-y"] and reloaded.json()["generation"] == 2
        assert _experts(client) == {"ru-y"}
        assert client.post(TRANSCRIBE, files={"file": ("a.wav", _wav(1, 22))},
                           data={"model": "ru-y"}).json()["expert"] == "ru-y"
        # A damaged upload is refused by the pack's digests; the generation serving goes on.
        damaged = bytearray(Path(packs["eu"]).read_bytes())
        damaged[-5] ^= 0xFF  # a byte of the last tensor's data
        memory.pipe_file("/serve-replicas/current.safetensors", bytes(damaged))
        refused = client.post("/admin/packs", json={"action": "reload"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "pack_load_failed"
        message = refused.json()["error"]["message"]
        assert url in message and "corrupt" in message
        assert client.get("/health").json()["generation"] == 2 and _experts(client) == {"ru-y"}
    assert not list(copy.parent.glob(".*.tmp"))  # no temporaries left behind


def test_an_unreadable_url_is_refused_naming_it(tiny_whisper_dir, packs):
    missing = "memory://serve-replicas/no-such.safetensors"
    with pytest.raises(PackSourceError, match=f"cannot download {missing}: FileNotFoundError"):
        build_app([missing], base=str(tiny_whisper_dir), **FAST)
    with pytest.raises(OSError, match="cannot download nosuchscheme://x/p.safetensors: .*Protocol not known"):
        build_app(["nosuchscheme://x/p.safetensors"], base=str(tiny_whisper_dir), **FAST)
    app = build_app([packs["eu"]], base=str(tiny_whisper_dir), **FAST)
    with TestClient(app) as client:
        refused = client.post("/admin/packs", json={"action": "load", "pack": missing})
        assert refused.status_code == 400 and missing in refused.json()["error"]["message"]
        assert client.get("/health").json()["generation"] == 1


def test_ray_serve_example_builds_the_app_from_its_environment(tiny_whisper_dir, packs, monkeypatch):
    pytest.importorskip("ray.serve")
    monkeypatch.setenv("WHISPER_EXPERTS_PACKS", f" {packs['eu']}, {packs['ru']} ")
    monkeypatch.setenv("WHISPER_EXPERTS_BASE", str(tiny_whisper_dir))
    monkeypatch.setenv("WHISPER_EXPERTS_DEVICE", "cpu")
    spec = importlib.util.spec_from_file_location("ray_serve_example", ROOT / "examples" / "ray_serve.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from ray.serve import Application

    assert isinstance(example.app, Application)
    assert example._ENV["WHISPER_EXPERTS_PACKS"] == os.environ["WHISPER_EXPERTS_PACKS"]
    with TestClient(example.build_whisper_experts()) as client:
        assert client.get("/health").json()["experts"] == ["uk-x", "pt-x", "nl-x", "ru-y"]
