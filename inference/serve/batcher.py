"""Dynamic batching across requests: windows of concurrent requests decoded together, one model thread.

Requests are cut into windows (up to 30 s) on the event loop and handed over as a :class:`Job`. One worker thread owns
the model (torch modules are not re-entrant and generate() is not thread-safe): it waits until ``max_batch``
windows are queued or the oldest has waited ``max_wait_ms``, takes up to ``max_batch`` windows in arrival order
that can share one ``generate`` call, decodes them, and resolves each job's future on the event loop once its
last window is done. Each window carries its own route (expert and language), so one call serves a batch
that mixes languages and experts, and a window's text does not depend on its batch-mates
(:class:`inference.transcribe.RowLimit` gives each row its own length limit).

Windows share a call when they belong to the same served generation (a pack reload starts a new one; jobs
admitted before it finish on the old one) and need the same decoding options (``key``: timestamps, task).
A cancelled job (its client left, or it timed out) has its undecoded windows dropped. If decoding a batch
fails, the jobs in it are retried one by one so that one bad request fails alone; the worker never dies.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from inference.serve.metrics import Metrics

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new work."""


@dataclass(eq=False)
class Job:
    """One request's windows on their way through the batcher.

    Attributes:
        served: what decodes it (a :class:`inference.serve.state.Served` generation, pinned at admission).
        key: decoding options that must be equal within one ``generate`` call (hashable).
        windows: its :class:`inference.transcribe.Window` s, in order; their segments are filled in place.
        future: resolved (None) on ``loop`` when every window is decoded, or failed with the error.
    """

    served: Any
    key: Any
    windows: list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    remaining: int = 0
    cancelled: bool = False
    finished: bool = False
    submitted: float = field(default_factory=time.monotonic)


class Batcher:
    """The queue of windows and the thread that decodes them.

    Args:
        decode: ``decode(served, key, windows)`` decodes windows in one ``generate`` call (filling segments).
        max_batch: most windows per call (1: no batching across requests).
        max_wait_ms: how long the oldest queued window may wait for batch-mates before a smaller batch goes.
        metrics: where batch sizes, queue depth, per-expert windows and drops are counted.
    """

    def __init__(self, decode: Callable[[Any, Any, list], None], max_batch: int = 16, max_wait_ms: float = 20.0,
                 metrics: Metrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.decode, self.max_batch, self.max_wait = decode, max_batch, max(0.0, max_wait_ms) / 1000
        self.metrics = metrics or Metrics()
        self._queue: deque[tuple[Job, Any, float]] = deque()  # (job, window, enqueued at)
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="whisper-experts-decoder", daemon=True)

    def start(self) -> "Batcher":
        """Start the worker thread."""
        self._thread.start()
        return self

    @property
    def queued(self) -> int:
        """Windows waiting to be decoded."""
        return len(self._queue)

    def submit(self, job: Job) -> None:
        """Queue a job's windows (called on the event loop); a job without windows is resolved at once."""
        with self._cond:
            if self._closing:
                raise BatcherClosed("the server is shutting down")
            job.remaining = len(job.windows)
            now = time.monotonic()
            self._queue.extend((job, w, now) for w in job.windows)
            self.metrics.set("queue_windows", len(self._queue))
            self._cond.notify_all()
        if not job.windows:
            self._finish(job, None)

    def cancel(self, job: Job) -> int:
        """Drop a job's windows that are not decoded yet (its client left); returns how many were dropped."""
        with self._cond:
            job.cancelled = True
            kept = deque(item for item in self._queue if item[0] is not job)
            dropped = len(self._queue) - len(kept)
            self._queue = kept
            self.metrics.set("queue_windows", len(self._queue))
        if dropped:
            self.metrics.inc("windows_dropped_total", dropped)
        return dropped

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new jobs; with ``drain`` decode what is queued first, else fail it. Joins the worker."""
        with self._cond:
            self._closing = True
            if not drain:
                abandoned = list(self._queue)
                self._queue.clear()
            self._cond.notify_all()
        if not drain:
            for job in {id(j): j for j, _, _ in abandoned}.values():
                self._finish(job, BatcherClosed("the server shut down before this request was decoded"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------ the worker
    def _take(self) -> list[tuple[Job, Any]] | None:
        """Wait for a batch and take it off the queue (None: closing and nothing left)."""
        with self._cond:
            while True:
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                job, _, since = self._queue[0]
                group = (id(job.served), job.key)
                ready = sum(1 for j, _, _ in self._queue if (id(j.served), j.key) == group)
                left = since + self.max_wait - time.monotonic()
                if ready >= self.max_batch or left <= 0 or self._closing:
                    break
                self._cond.wait(left)  # more windows may join the batch until the oldest has waited max_wait
            batch, rest = [], deque()
            for item in self._queue:
                j, w, _ = item
                if len(batch) < self.max_batch and (id(j.served), j.key) == group:
                    batch.append((j, w))
                else:
                    rest.append(item)
            self._queue = rest
            self.metrics.set("queue_windows", len(self._queue))
            return batch

    def _run(self) -> None:
        while True:
            try:
                batch = self._take()
                if batch is None:
                    return
                self._decode_batch(batch)
            except Exception:  # never let the worker die: log it; the jobs involved were failed already
                log.exception("decoding worker error")

    def _decode_batch(self, batch: list[tuple[Job, Any]]) -> None:
        jobs = list({id(j): j for j, _ in batch}.values())
        served, key = jobs[0].served, jobs[0].key
        windows = [w for _, w in batch]
        try:
            self.decode(served, key, windows)
        except Exception as e:
            if len(jobs) > 1:  # find the request that broke the batch: retry each alone
                log.warning("a batch of %d requests failed (%s); decoding them one by one", len(jobs), e)
                for job in jobs:
                    self._decode_batch([(j, w) for j, w in batch if j is job])
                return
            log.exception("decoding a request failed")
            self._finish(jobs[0], e)
            return
        self.metrics.inc("generate_calls_total")
        self.metrics.observe("batch_windows", len(windows))
        self.metrics.observe("batch_requests", len(jobs))
        for w in windows:
            expert = w.segments[0].expert if w.segments else None
            self.metrics.inc("expert_windows_total", expert=expert or "base")
            self.metrics.inc("audio_seconds_total", w.seconds)
        for job, _ in batch:
            job.remaining -= 1
        for job in jobs:
            if job.remaining <= 0:
                self._finish(job, None)

    def _finish(self, job: Job, error: BaseException | None) -> None:
        """Resolve the job's future on its event loop (once)."""
        if job.finished:
            return
        job.finished = True

        def resolve():
            if not job.future.done():
                if error is None:
                    job.future.set_result(None)
                else:
                    job.future.set_exception(error)

        try:
            job.loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the loop is closed (shutdown): nobody waits for this answer any more
            pass
