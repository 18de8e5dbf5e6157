"""Prometheus metrics. They live in the supervisor; children report results to it.

Each :class:`Metrics` owns a fresh :class:`CollectorRegistry` (never the global
one), so tests and several daemons in one process do not collide. Names follow
Prometheus conventions: base units (seconds, bytes), ``_total`` for counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest, start_http_server

from daemon import __version__

#: Export phases take from a fraction of a second (tiny models) to an hour
#: (large models on a busy CPU); the web defaults stop at 10 s.
PHASE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
#: From the checkpoint being written to its version being visible to the server.
LATENCY_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

OUTCOMES = ("published", "failed", "rejected")
PHASES = ("pin", "export", "validate", "publish")


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
            "Failed export attempts by reason.",
            ["model", "reason"],
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

    def init_model(self, model: str) -> None:
        """Create every label set for ``model`` so rates and alerts see zeros, not gaps."""
        for outcome in OUTCOMES:
            self.exports.labels(model, outcome)
        for phase in PHASES:
            self.phase_seconds.labels(model, phase)
        self.latency.labels(model)
        for g in (
            self.latest_version,
            self.latest_step,
            self.pending,
            self.versions_on_disk,
            self.last_publish,
        ):
            g.labels(model)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
