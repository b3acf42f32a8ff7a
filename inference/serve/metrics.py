"""The server's counters, gauges and histograms, written as Prometheus text (exposition format 0.0.4).

Written by hand rather than with ``prometheus_client``: a dozen series do not need a dependency, and one lock
covers updates from the event loop and from the decoding thread alike.

===============================================  =============================================================
``whisper_experts_requests_total{status}``       transcription requests answered, by HTTP status
``whisper_experts_errors_total{type}``           errors by kind (``invalid_audio``, ``queue_full``, ``timeout``...)
``whisper_experts_request_seconds``              request latency (upload received to answer) histogram
``whisper_experts_batch_windows``                windows per ``generate`` call, histogram
``whisper_experts_batch_requests``               requests sharing one ``generate`` call, histogram
``whisper_experts_generate_calls_total``         ``generate`` calls (batches decoded)
``whisper_experts_queue_windows``                windows waiting to be decoded (gauge)
``whisper_experts_requests_in_flight``           requests admitted and not yet answered (gauge)
``whisper_experts_expert_windows_total{expert}`` windows decoded per expert (``base``: the base model)
``whisper_experts_windows_dropped_total``        windows never decoded (their client left or timed out)
``whisper_experts_audio_seconds_total``          seconds of audio decoded
``whisper_experts_pack_loads_total{result}``     pack (re)loads, ``ok`` or ``failed``
``whisper_experts_pack_load_seconds``            duration of the last successful pack load (gauge)
``whisper_experts_pack_generation``              which load is serving new requests (gauge)
===============================================  =============================================================
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

PREFIX = "whisper_experts_"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

_HELP = {
    "requests_total": ("counter", "Transcription requests answered, by HTTP status."),
    "errors_total": ("counter", "Errors, by kind."),
    "request_seconds": ("histogram", "Request latency in seconds (upload received to answer)."),
    "batch_windows": ("histogram", "Windows (at most 30 s) decoded per generate call."),
    "batch_requests": ("histogram", "Requests whose windows share one generate call."),
    "generate_calls_total": ("counter", "generate calls (batches decoded)."),
    "queue_windows": ("gauge", "Windows waiting to be decoded."),
    "requests_in_flight": ("gauge", "Requests admitted and not yet answered."),
    "expert_windows_total": ("counter", "Windows decoded per expert (base: the base model)."),
    "windows_dropped_total": ("counter", "Windows never decoded because their client left or timed out."),
    "audio_seconds_total": ("counter", "Seconds of audio decoded."),
    "pack_loads_total": ("counter", "Pack loads and reloads, by result."),
    "pack_load_seconds": ("gauge", "Seconds the last successful pack load took."),
    "pack_generation": ("gauge", "Generation (load number) of the packs serving new requests."),
}


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip([*map(_number, self.buckets), "+Inf"], self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {cumulative}"]


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Thread-safe metrics of one server; :meth:`render` gives the ``/metrics`` page."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[str, defaultdict] = {n: defaultdict(float) for n, (t, _) in _HELP.items()
                                                 if t == "counter"}
        self.gauges: dict[str, float] = {n: 0.0 for n, (t, _) in _HELP.items() if t == "gauge"}
        self.histograms = {"request_seconds": _Histogram(LATENCY_BUCKETS),
                           "batch_windows": _Histogram(BATCH_BUCKETS), "batch_requests": _Histogram(BATCH_BUCKETS)}

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        """Add ``amount`` to counter ``name`` (one series per label set)."""
        with self._lock:
            self.counters[name][tuple(sorted(labels.items()))] += amount

    def set(self, name: str, value: float) -> None:
        """Set gauge ``name``."""
        with self._lock:
            self.gauges[name] = float(value)

    def add(self, name: str, amount: float) -> None:
        """Move gauge ``name`` by ``amount``."""
        with self._lock:
            self.gauges[name] += amount

    def observe(self, name: str, value: float) -> None:
        """Record ``value`` in histogram ``name``."""
        with self._lock:
            self.histograms[name].observe(value)

    def value(self, name: str, **labels) -> float:
        """A counter's value for one label set (0 if never incremented), or a gauge's value."""
        with self._lock:
            if name in self.gauges:
                return self.gauges[name]
            return self.counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """Every metric in Prometheus text format."""
        lines = []
        with self._lock:
            for name, (kind, text) in _HELP.items():
                full = PREFIX + name
                lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    series = self.counters[name] or ({(): 0.0} if name.endswith("_total") else {})
                    for labels, v in sorted(series.items()):
                        tags = ",".join(f'{k}="{_label(val)}"' for k, val in labels)
                        lines.append(f"{full}{{{tags}}} {_number(v)}" if tags else f"{full} {_number(v)}")
                elif kind == "gauge":
                    lines.append(f"{full} {_number(self.gauges[name])}")
                else:
                    lines += self.histograms[name].lines(full)
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """``/metrics`` text -> ``{'name{labels}': value}`` (tests and benchmarks read the page back with it)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
