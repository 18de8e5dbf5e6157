"""Prometheus metrics. They live in the supervisor; children report results to it.

Each :class:`Metrics` owns a fresh :class:`CollectorRegistry` (never the global
one), so tests and several daemons in one process do not collide. Names follow
Prometheus conventions: base units (seconds, bytes), ``_total`` for counters.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from daemon import __version__
from daemon.objectstore.traffic import TRAFFIC
from daemon.rules.failures import PHASES, known_failures_by_phase

#: Export phases take from a fraction of a second (tiny models) to an hour
#: (large models on a busy CPU); the web defaults stop at 10 s.
PHASE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
#: From the checkpoint being written to its version being visible to the server.
LATENCY_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

OUTCOMES = ("published", "failed", "rejected")
#: Child roles (the processes the supervisor starts per export).
ROLES = ("export", "validate")
#: Failure reasons known in advance, by phase (:mod:`daemon.rules.failures`),
#: pre-initialised so that ``increase()`` over them starts from 0 rather than
#: from a missing series. A reason missing from the registry (a bug the tests
#: catch) still appears when it first happens.
KNOWN_FAILURES: dict[str, tuple[str, ...]] = known_failures_by_phase()
VALIDATION_OUTCOMES = ("passed", "failed")
#: (outcome, reason) of publication gates, pre-initialised like the failures.
GATE_DECISIONS = (
    ("passed", "metric"),
    ("passed", "command"),
    ("blocked", "metric"),
    ("blocked", "metric_missing"),
    ("blocked", "command"),
)
WATCH_BACKENDS = ("inotify", "polling", "other")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.build_info = Info("ckpt_exporter_build", "Daemon version.", registry=r)
        self.build_info.info({"version": __version__})
        self.exports = Counter(
            "ckpt_exporter_exports",
            "Finished export attempts by outcome "
            "(published; failed: transient, retried; rejected: permanent).",
            ["model", "outcome"],
            registry=r,
        )
        self.failures = Counter(
            "ckpt_exporter_export_failures",
            "Failed export attempts by the phase that failed and the reason.",
            ["model", "phase", "reason"],
            registry=r,
        )
        self.validations = Counter(
            "ckpt_exporter_validations",
            "Validations of exported SavedModels by outcome.",
            ["model", "outcome"],
            registry=r,
        )
        self.gate_decisions = Counter(
            "ckpt_exporter_gate_decisions",
            "Publication gate decisions by outcome (passed, blocked) and reason "
            "(metric, metric_missing, command); a blocked checkpoint is not retried.",
            ["model", "outcome", "reason"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "ckpt_exporter_worker_restarts",
            "Worker processes that ended abnormally (crash, signal, timeout kill); "
            "the retry starts a fresh one.",
            ["model", "role"],
            registry=r,
        )
        self.scan_errors = Counter(
            "ckpt_exporter_scan_errors",
            "Checkpoint directory scans that failed (unreadable directory or file).",
            ["model"],
            registry=r,
        )
        self.watch_backend = Gauge(
            "ckpt_exporter_watch_backend",
            "1 for the filesystem watch backend in use (inotify, or polling after a fallback).",
            ["backend"],
            registry=r,
        )
        self.latest_version_bytes = Gauge(
            "ckpt_exporter_latest_version_size_bytes",
            "Bytes on disk of the newest version published by this daemon.",
            ["model"],
            registry=r,
        )
        self.warm_children_bytes = Gauge(
            "ckpt_exporter_warm_children_resident_bytes",
            "Resident memory of the zygotes and the kept export workers (0 when off).",
            registry=r,
        )
        self.phase_seconds = Histogram(
            "ckpt_exporter_phase_duration_seconds",
            "Duration of each export phase.",
            ["model", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "ckpt_exporter_checkpoint_to_published_seconds",
            "Time from a checkpoint being written to its version being published.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latest_version = Gauge(
            "ckpt_exporter_latest_version",
            "Newest version published by this daemon.",
            ["model"],
            registry=r,
        )
        self.latest_step = Gauge(
            "ckpt_exporter_latest_step",
            "Training step of the newest published version.",
            ["model"],
            registry=r,
        )
        self.pending = Gauge(
            "ckpt_exporter_pending_checkpoints",
            "Complete checkpoints waiting to be exported.",
            ["model"],
            registry=r,
        )
        self.versions_on_disk = Gauge(
            "ckpt_exporter_versions_on_disk",
            "Versions in the base path published by this daemon.",
            ["model"],
            registry=r,
        )
        self.last_publish = Gauge(
            "ckpt_exporter_last_publish_timestamp_seconds",
            "Unix time of the last successful publication.",
            ["model"],
            registry=r,
        )
        r.register(ObjectStoreCollector())

    def init_model(self, model: str) -> None:
        """Create every label set for ``model`` so rates and alerts see zeros, not gaps."""
        for outcome in OUTCOMES:
            self.exports.labels(model, outcome)
        for phase in PHASES:
            self.phase_seconds.labels(model, phase)
        for phase, reasons in KNOWN_FAILURES.items():
            for reason in reasons:
                self.failures.labels(model, phase, reason)
        for outcome in VALIDATION_OUTCOMES:
            self.validations.labels(model, outcome)
        for role in ROLES:
            self.worker_restarts.labels(model, role)
        for outcome, reason in GATE_DECISIONS:
            self.gate_decisions.labels(model, outcome, reason)
        self.scan_errors.labels(model)
        self.latency.labels(model)
        for g in self._model_gauges():
            g.labels(model)

    def forget_model(self, model: str) -> None:
        """Drop ``model``'s gauges (after a reload removed it) so no stale value lingers.

        Counters and histograms stay: their totals remain true for this process.
        """
        for g in self._model_gauges():
            with contextlib.suppress(KeyError):
                g.remove(model)

    def _model_gauges(self) -> tuple[Gauge, ...]:
        return (
            self.latest_version,
            self.latest_step,
            self.pending,
            self.versions_on_disk,
            self.last_publish,
            self.latest_version_bytes,
        )

    def set_watch_backend(self, backend: str) -> None:
        name = {"InotifyObserver": "inotify", "polling": "polling"}.get(backend, "other")
        for b in WATCH_BACKENDS:
            self.watch_backend.labels(b).set(1 if b == name else 0)

    def serve(
        self, host: str, port: int, health: Callable[[], tuple[bool, dict[str, Any]]]
    ) -> HTTPServer:
        """Serve ``/metrics`` and ``/healthz`` from a daemon thread.

        ``health`` is called on the HTTP thread for each probe and must only
        read state (see :mod:`daemon.rules.health`).
        """
        server = HTTPServer((host, port), self.registry, health)
        server.thread.start()
        return server

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ObjectStoreCollector(Collector):
    """Exposes the process's object-store counters (:data:`daemon.objectstore.traffic.TRAFFIC`).

    Read at scrape time from one consistent snapshot; the backends count,
    this only translates. Series appear once a scheme was used.
    """

    def collect(self) -> Iterator[Metric]:
        snap = TRAFFIC.snapshot()
        requests = CounterMetricFamily(
            "ckpt_exporter_object_store_requests",
            "Object-store operations by scheme, operation and outcome "
            "(ok, or the error kind it failed with after retries).",
            labels=["scheme", "operation", "outcome"],
        )
        for (scheme, operation, outcome), n in sorted(snap.requests.items()):
            requests.add_metric([scheme, operation, outcome], n)
        uploaded = CounterMetricFamily(
            "ckpt_exporter_object_store_uploaded_bytes",
            "Bytes written to object stores.",
            labels=["scheme"],
        )
        for scheme, n in sorted(snap.bytes_uploaded.items()):
            uploaded.add_metric([scheme], n)
        downloaded = CounterMetricFamily(
            "ckpt_exporter_object_store_downloaded_bytes",
            "Bytes read from object stores (listings excluded).",
            labels=["scheme"],
        )
        for scheme, n in sorted(snap.bytes_downloaded.items()):
            downloaded.add_metric([scheme], n)
        retries = CounterMetricFamily(
            "ckpt_exporter_object_store_retries",
            "Object-store requests repeated after a retryable failure (5xx, 429, resets).",
            labels=["scheme"],
        )
        for scheme, n in sorted(snap.retries.items()):
            retries.add_metric([scheme], n)
        yield from (requests, uploaded, downloaded, retries)


class HTTPServer(ThreadingHTTPServer):
    """``/metrics`` (Prometheus text format) and ``/healthz`` (JSON, 200 or 503).

    A small server of our own rather than prometheus_client's, because
    ``/healthz`` must answer from the same listener and the same thread.
    """

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.registry = registry
        self.health = health
        self.thread = threading.Thread(target=self.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: HTTPServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        elif path == "/healthz":
            ok, body = self.server.health()
            data = json.dumps(body, sort_keys=True).encode() + b"\n"
            self._send(200 if ok else 503, "application/json", data)
        elif path == "/":
            self._send(200, "text/plain; charset=utf-8", b"ckpt-exporter: /metrics /healthz\n")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news; errors surface as failed scrapes
