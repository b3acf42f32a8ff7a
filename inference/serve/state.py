"""What the server serves, and changing it without a restart.

A :class:`Served` generation is one :class:`~inference.transcribe.ExpertWhisper` with its packs attached,
its decoding options and learned router. Loading packs builds a new generation on a copy of the base model
that shares the base's weight tensors (new modules, no second copy of the weights), so the generation that
serves requests now is untouched while the next one loads. Requests are pinned to the generation current
when they are admitted: after a reload, requests in flight finish on the old generation (the batcher never mixes
generations in one ``generate`` call) and new ones go to the new; the old one is freed with its last request.
A load that fails (a missing or corrupt pack, a router for other experts) leaves the current generation serving.
Packs and routers named by fsspec URLs are downloaded afresh by every load (:mod:`inference.serve.sources`).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from inference.bank import expert_bank
from inference.packs import load_pack
from inference.serve.batcher import Batcher
from inference.serve.metrics import Metrics
from inference.serve.sources import is_url, local_copy
from inference.transcribe import ExpertWhisper, TranscribeOptions, set_clsr_gates
from registry.bases import Base
from registry.expert_file import ExpertFormatError, ExpertMismatchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """How the server runs (``whisper-experts serve`` flags)."""

    packs: tuple[str, ...] = ()  # pack files or fsspec URLs attached at start (re-read / downloaded on reload)
    router: str | None = None  # learned router file or URL: routes model "auto" instead of language ID
    max_batch: int = 16  # most windows (up to 30 s each) per generate call (1: no batching across requests)
    max_wait_ms: float = 20.0  # how long the oldest queued window waits for batch-mates
    max_queue: int = 64  # requests admitted at once (decoding audio, queued or decoding); more get 503
    max_upload_mb: float = 25.0  # larger uploads get 413 (OpenAI's limit is 25 MB)
    timeout: float = 300.0  # seconds a request may take from upload to answer; then 504
    api_key: str | None = None  # when set, /v1 and /admin need "Authorization: Bearer KEY"
    threshold: float = 0.5  # language ID probability below which the base model serves a window
    force: bool = False  # attach experts trained on other weights of the same architecture and tokenizer
    silence_db: float = -60.0  # windows quieter than this are not decoded
    max_new_tokens: int | None = None  # per window; None: 8 per second of audio + 16
    clsr_gates: str | None = None  # hard | soft: how CLSR experts use their gates (None: as each expert records)


class DecodeKey(NamedTuple):
    """Decoding options that one ``generate`` call shares across its rows."""

    timestamps: bool
    task: str


@dataclass(eq=False)
class Served:
    """One generation of served experts (see the module docstring)."""

    whisper: ExpertWhisper
    packs: tuple[str, ...]
    options: TranscribeOptions  # resolved: the router loaded and checked against the bank
    generation: int
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)

    @property
    def timestamps(self) -> bool:
        """Whether the base has timestamp tokens (subtitles and segments then get Whisper's own times)."""
        return getattr(self.whisper.base.model.generation_config, "no_timestamps_token_id", None) is not None

    def options_for(self, key: DecodeKey) -> TranscribeOptions:
        return dataclasses.replace(self.options, timestamps=key.timestamps, task=key.task)

    def describe(self) -> dict:
        """What ``/admin/packs`` and ``/health`` report."""
        return {"generation": self.generation, "packs": list(self.packs), "experts": self.whisper.bank.names,
                "base": self.whisper.base.name, "router": self.options.router is not None,
                "load_seconds": round(self.load_seconds, 4), "loaded_at": self.loaded_at}


def shared_copy(model):
    """A deep copy of ``model`` whose parameters and buffers are the original's tensors (new modules only), so
    experts can be attached to it without touching ``model`` and without a second copy of the weights."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class PackLoader:
    """Builds :class:`Served` generations from a pristine base (no experts are ever attached to it).

    Args:
        base: the loaded base.
        config: packs, router, threshold, ``force``...
        downloaded: URL -> local copy already downloaded, used by the first load instead of downloading
            again (:func:`inference.serve.factory.build_app` reads the first pack's base from its copy).
    """

    def __init__(self, base: Base, config: ServeConfig, downloaded: dict[str, Path] | None = None):
        if expert_bank(base.model, create=False) is not None:
            raise ValueError("the base given to the server already carries experts; pass a base without any "
                             "(the server attaches packs to copies of it)")
        self.base, self.config = base, config
        self._generations = itertools.count(1)
        self._downloaded = dict(downloaded or {})

    def load(self, packs) -> Served:
        """A new generation with ``packs`` (paths or URLs) attached; raises if a pack or the router does not
        load. URLs are downloaded again (see :mod:`inference.serve.sources`); ``packs`` are served under the
        names given, so a reload downloads them again too."""
        start = time.perf_counter()
        packs = tuple(str(p) for p in packs)
        for p in packs:
            if not is_url(p) and not Path(p).is_file():
                raise FileNotFoundError(f"pack {p} does not exist")
        downloaded, self._downloaded = self._downloaded, {}  # a copy made before the first load serves it once
        files = [downloaded.get(p) or local_copy(p) for p in packs]
        router = self.config.router
        if router is not None and is_url(router):
            router = str(local_copy(router))
        base = dataclasses.replace(self.base, model=shared_copy(self.base.model))
        for p, f in zip(packs, files):
            if not is_url(p):
                load_pack(base, f, force=self.config.force)
                continue
            try:
                bank = load_pack(base, f, force=self.config.force)
            except (ExpertFormatError, ExpertMismatchError) as e:  # a damaged download, a pack for another base
                raise type(e)(f"{p} (downloaded to {f}): {e}") from e
            for expert in bank.experts:  # /v1/models names the URL the expert came from, not the local copy
                if expert.info.get("pack") == str(f):
                    expert.info.update(pack=p, downloaded_to=str(f))
        if self.config.clsr_gates is not None:
            set_clsr_gates(base.model, self.config.clsr_gates)
        whisper = ExpertWhisper(base)
        options = whisper.resolve_options(
            "auto", TranscribeOptions(batch_size=self.config.max_batch, threshold=self.config.threshold,
                                      router=router, progress=False, silence_db=self.config.silence_db,
                                      max_new_tokens=self.config.max_new_tokens))
        return Served(whisper, packs, options, next(self._generations), time.perf_counter() - start)


class ServerState:
    """The server's moving parts: the current generation, the batcher, the metrics, admission counts."""

    def __init__(self, loader: PackLoader, config: ServeConfig, metrics: Metrics | None = None):
        self.loader, self.config = loader, config
        self.metrics = metrics or Metrics()
        self.current = loader.load(config.packs)
        self._count_load(self.current)
        self.batcher = Batcher(self._decode, config.max_batch, config.max_wait_ms, self.metrics)
        self.in_flight = 0
        self._reload_lock = threading.Lock()  # one load at a time (loads run in worker threads)

    @staticmethod
    def _decode(served: Served, key: DecodeKey, windows: list) -> None:
        served.whisper.decode_windows(windows, served.options_for(key))

    def _count_load(self, served: Served) -> None:
        self.metrics.inc("pack_loads_total", result="ok")
        self.metrics.set("pack_load_seconds", served.load_seconds)
        self.metrics.set("pack_generation", served.generation)

    def load_now(self, packs=None) -> Served:
        """Load ``packs`` (default: the current ones, re-read from disk) and serve them to new requests.

        Raises:
            OSError, ValueError: the load failed; the current generation keeps serving.
        """
        with self._reload_lock:
            packs = self.current.packs if packs is None else tuple(str(p) for p in packs)
            try:
                served = self.loader.load(packs)
            except Exception:
                self.metrics.inc("pack_loads_total", result="failed")
                raise
            self.current = served  # one assignment: the next admitted request sees the whole new generation
            self._count_load(served)
            log.warning("serving generation %d: %s (loaded in %.3f s)", served.generation,
                        ", ".join(served.whisper.bank.names) or "the base model alone", served.load_seconds)
            return served

    async def reload(self, packs=None) -> Served:
        """:meth:`load_now` off the event loop (loading is CPU work; requests keep being served meanwhile)."""
        return await asyncio.to_thread(self.load_now, packs)

    async def reload_logged(self) -> None:
        """Reload from disk, logging instead of raising (for SIGHUP, which has nobody to answer)."""
        try:
            await self.reload()
        except Exception as e:  # noqa: BLE001 - a bad pack on disk must not take the server down
            log.error("pack reload failed, still serving generation %d: %s", self.current.generation, e)
