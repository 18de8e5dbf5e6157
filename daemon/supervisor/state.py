"""What the supervisor knows: one :class:`ModelState` per model, one :class:`Job` per export.

Plain data. Every unit of the supervisor reads and updates these; none of
them holds state of its own about a model or a job.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.basepath.catalog import Published, planning_history
from daemon.config.loading import ModelConfig
from daemon.protocol import ExportRequest, ExportResult, ValidationResult
from daemon.rules.planner import History, Plan
from daemon.rules.versions import checkpoint_step
from daemon.sources import Checkpoint, ScanResult, Source
from daemon.supervisor.metric_reader import MetricReader
from daemon.supervisor.warm_pool import Proc, WarmChild


@dataclass
class Job:
    """One checkpoint on its way to becoming a version.

    ``phase`` is one of :data:`daemon.rules.failures.PHASES`; the first,
    ``pin``, is when the checkpoint is staged (:mod:`daemon.supervisor.staging`).
    """

    model: ModelState
    ckpt: Checkpoint
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    phase: str = "pin"
    #: ``.ckpt-exporter/staging/<pid>-<job>/``: the staged checkpoint, requests, results, logs.
    staging: Path | None = None
    #: The folder the export is written into (published by renaming it).
    temp_dir: Path | None = None
    #: The staged checkpoint's prefix, inside ``staging``.
    staged: Path | None = None
    proc: Proc | None = None
    #: The warm child running the phase, if one does (a kept exporter goes back to the pool).
    child: WarmChild | None = None
    #: Set by the waiting thread when the phase's process finished its request.
    child_done: threading.Event = field(default_factory=threading.Event)
    #: Which kept export worker may serve this export (see :mod:`daemon.supervisor.reuse`).
    worker_key: str | None = None
    #: Which versions' graph this export may reuse, and will carry (metadata ``export_key``).
    graph_key: str | None = None
    #: A validator handed its request with the export, waiting for "go".
    early: WarmChild | None = None
    deadline: float = 0.0
    started: float = field(default_factory=time.monotonic)
    phase_started: float = field(default_factory=time.monotonic)
    durations: dict[str, float] = field(default_factory=dict)
    #: The worker's result, once the export succeeded.
    export_result: ExportResult | None = None
    #: The validator's report, once validation passed.
    validation: ValidationResult | None = None
    gate: dict[str, Any] = field(default_factory=dict)  # the gate decisions, for the metadata
    export_request: ExportRequest | None = None
    lock_wait_logged: bool = False
    #: Storage work of the phase running in the context's I/O threads (a
    #: fetch from or an upload to an object store), until it is done.
    io: Future[Any] | None = None
    #: The template version's weights map keys, when the export may reuse a graph.
    template: str | None = None
    done: bool = False
    #: The version this job published, once it did.
    published_version: int | None = None

    @property
    def step(self) -> int | None:
        """The ``-N`` suffix, or once exported, the step counter saved in the checkpoint."""
        saved = self.export_result["saved_counters"] if self.export_result else {}
        return checkpoint_step(self.ckpt.step, saved)

    @property
    def log_fields(self) -> dict[str, Any]:
        return {
            "model": self.model.cfg.name,
            "checkpoint": str(self.ckpt.prefix),
            "step": self.step,
            "job": self.id,
        }


@dataclass
class ModelState:
    """What the supervisor knows about one model; rebuilt from disk at start."""

    cfg: ModelConfig
    source: Source
    published: list[Published] = field(default_factory=list)
    rejected: dict[str, dict[str, Any]] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    last_publish_time: float | None = None
    job: Job | None = None
    dirty: bool = True
    wait_until: float | None = None
    last_plan: Plan | None = None
    last_scan: ScanResult | None = None
    reported: set[str] = field(default_factory=set)  # problems already logged once
    incomplete_since: dict[str, float] = field(default_factory=dict)  # prefix -> monotonic
    failing_since: float | None = None  # first failure since the last publication
    next_cfg: ModelConfig | None = None  # a reload's new config, applied once idle
    retiring: bool = False  # removed by a reload; goes once its export ends
    paused: dict[str, Any] | None = None  # a model-kind failure, until reload
    metric_reader: MetricReader = field(default_factory=MetricReader)
    #: With [serving_config]: the versions the model config lists or a label
    #: wants, which retention keeps.
    serving_versions: frozenset[int] = frozenset()
    #: With [serving_config]: the version the config file labels stable now.
    stable_version: int | None = None
    #: Checkpoints whose incremental export failed validation: exported in full next.
    full_export_only: set[str] = field(default_factory=set)

    @property
    def newest(self) -> Published | None:
        """The highest version this daemon published for the model, if any."""
        return max(self.published, key=lambda p: p.version, default=None)

    def history(self) -> History:
        """What the planner must know of this model's past (without the rollback record)."""
        return planning_history(
            self.published,
            self.rejected,
            retry_at=self.retry_at,
            last_publish_time=self.last_publish_time,
        )
