"""The supervisor: the main loop, signals, and the jobs that carry checkpoints.

Shape (after gunicorn's arbiter): signal handlers and watcher threads only put
a message on a queue; the main loop alone reads the disk, starts children,
publishes and updates metrics. The supervisor never imports TensorFlow, so it
starts fast and a crash in TensorFlow code cannot take it down.

One checkpoint's journey is a :class:`Job` with phases:

``pin`` (hard-link into staging) -> ``export`` (worker child) -> ``validate``
(validator child) -> ``publish`` (lock, version, fsync, rename) -> retention.

A job that fails is classified: *permanent* (the checkpoint or model is bad:
recorded in ``rejected.json`` and never retried) or *transient* (timeout,
crash, resources: retried with exponential backoff). Its export folder is
moved aside for inspection, never published.

Signals: SIGHUP re-reads the config (a bad one is logged and the old one
kept); the first SIGTERM or SIGINT stops taking work and gives a running
export ``shutdown_grace_seconds`` to finish; a second one stops at once.
Under systemd the loop sends ``WATCHDOG=1`` only after checking that its
threads are alive, so a hung loop or a dead watcher gets the service restarted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import __version__, exitcodes, logs, protocol
from daemon.basepath.catalog import Published, published_versions
from daemon.basepath.layout import REPORT_RELPATH, state_dir
from daemon.basepath.operations import (
    apply_rolled_back,
    highest_rolled_back_version,
    read_pins,
    read_rolled_back,
    rolled_back_path,
    rolled_back_problem,
    tree_bytes,
)
from daemon.basepath.publish import (
    BasePathLock,
    move_aside,
    new_temp_dir,
    publish,
    remove_stale_staging,
    remove_stale_temps,
    remove_version,
)
from daemon.basepath.records import read_rejected, write_rejected
from daemon.config.builders import builder_file, check_builders
from daemon.config.loading import Config, ConfigError, ModelConfig, load_config
from daemon.durable import write_json_atomic
from daemon.rules.gate import MetricReader, command_argv, decide, threshold
from daemon.rules.health import HealthSnapshot, evaluate
from daemon.rules.planner import History, Plan, plan
from daemon.rules.versions import (
    VersionError,
    checkpoint_step,
    next_version,
    plan_retention,
    step_version,
)
from daemon.sources import SOURCES, Checkpoint, ScanResult, Source
from daemon.supervisor import reuse, systemd
from daemon.supervisor.metrics import HTTPServer, Metrics
from daemon.supervisor.staging import CheckpointVanished, pin_checkpoint
from daemon.supervisor.warm_pool import WARM_MODULES, Proc, WarmChild, WarmPool
from daemon.supervisor.warm_pool import stop as warm_stop
from daemon.supervisor.watch import Watcher

#: Longest wait between retries of a transient failure.
MAX_BACKOFF_SECONDS = 3600.0
#: How long a child gets after SIGTERM before SIGKILL on shutdown.
CHILD_KILL_GRACE_SECONDS = 5.0
#: How long a checkpoint may stay incomplete before it is reported (once).
INCOMPLETE_REPORT_SECONDS = 5.0
#: Failures that say the model's code or config is wrong, not the checkpoint:
#: rejecting the checkpoint would lose it for good once the user fixes the
#: builder, so instead the model pauses until the next reload or start.
MODEL_FAILURES = frozenset(
    {
        "builder_import",
        "builder_error",
        "no_signature",
        "command_failed",
        "sample_inputs",
        "warmup_unavailable",
        "gate_unusable",
    }
)
#: How often a checkpoint waiting for its gate metric looks for it again.
GATE_POLL_SECONDS = 5.0


@dataclass
class Job:
    """One checkpoint on its way to becoming a version."""

    model: ModelState
    ckpt: Checkpoint
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    phase: str = "pin"
    staging: Path | None = None
    temp_dir: Path | None = None
    pinned: Path | None = None
    proc: Proc | None = None
    #: The warm child running the phase, if one does (a kept exporter goes back to the pool).
    child: WarmChild | None = None
    #: Set by the waiting thread when the phase's process finished its request.
    child_done: threading.Event = field(default_factory=threading.Event)
    #: Exports of this model that may share one export worker have this key (see _start_job).
    exporter_key: str | None = None
    #: A validator handed its request with the export, waiting for "go" (_start_validator_early).
    early: WarmChild | None = None
    deadline: float = 0.0
    started: float = field(default_factory=time.monotonic)
    phase_started: float = field(default_factory=time.monotonic)
    durations: dict[str, float] = field(default_factory=dict)
    export_result: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)  # the gate decisions, for the metadata
    export_request: dict[str, Any] = field(default_factory=dict)
    export_key: str | None = None  # set when the model may export incrementally
    lock_wait_logged: bool = False
    done: bool = False

    @property
    def step(self) -> int | None:
        """The ``-N`` suffix, or once exported, the step counter saved in the checkpoint."""
        return checkpoint_step(self.ckpt.step, self.export_result.get("saved_counters", {}))

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
    paused: dict[str, Any] | None = None  # a MODEL_FAILURES failure, until reload
    metric_reader: MetricReader = field(default_factory=MetricReader)
    #: Checkpoints whose incremental export failed validation: exported in full next.
    full_export_only: set[str] = field(default_factory=set)

    def history(self) -> History:
        return History(
            published_fingerprints=frozenset(p.fingerprint for p in self.published),
            watermark_ns=max((p.written_ns for p in self.published), default=0),
            rejected=frozenset(self.rejected),
            retry_at=dict(self.retry_at),
            last_publish_time=self.last_publish_time,
        )

    def history_on_disk(self) -> History:
        """:meth:`history` with ``ckpt-exporter rollback``'s record folded in."""
        return apply_rolled_back(self.history(), self.cfg.base_path)


class Supervisor:
    """Runs the daemon for one :class:`Config`. Call :meth:`run` from the main thread."""

    def __init__(
        self,
        config: Config,
        log: Any,
        *,
        metrics: Metrics | None = None,
        force_polling: bool = False,
        on_published: Callable[[str, int, Path, dict[str, Any]], None] | None = None,
        log_format_override: str | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.metrics = metrics or Metrics()
        self.queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.models: dict[str, ModelState] = {}
        for m in config.models:
            self.models[m.name] = ModelState(cfg=m, source=SOURCES[m.source].scanner(m.options))
        self.watcher = Watcher(self._hint, log, force_polling=force_polling)
        self.stopping = False
        self.stop_deadline: float | None = None
        self.http: HTTPServer | None = None
        self.on_published = on_published
        self.log_format_override = log_format_override
        self._next_rescan = 0.0
        self._last_status = ""
        self._stopping_notified = False
        self._daemon_reported: set[str] = set()
        self._health = HealthSnapshot(loop_monotonic=time.monotonic())
        self._watchdog_interval = _watchdog_interval()
        self._next_watchdog = 0.0
        self.warm = WarmPool(enabled=config.daemon.warm_workers)

    @property
    def metrics_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    # --- messages from other threads and signal handlers --------------------

    def _hint(self, model: str) -> None:
        self.queue.put(("hint", model))

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # SimpleQueue.put is reentrant, so it is safe inside a signal handler.
        self.queue.put(("signal", signum))

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # --- start-up -----------------------------------------------------------

    def start(self) -> None:
        """Rebuild state from disk, clean up after a crash, start watching and serving."""
        for st in self.models.values():
            self.metrics.init_model(st.cfg.name)
            self._load_state(st)
        hp = self.config.daemon.metrics_host_port
        if hp is not None:
            self.http = self.metrics.serve(*hp, health=self.health)
            self.log.info("metrics_listening", address=f"{hp[0]}:{self.http.port}")
        self.watcher.start()
        self.watcher.sync({n: s.cfg.checkpoint_dir for n, s in self.models.items()})
        self.metrics.set_watch_backend(self.watcher.backend)
        self.log.info(
            "started",
            version=__version__,
            models=sorted(self.models),
            watch_backend=self.watcher.backend,
            pid=os.getpid(),
            config=str(self.config.path) if self.config.path else None,
        )
        systemd.notify("READY=1", f"STATUS={self.status_line()}")

    def _load_state(self, st: ModelState) -> None:
        base = st.cfg.base_path
        try:
            base.mkdir(parents=True, exist_ok=True)
            for p in remove_stale_temps(base):
                self.log.info("removed_stale_temp_dir", model=st.cfg.name, path=str(p))
            # Only staging of processes that are gone: another daemon or
            # `ckpt-exporter export` on this base path may be exporting now.
            remove_stale_staging(base)
            # Versions renamed out of sight by retention but not yet fully deleted
            # when the daemon was killed: invisible to the server, only wasting space.
            shutil.rmtree(state_dir(base) / "trash", ignore_errors=True)
        except OSError as e:
            self._report_once(
                st,
                "base_path",
                "base_path_unusable",
                path=str(base),
                error=str(e),
                hint="create it and make it writable by the daemon",
            )
        st.rejected = read_rejected(base)
        self._refresh_published(st)
        if st.published:
            newest = max(st.published, key=lambda p: p.version)
            st.last_publish_time = float(newest.metadata.get("published_at", 0)) or None
            if st.last_publish_time is not None:
                # Restored from disk so that a restart does not look like "never published".
                self.metrics.last_publish.labels(st.cfg.name).set(st.last_publish_time)

    def _refresh_published(self, st: ModelState) -> None:
        """Re-read this model's versions from the base path (kept as they were if unreadable)."""
        try:
            st.published = published_versions(st.cfg.base_path, st.cfg.name)
        except OSError as e:
            self._report_once(
                st,
                "base_path_read",
                "base_path_unreadable",
                path=str(st.cfg.base_path),
                error=str(e),
                hint="make the base path readable and writable by the daemon's user",
            )
            return
        st.reported.discard("base_path_read")
        name = st.cfg.name
        self.metrics.versions_on_disk.labels(name).set(len(st.published))
        if st.published:
            newest = max(st.published, key=lambda p: p.version)
            self.metrics.latest_version.labels(name).set(newest.version)
            if newest.step is not None:
                self.metrics.latest_step.labels(name).set(newest.step)

    # --- the main loop ------------------------------------------------------

    def run(self, *, until: Callable[[], bool] | None = None) -> int:
        """Run until stopped by a signal (or ``until()`` turns true); returns the exit code.

        After a stop request the loop keeps turning, without starting new
        work, until the running exports end or the grace period runs out.
        """
        self.start()
        try:
            while True:
                self._tick()
                if until is not None and until():
                    break
                if self.stopping and (
                    not self._running_jobs()
                    or (self.stop_deadline is not None and time.monotonic() >= self.stop_deadline)
                ):
                    break
        finally:
            self.shutdown()
        return exitcodes.OK

    def health(self) -> tuple[bool, dict[str, Any]]:
        """The /healthz verdict; called on the HTTP thread, reads one snapshot only."""
        d = self.config.daemon
        return evaluate(
            self._health,
            now_monotonic=time.monotonic(),
            now_wall=time.time(),
            stall_seconds=d.health_stall_seconds,
            failing_seconds=d.health_failing_seconds,
        )

    def export_once(self, model: str, prefix: Path | None = None) -> tuple[int, str]:
        """Run one checkpoint through the same pipeline now, without watching.

        ``prefix`` defaults to the newest complete checkpoint. Returns an exit
        code and a one-line summary. A checkpoint already published is not
        exported again (exit 0).
        """
        st = self.models[model]
        self.metrics.init_model(model)
        self._load_state(st)
        scan = st.source.scan(st.cfg.checkpoint_dir)
        if not scan.directory_exists:
            return exitcodes.PERMANENT_FAILURE, f"{st.cfg.checkpoint_dir} does not exist"
        if prefix is None:
            if not scan.checkpoints:
                return exitcodes.PERMANENT_FAILURE, (
                    f"no complete checkpoint in {st.cfg.checkpoint_dir}"
                )
            ckpt = scan.checkpoints[-1]
        else:
            found = [c for c in scan.checkpoints if c.prefix == prefix.resolve()]
            if not found:
                return exitcodes.PERMANENT_FAILURE, (
                    f"{prefix} is not a complete checkpoint in {st.cfg.checkpoint_dir} "
                    f"(complete: {', '.join(c.name for c in scan.checkpoints) or 'none'})"
                )
            ckpt = found[0]
        done = [p for p in st.published if p.fingerprint == ckpt.fingerprint]
        if done:
            return exitcodes.OK, f"{ckpt.name} is already published as version {done[0].version}"
        published: list[int] = []
        previous = self.on_published
        self.on_published = lambda _m, v, _p, _r: published.append(v)
        try:
            # The operator named this checkpoint: the metric gate does not
            # apply (the command gate, part of the pipeline, still does).
            self._start_job(st, ckpt, {})
            job = st.job
            while job is not None and not job.done and not self.stopping:
                with contextlib.suppress(queue.Empty):
                    self._handle(self.queue.get(timeout=1.0))
                self._advance(job)
        finally:
            self.on_published = previous
            if st.job is not None:
                self.shutdown()
        if published:
            return exitcodes.OK, f"{ckpt.name} published as version {published[0]}"
        return exitcodes.PERMANENT_FAILURE, f"{ckpt.name} was not published (see the log)"

    def _tick(self) -> None:
        now = time.monotonic()
        self._health = HealthSnapshot(
            loop_monotonic=now,
            failing_since={n: s.failing_since for n, s in self.models.items()},
        )
        self._watchdog(now)
        timeout = max(0.0, min(self._next_wake(now) - now, 1.0))
        try:
            msg = self.queue.get(timeout=timeout)
        except queue.Empty:
            msg = None
        # Drain everything that arrived, so a burst of events costs one scan.
        while msg is not None:
            self._handle(msg)
            try:
                msg = self.queue.get_nowait()
            except queue.Empty:
                msg = None
        if self.stopping:
            # Stop taking work, but let running jobs move on to the end.
            for st in list(self.models.values()):
                if st.job is not None:
                    self._advance(st.job)
            self._update_status()
            return
        now = time.monotonic()
        if now >= self._next_rescan:
            self._next_rescan = now + self.config.daemon.rescan_interval_seconds
            for st in self.models.values():
                st.dirty = True
                if st.job is None:
                    # The base path is the truth: someone may have rolled back,
                    # deleted or pinned versions since we last looked.
                    self._refresh_published(st)
                    st.rejected.update(read_rejected(st.cfg.base_path))
            self._sync_watches()
        for st in list(self.models.values()):
            if st.job is not None:
                self._advance(st.job)
        # After the jobs moved on (one may have just finished) and before new
        # ones start, so that the next job finds its children started.
        self._refill_warm()
        for st in self.models.values():
            if st.retiring:
                continue
            if st.wait_until is not None and time.time() >= st.wait_until:
                st.dirty = True
            if st.dirty:
                self._scan_and_plan(st)
        self._update_status()

    def _next_wake(self, now: float) -> float:
        wake = self._next_rescan
        for st in self.models.values():
            if st.job is not None:
                # Poll running jobs (deadline, lock retry) at least every second.
                wake = min(wake, now + 1.0, st.job.deadline or wake)
            if st.wait_until is not None:
                wake = min(wake, now + max(0.0, st.wait_until - time.time()))
        if self._watchdog_interval:
            wake = min(wake, self._next_watchdog)
        if self.stop_deadline is not None:
            wake = min(wake, self.stop_deadline)
        return wake

    def _watchdog(self, now: float) -> None:
        """Ping systemd's watchdog, but only while everything we rely on is alive.

        Pinging from a timer thread would keep a hung main loop alive forever;
        pinging from the loop, after checking the threads, lets systemd restart
        the daemon when the loop, the watcher or the HTTP listener is gone.
        """
        if not self._watchdog_interval or now < self._next_watchdog:
            return
        dead = []
        if not self.watcher.alive():
            dead.append("watcher")
        if self.http is not None and not self.http.alive():
            dead.append("metrics_http")
        if dead:
            self._report_daemon_once("watchdog_withheld", threads=dead)
            return
        self._next_watchdog = now + self._watchdog_interval
        systemd.notify("WATCHDOG=1")

    def _report_daemon_once(self, event: str, **fields: Any) -> None:
        if event not in self._daemon_reported:
            self._daemon_reported.add(event)
            self.log.error(event, **fields)

    def _handle(self, msg: tuple[str, Any]) -> None:
        kind, value = msg
        if kind == "signal" and value == signal.SIGHUP:
            self.reload()
        elif kind == "signal":
            self._request_stop(signal.Signals(value).name)
        elif kind == "hint":
            st = self.models.get(value)
            if st is not None:
                st.dirty = True
                if self.watcher.is_standin(value):
                    # Something changed next to a missing checkpoint dir (it
                    # may have appeared): watch it now, not at the next rescan.
                    self._sync_watches()
        elif kind == "child":
            pass  # the job is advanced right after the queue is drained

    def _request_stop(self, signame: str) -> None:
        now = time.monotonic()
        running = [st.job.log_fields for st in self.models.values() if st.job is not None]
        if self.stopping:
            self.log.warning("stop_forced", signal=signame, abandoning=running)
            self.stop_deadline = now
            return
        self.stopping = True
        grace = self.config.daemon.shutdown_grace_seconds
        self.stop_deadline = now + grace
        self.log.info(
            "stop_requested",
            signal=signame,
            grace_seconds=grace,
            waiting_for=running,
            hint="a second SIGTERM or SIGINT stops at once" if running else None,
        )
        self._notify_stopping()

    def _notify_stopping(self) -> None:
        if not self._stopping_notified:
            self._stopping_notified = True
            systemd.notify("STOPPING=1", f"STATUS=stopping; {self.status_line()}")

    # --- reload -------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the config file; returns True if the new config is in force.

        A config that fails validation is logged and the old one stays. Models
        added start at once; removed or changed models finish the export in
        progress first (its job keeps the config it started with).
        """
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            if self.config.path is None:
                self.log.warning("reload_ignored", reason="the config did not come from a file")
                return False
            try:
                new = load_config(self.config.path)
                check_builders(new)
            except ConfigError as e:
                self.log.error(
                    "reload_failed",
                    config=e.source,
                    problems=e.problems,
                    hint="the previous config stays in force; fix the file and reload again",
                )
                return False
            self._apply(new)
            # A reload is also how an operator says "my code changed": no
            # export after it runs in a worker that imported the old code.
            for c in self.warm.retire():
                self._exporter_retired(c, "reloaded")
            return True
        finally:
            systemd.notify("READY=1", f"STATUS={self.status_line()}")

    def _apply(self, new: Config) -> None:
        old = self.config
        if new.daemon.metrics_address != old.daemon.metrics_address:
            self.log.warning(
                "reload_needs_restart",
                key="daemon.metrics_address",
                kept=old.daemon.metrics_address,
                hint="the listener is bound at start; restart the service to move it",
            )
            new = Config(
                path=new.path,
                daemon=dataclasses.replace(new.daemon, metrics_address=old.daemon.metrics_address),
                models=new.models,
            )
        if (new.daemon.log_level, new.daemon.log_format) != (
            old.daemon.log_level,
            old.daemon.log_format,
        ):
            logs.configure(self.log_format_override or new.daemon.log_format, new.daemon.log_level)
        self.config = new
        wanted = {m.name: m for m in new.models}
        added, removed, changed = [], [], []
        for name, st in list(self.models.items()):
            if name not in wanted:
                removed.append(name)
                st.retiring, st.next_cfg = True, None
                if st.job is None:
                    self._drop_model(name)
            elif wanted[name] != st.cfg or st.retiring:
                changed.append(name)
                st.retiring = False
                if st.job is None:
                    self._switch_config(st, wanted[name])
                else:
                    st.next_cfg = wanted[name]
        for name, cfg in wanted.items():
            if name not in self.models:
                added.append(name)
                st = ModelState(cfg=cfg, source=SOURCES[cfg.source].scanner(cfg.options))
                self.models[name] = st
                self.metrics.init_model(name)
                self._load_state(st)
        resumed = []
        for name, st in self.models.items():
            # A reload is how the user says "I fixed the builder": its code
            # may have changed even where the config did not.
            if st.paused is not None:
                st.paused = None
                resumed.append(name)
        self._sync_watches()
        self._next_rescan = 0.0  # rescan everything on the next turn
        self.log.info(
            "reloaded",
            resumed=resumed,
            config=str(new.path),
            added=added,
            removed=removed,
            changed=changed,
            deferred=sorted(n for n, s in self.models.items() if s.next_cfg or s.retiring),
        )

    def _switch_config(self, st: ModelState, cfg: ModelConfig) -> None:
        old = st.cfg
        st.cfg, st.next_cfg = cfg, None
        if (cfg.source, cfg.options) != (old.source, old.options):
            st.source = SOURCES[cfg.source].scanner(cfg.options)
        if cfg.base_path != old.base_path:
            st.reported.clear()
            self._load_state(st)
        st.dirty = True

    def _drop_model(self, name: str) -> None:
        self.models.pop(name, None)
        self.metrics.forget_model(name)
        self.log.info("model_removed", model=name)

    def _sync_watches(self) -> None:
        self.watcher.sync(
            {n: s.cfg.checkpoint_dir for n, s in self.models.items() if not s.retiring}
        )
        self.metrics.set_watch_backend(self.watcher.backend)

    # --- scanning and planning ----------------------------------------------

    def _scan_and_plan(self, st: ModelState) -> None:
        st.dirty = False
        st.wait_until = None
        name = st.cfg.name
        try:
            result = st.source.scan(st.cfg.checkpoint_dir)
        except OSError as e:
            self.metrics.scan_errors.labels(name).inc()
            self._report_once(
                st,
                "scan",
                "scan_failed",
                path=str(st.cfg.checkpoint_dir),
                error=str(e),
                hint="make the checkpoint directory readable by the daemon's user",
            )
            return
        st.reported.discard("scan")
        if not result.directory_exists:
            self._report_once(
                st,
                "missing_dir",
                "waiting_for_checkpoint_dir",
                path=str(st.cfg.checkpoint_dir),
                level="info",
            )
        else:
            st.reported.discard("missing_dir")
        for problem in result.problems:
            self._report_once(st, problem, "checkpoint_problem", problem=problem)
        self._report_incomplete(st, result)
        record = rolled_back_problem(st.cfg.base_path)
        if record is not None and record.kind == "corrupt":
            self._report_once(
                st,
                "rolled_back_record",
                "rollback_record_unreadable",
                level="error",
                path=str(rolled_back_path(st.cfg.base_path)),
                error=record.message,
                hint="nothing is exported for this model until the file is readable JSON "
                "again: exporting could re-publish a checkpoint that was rolled back",
            )
            return
        st.reported.discard("rolled_back_record")
        st.last_scan = result
        busy = {st.job.ckpt.fingerprint} if st.job else set()
        decision = plan(
            result.checkpoints,
            st.history_on_disk(),
            export_policy=st.cfg.export_policy,
            min_interval_seconds=st.cfg.min_interval_seconds,
            now=time.time(),
            busy=busy,
        )
        st.last_plan = decision
        running = 1 if st.job else 0
        self.metrics.pending.labels(name).set(decision.pending + running)
        waits = [t for t in (decision.wait_until, result.recheck_at) if t is not None]
        st.wait_until = min(waits, default=None)
        if decision.next is None or st.job is not None or self.stopping or st.retiring:
            return
        if st.paused is not None:
            return  # said once in _fail; the pending count above still shows the backlog
        if self._running_jobs() >= self.config.daemon.concurrency:
            st.dirty = True  # look again when a slot frees up
            return
        if decision.superseded:
            self._report_once(
                st,
                f"superseded:{decision.next.fingerprint}",
                "checkpoints_superseded",
                level="info",
                count=len(decision.superseded),
                newest=decision.next.name,
                policy="latest",
            )
        gate: dict[str, Any] = {}
        if st.cfg.gate.metric:
            passed = self._metric_gate(st, decision.next)
            if passed is None:
                return
            gate["metric"] = passed
        self._start_job(st, decision.next, gate)

    def _metric_gate(self, st: ModelState, ckpt: Checkpoint) -> dict[str, Any] | None:
        """Decide the model's metric gate for ``ckpt`` before anything is exported.

        Returns the decision's record (for the version's metadata) when the
        checkpoint may go on; None when it must wait for its metric (the model
        looks again in :data:`GATE_POLL_SECONDS`) or was gated out (recorded,
        not retried; the model is planned again).
        """
        gate, name = st.cfg.gate, st.cfg.name
        try:
            value = st.metric_reader.read(gate, ckpt.name, ckpt.step)
        except (OSError, ValueError) as e:
            self._report_once(
                st,
                f"gate_unreadable:{ckpt.fingerprint}",
                "gate_metric_unreadable",
                checkpoint=str(ckpt.prefix),
                error=str(e),
                hint="fix the metrics file; the checkpoint waits until wait_seconds",
            )
            value = None
        if value is None:
            waited = time.time() - ckpt.written_ns / 1e9
            if waited < gate.wait_seconds:
                self._report_once(
                    st,
                    f"gate_wait:{ckpt.fingerprint}",
                    "gate_waiting",
                    level="info",
                    checkpoint=str(ckpt.prefix),
                    step=ckpt.step,
                    metric=gate.metric,
                    source=gate.json_file or gate.tensorboard_dir,
                    wait_seconds=gate.wait_seconds,
                )
                poll = time.time() + GATE_POLL_SECONDS
                st.wait_until = min(poll, st.wait_until) if st.wait_until else poll
                return None
            self._gated_out(
                st,
                ckpt,
                "metric_missing",
                f"no {gate.metric!r} for step {ckpt.step} in "
                f"{gate.json_file or gate.tensorboard_dir} within {gate.wait_seconds:g} s "
                "(wait_seconds)",
            )
            return None
        best = threshold(gate, [p.metadata for p in sorted(st.published, key=lambda p: p.version)])
        record = {"metric": gate.metric, "value": value, "mode": gate.mode, "better_than": best}
        if not decide(value, gate.mode, best):
            word = "lower" if gate.mode == "min" else "higher"
            self._gated_out(
                st,
                ckpt,
                "metric",
                f"{gate.metric} = {value:g} is not {word} than {best:g}"
                + (" (the last published version's)" if isinstance(gate.better_than, str) else ""),
                **record,
            )
            return None
        self.metrics.gate_decisions.labels(name, "passed", "metric").inc()
        self.log.info("gate_passed", model=name, checkpoint=str(ckpt.prefix), **record)
        return record

    def _gated_out(
        self, st: ModelState, ckpt: Checkpoint, reason: str, message: str, **fields: Any
    ) -> None:
        """Record ``ckpt`` as gated out: counted, logged, never retried (kept in rejected.json)."""
        self.metrics.gate_decisions.labels(st.cfg.name, "blocked", reason).inc()
        st.rejected[ckpt.fingerprint] = {
            "checkpoint": str(ckpt.prefix),
            "reason": "gated_out",
            "gate": reason,
            "error": message,
            "at": time.time(),
        }
        write_rejected(st.cfg.base_path, st.rejected)
        self.log.info(
            "gated_out",
            model=st.cfg.name,
            checkpoint=str(ckpt.prefix),
            step=ckpt.step,
            gate=reason,
            detail=message,
            **fields,
        )
        st.dirty = True

    def _report_incomplete(self, st: ModelState, result: ScanResult) -> None:
        """Say once per prefix that an incomplete checkpoint is skipped, if it stays so.

        An ``.index`` without its shards, or a prefix the state file names whose
        files are gone, is skipped. ``CheckpointManager`` passes through such
        states for milliseconds while it deletes old checkpoints, so only one
        still incomplete after :data:`INCOMPLETE_REPORT_SECONDS` is reported.
        """
        now = time.monotonic()
        for prefix in list(st.incomplete_since):
            if prefix not in result.incomplete:
                del st.incomplete_since[prefix]
                st.reported.discard(f"incomplete:{prefix}")
        for prefix in result.incomplete:
            since = st.incomplete_since.setdefault(prefix, now)
            if now - since >= INCOMPLETE_REPORT_SECONDS:
                self._report_once(
                    st,
                    f"incomplete:{prefix}",
                    "checkpoint_incomplete",
                    level="info",
                    checkpoint=str(st.cfg.checkpoint_dir / prefix),
                    hint=f"skipped until {prefix}.index and every data shard it names exist; "
                    "named in the state file but deleted, or broken",
                )

    def _running_jobs(self) -> int:
        return sum(1 for s in self.models.values() if s.job is not None)

    # --- the job pipeline ---------------------------------------------------

    def _start_job(self, st: ModelState, ckpt: Checkpoint, gate: dict[str, Any]) -> None:
        job = Job(model=st, ckpt=ckpt, gate=gate)
        log = self.log.bind(**job.log_fields)
        base = st.cfg.base_path
        try:
            job.staging = state_dir(base) / "staging" / f"{os.getpid()}-{job.id}"
            job.pinned, method = pin_checkpoint(ckpt, job.staging)
        except CheckpointVanished as e:
            log.info("checkpoint_vanished", detail=str(e))
            self._cleanup(job)
            st.dirty = True
            return
        except OSError as e:
            self._cleanup(job)
            self._fail(job, "pin_failed", f"cannot pin into {job.staging}: {e}", permanent=False)
            return
        self._phase_done(job, "pin")
        log.info("export_started", pinned_by=method)
        st.job = job
        try:
            job.temp_dir = new_temp_dir(base)
        except OSError as e:
            self._fail(
                job, "temp_dir_failed", f"cannot create a folder in {base}: {e}", permanent=False
            )
            return
        template = self._incremental_template(st, job)
        request = {
            "source": st.cfg.source,
            "options": dict(st.cfg.options),
            "builder": st.cfg.builder,
            "python_path": [str(p) for p in st.cfg.python_path],
            "checkpoint_key": st.cfg.checkpoint_key,
            "checkpoint": str(job.pinned),
            "export_dir": str(job.temp_dir),
            "reference": str(job.staging / "reference.npz"),
            "allow_gpu": self.config.daemon.allow_gpu,
            "signature": [
                {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in st.cfg.signature
            ],
            "input_type": st.cfg.input_type,
            "model": st.cfg.name,
            "sample_inputs": _str_or_none(st.cfg.sample_inputs),
            "warmup_records": st.cfg.warmup_records,
            "template": template,
        }
        job.exporter_key = self._exporter_key(st, request)
        if job.exporter_key is not None:
            request["exporter_key"] = job.exporter_key
        job.export_request = request
        self._spawn(job, "export", protocol.WORKER, request)
        if template is not None:
            self._start_validator_early(job, template)

    def _start_validator_early(self, job: Job, template: str) -> None:
        """Fork a warm validator and hand it its request now, for an incremental export.

        It imports the template version's graph while the worker writes the
        weights (:func:`daemon.children.validator.preload`), then waits for ``go``,
        sent when the export succeeded (:meth:`_release_validator`); any other
        end of the job stops it (:meth:`_cleanup`). Without a zygote to fork
        it from, validation starts after the export as usual.
        """
        warm = self.warm.take(protocol.VALIDATOR, self._warm_settings(protocol.VALIDATOR))
        if warm is None:
            return
        request = dict(self._validate_request(job, template), wait_for_export=True)
        req_path = self._write_request(job, "validate", request)
        try:
            warm.hand(str(req_path), then_go=True)
        except OSError:
            warm_stop(warm)
            return
        job.early = warm
        self.log.info(
            "child_started",
            **job.log_fields,
            phase="validate",
            pid=warm.proc.pid,
            warm=True,
            reused=False,
            early=True,
        )

    def _release_validator(self, job: Job) -> bool:
        """Send the early validator its ``go``; False if there is none (or it died)."""
        early, job.early = job.early, None
        if early is None:
            return False
        try:
            early.go()
        except OSError:
            warm_stop(early)
            return False
        job.proc = early.proc
        self._watch_child(job, "validate", early)
        return True

    def _validate_request(self, job: Job, graph_of: str | None) -> dict[str, Any]:
        cfg = job.model.cfg
        assert job.temp_dir is not None and job.staging is not None
        return {
            "saved_model": str(job.temp_dir),
            "reference": str(job.staging / "reference.npz"),
            "rtol": cfg.rtol,
            "atol": cfg.atol,
            "sample_inputs": _str_or_none(cfg.sample_inputs),
            "golden_outputs": _str_or_none(cfg.golden_outputs),
            "warmup_records": cfg.warmup_records,
            # An incremental export's graph is that version's (see daemon.children.validator).
            "graph_of": graph_of,
            # Weight parity against the pinned copy, where the source allows.
            "checkpoint": str(job.pinned) if SOURCES[cfg.source].weights_in_checkpoint else None,
        }

    def _incremental_template(self, st: ModelState, job: Job) -> str | None:
        """The newest published version this export may reuse the graph of, or None.

        Only versions made with the same :func:`~daemon.children.incremental.export_key`
        (builder, its module's bytes, inputs, source, libraries) qualify; the
        worker still checks that every variable fits (see :mod:`daemon.children.incremental`).
        """
        cfg = st.cfg
        if not cfg.incremental_export or not SOURCES[cfg.source].weights_in_checkpoint:
            return None
        if cfg.source != "tf_checkpoint" or job.ckpt.fingerprint in st.full_export_only:
            return None
        job.export_key = reuse.export_key(
            {
                "tool_version": __version__,
                "libraries": reuse.library_versions(),
                "source": cfg.source,
                "builder": cfg.builder,
                "python_path": [str(p) for p in cfg.python_path],
                "checkpoint_key": cfg.checkpoint_key,
                "signature": [dataclasses.asdict(s) for s in cfg.signature],
                "input_type": cfg.input_type,
            },
            builder_file(cfg.builder, cfg.python_path),
        )
        for p in sorted(st.published, key=lambda p: p.version, reverse=True):
            if p.metadata.get("export_key") == job.export_key:
                return str(p.path)
        return None

    def _exporter_key(self, st: ModelState, request: dict[str, Any]) -> str | None:
        """The key under which an export worker may be kept for this model's next export.

        None where workers are single-use: cold children, ``exporter_max_exports
        = 1``, or a source whose exporter does not keep its model. The key digests
        every field of the request that is not about this one checkpoint, so a
        reload that changes any of them gets a new worker.
        """
        d = self.config.daemon
        if not (d.warm_workers and d.exporter_max_exports > 1):
            return None
        if not SOURCES[st.cfg.source].reusable_exporter:
            return None
        per_job = ("checkpoint", "export_dir", "reference", "template")
        stable = {k: v for k, v in request.items() if k not in per_job}
        return reuse.export_key(stable, None)

    def _child_limits(self) -> dict[str, Any]:
        """CPU, I/O and thread limits for the worker and validator children."""
        d = self.config.daemon
        return {
            "nice": d.worker_nice,
            "io_class": d.worker_io_class,
            "threads": d.worker_threads_effective,
        }

    def _warm_settings(self, module: str) -> str:
        d = self.config.daemon
        return WarmPool.settings(module, self._child_limits(), d.allow_gpu, d.exporter_max_exports)

    def _refill_warm(self) -> None:
        """Keep a zygote ready to fork workers and validators (``warm_workers``).

        Only while an export slot is free: a zygote importing TensorFlow next
        to a running export would take CPU from it (and from the trainer) to
        save time for an export that cannot start yet anyway.
        """
        self.warm.enabled = self.config.daemon.warm_workers
        if not self.warm.enabled:
            self.warm.close()
        elif self._running_jobs() < self.config.daemon.concurrency:
            self.warm.refill({m: self._warm_settings(m) for m in WARM_MODULES})
        for gone in self.warm.take_exits():
            self.log.warning(
                "zygote_exited",
                pid=gone["pid"],
                code=gone["code"],
                retry_in_seconds=gone["retry_in"],
                hint="exports start cold meanwhile; if it keeps exiting, check that the "
                "daemon's user can run: python -c 'import tensorflow'",
            )
        for c in self.warm.expire(self.config.daemon.exporter_idle_seconds):
            self._exporter_retired(c, "idle")
        self.metrics.warm_children_bytes.set(self.warm.rss_bytes())

    def _exporter_retired(self, c: WarmChild, reason: str) -> None:
        self.log.info("exporter_retired", pid=c.proc.pid, exports=c.exports, reason=reason)

    def _write_request(self, job: Job, phase: str, request: dict[str, Any]) -> Path:
        """Write the request file of ``phase``, with the fields every child gets; its path."""
        assert job.staging is not None
        request = dict(
            request,
            parent_pid=os.getpid(),
            result=str(job.staging / f"{phase}.result.json"),
            limits=self._child_limits(),
            # Where a warm child sends its output.
            log=str(job.staging / f"{phase}.log"),
        )
        req_path = job.staging / f"{phase}.request.json"
        write_json_atomic(req_path, request)
        return req_path

    def _spawn(self, job: Job, phase: str, module: str, request: dict[str, Any]) -> None:
        assert job.staging is not None
        req_path = self._write_request(job, phase, request)
        log_path = job.staging / f"{phase}.log"
        settings = self._warm_settings(module)
        warm = None
        if request.get("exporter_key"):
            warm, retired = self.warm.take_kept(request["exporter_key"], settings)
            if retired is not None:
                self._exporter_retired(*retired)
        reused = warm is not None
        warm = warm or self.warm.take(module, settings)
        proc = None
        if warm is not None:
            try:
                proc = warm.hand(str(req_path))
            except OSError:
                # It died between the pool's check and now (EPIPE): start cold.
                warm_stop(warm)
                warm = None
                reused = False
        if proc is None:
            proc = self._spawn_cold(module, req_path, log_path)
        job.proc = proc
        # The PID, so that "what is process 12345 doing?" has an answer in the log.
        self.log.info(
            "child_started",
            **job.log_fields,
            phase=phase,
            pid=proc.pid,
            warm=warm is not None,
            reused=reused,
        )
        self._watch_child(job, phase, warm)

    def _spawn_cold(self, module: str, req_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("wb") as out:
            # A session of its own: Ctrl-C in a terminal reaches only the
            # supervisor, which then stops the child deliberately.
            return subprocess.Popen(
                protocol.child_command(module, req_path),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _watch_child(self, job: Job, phase: str, warm: WarmChild | None) -> None:
        job.phase = phase
        job.child = warm
        job.phase_started = time.monotonic()
        job.deadline = job.phase_started + self.config.daemon.export_timeout_seconds
        proc, done, job_id = job.proc, threading.Event(), job.id
        job.child_done = done
        assert proc is not None

        def wait_and_tell() -> None:
            # A thread per child only waits and enqueues; the main loop reacts.
            # A reusable exporter does not exit: it says "done" on its pipe.
            if warm is not None:
                warm.wait_done()
            else:
                proc.wait()
            done.set()
            self.queue.put(("child", job_id))

        threading.Thread(target=wait_and_tell, name=f"wait-{phase}-{job.id}", daemon=True).start()

    def _advance(self, job: Job) -> None:
        """Move ``job`` forward if its current phase has finished."""
        if job.phase == "publish":
            self._publish(job)
            return
        assert job.proc is not None
        if not job.child_done.is_set():
            if time.monotonic() > job.deadline:
                _kill_group(job.proc)
                timeout = self.config.daemon.export_timeout_seconds
                self._fail(
                    job,
                    "timeout",
                    f"{job.phase} did not finish within {timeout:g} s (export_timeout_seconds)",
                    permanent=False,
                )
            return
        assert job.staging is not None
        if job.phase == "gate":
            self._command_gate_done(job)
            return
        result = protocol.read_result(job.staging / f"{job.phase}.result.json")
        if result is None and job.proc.returncode == exitcodes.NO_SPACE:
            self._fail(
                job,
                "no_space",
                f"the {job.phase} process could not write its result into {job.staging}: "
                f"no space left on the device of {job.model.cfg.base_path}; free some space, "
                "the export is retried",
                permanent=False,
                output=_tail(job.staging / f"{job.phase}.log"),
            )
            return
        if result is None:
            code = job.proc.poll()
            how = (
                "said it was done without a result"
                if code is None
                else f"was killed by {signal.Signals(-code).name}"
                if code < 0
                else f"exited with status {code} without a result"
            )
            if code is None:
                _kill_group(job.proc)
            self._fail(
                job,
                "child_crashed",
                f"the {job.phase} process {how}; its output is in the log above",
                permanent=False,
                output=_tail(job.staging / f"{job.phase}.log"),
            )
            return
        if job.phase == "validate":
            self._write_report(job, result)
            if not result.get("ok") and job.export_result.get("incremental", {}).get("template"):
                self._retry_in_full(job, result)
                return
        if not result.get("ok"):
            self._fail(
                job,
                str(result.get("reason", "unknown")),
                str(result.get("error")),
                permanent=bool(result.get("permanent")),
                output=_tail(job.staging / f"{job.phase}.log"),
            )
            return
        self._phase_done(job, job.phase)
        if job.phase == "export":
            job.export_result = result
            self._keep_exporter(job, result)
            self.log.info(
                "exported",
                **job.log_fields,
                seconds=round(job.durations["export"], 3),
                variables=result.get("variables"),
                warm=bool(result.get("warm")),
                # Exports this worker did before this one (0: a fresh process).
                reused=result.get("reused", 0),
                # Which version's graph was reused, or why not (daemon.children.incremental).
                incremental_from=(result.get("incremental") or {}).get("template"),
                incremental_fallback=(result.get("incremental") or {}).get("fallback"),
                # Linked or copied from the checkpoint without TensorFlow, or
                # why not (then restored by TensorFlow).
                weights=(result.get("incremental") or {}).get("weights"),
                link_fallback=(result.get("incremental") or {}).get("link_fallback"),
            )
            assert job.temp_dir is not None
            if not self._release_validator(job):
                graph_of = (result.get("incremental") or {}).get("template")
                self._spawn(
                    job,
                    "validate",
                    protocol.VALIDATOR,
                    self._validate_request(job, graph_of),
                )
        elif job.phase == "validate":
            job.validation = result
            self.metrics.validations.labels(job.model.cfg.name, "passed").inc()
            self.log.info(
                "validated",
                **job.log_fields,
                seconds=round(job.durations["validate"], 3),
                signatures=_signature_summary(result),
                # How many exported variables were proven to come from the checkpoint.
                weights_matched=(result.get("weights") or {}).get("variables"),
                warmup_records=(result.get("warmup") or {}).get("records"),
                warm=bool(result.get("warm")),
            )
            if job.model.cfg.gate.command:
                self._start_command_gate(job)
                return
            self._to_publish(job)

    def _keep_exporter(self, job: Job, result: dict[str, Any]) -> None:
        """Give a reusable export worker that finished its export back to the pool."""
        c, job.child = job.child, None
        if c is None or c.proc.poll() is not None or c.done is None:
            return  # single-use, or it exited (its last export)
        if job.exporter_key is None:
            warm_stop(c)
            return
        evicted = self.warm.keep(
            c, job.exporter_key, result.get("code_files") or {}, self.config.daemon.concurrency
        )
        for e in evicted:
            self._exporter_retired(e, "evicted")

    def _retry_in_full(self, job: Job, result: dict[str, Any]) -> None:
        """An incremental export failed validation: export the checkpoint again in full.

        The template's graph may be what is wrong (code the builder imports
        changed, for example), so the checkpoint is not blamed until a full
        export of it fails too.
        """
        st = job.model
        self.metrics.validations.labels(st.cfg.name, "failed").inc()
        self.log.warning(
            "incremental_export_failed",
            **job.log_fields,
            reason=result.get("reason"),
            error=str(result.get("error"))[:500],
            hint="exporting this checkpoint again in full",
        )
        st.full_export_only.add(job.ckpt.fingerprint)
        if job.exporter_key is not None:
            # The full export is the ground truth: a fresh process, with the
            # code as it is on disk now, not the worker that made this one.
            for c in self.warm.retire(job.exporter_key):
                self._exporter_retired(c, "incremental_export_failed")
        assert job.temp_dir is not None
        shutil.rmtree(job.temp_dir, ignore_errors=True)
        job.temp_dir.mkdir()
        job.export_result = {}
        job.phase_started = time.monotonic()
        self._spawn(job, "export", protocol.WORKER, dict(job.export_request, template=None))

    def _to_publish(self, job: Job) -> None:
        job.phase = "publish"
        job.phase_started = time.monotonic()
        job.proc = None
        self._publish(job)

    def _write_report(self, job: Job, result: dict[str, Any]) -> None:
        """Put the validation report into the export folder (published or kept with it).

        Best effort: a report that cannot be written (full disk) must not
        decide the export's fate; the publish step's own writes will.
        """
        if job.temp_dir is None:
            return
        report = {
            "model": job.model.cfg.name,
            "checkpoint": str(job.ckpt.prefix),
            "fingerprint": job.ckpt.fingerprint,
            "step": job.step,
            "verdict": "passed" if result.get("ok") else "failed",
            "validated_at": time.time(),
            **{k: v for k, v in result.items() if k not in ("warm", "saved_model")},
        }
        try:
            write_json_atomic(job.temp_dir / REPORT_RELPATH, report)
        except OSError as e:
            self.log.warning("report_not_written", **job.log_fields, error=str(e))

    def _start_command_gate(self, job: Job) -> None:
        """Run the model's gate command on the validated export (phase ``gate``)."""
        assert job.staging is not None and job.temp_dir is not None
        cfg = job.model.cfg
        argv = command_argv(cfg.gate, job.temp_dir, job.ckpt.prefix, cfg.name, job.step)
        log_path = job.staging / "gate.log"
        try:
            with log_path.open("wb") as out:
                job.proc = subprocess.Popen(
                    argv,
                    cwd=job.temp_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # killed as a group on timeout or shutdown
                )
        except OSError as e:
            self._fail(
                job,
                "gate_unusable",
                f"cannot run the gate command {argv[0]!r}: {e.strerror or e}",
                permanent=True,
            )
            return
        self.log.info("child_started", **job.log_fields, phase="gate", pid=job.proc.pid, warm=False)
        self._watch_child(job, "gate", None)

    def _command_gate_done(self, job: Job) -> None:
        """Publish when the gate command exited 0; gate the checkpoint out otherwise."""
        assert job.proc is not None and job.staging is not None
        code = job.proc.wait()  # it has exited: that is why we are here
        output = _tail(job.staging / "gate.log")
        if code < 0:
            self._fail(
                job,
                "child_crashed",
                f"the gate command was killed by {signal.Signals(-code).name}",
                permanent=False,
                output=output,
            )
            return
        self._phase_done(job, "gate")
        name = job.model.cfg.name
        if code != 0:
            self._gated_out(
                job.model,
                job.ckpt,
                "command",
                f"the gate command exited with status {code}",
                output_tail=output,
            )
            self._finish(job)
            return
        self.metrics.gate_decisions.labels(name, "passed", "command").inc()
        job.gate["command"] = {"argv": list(job.model.cfg.gate.command), "exit_status": 0}
        self.log.info("gate_passed", **job.log_fields, gate="command")
        self._to_publish(job)

    def _publish(self, job: Job) -> None:
        st, cfg = job.model, job.model.cfg
        lock = BasePathLock(cfg.base_path)
        if not lock.try_acquire():
            if not job.lock_wait_logged:
                self.log.warning(
                    "waiting_for_lock",
                    **job.log_fields,
                    lock=str(lock.path),
                    held_by_pid=lock.holder(),
                )
                job.lock_wait_logged = True
            return  # try again on the next tick
        assert job.temp_dir is not None
        with lock:
            # Another publisher (a second daemon, `ckpt-exporter export`) may
            # have published this checkpoint while we exported it: re-read the
            # base path under the lock so it is never published twice.
            self._refresh_published(st)
            twin = [p for p in st.published if p.fingerprint == job.ckpt.fingerprint]
            if twin:
                self.log.info(
                    "already_published",
                    **job.log_fields,
                    version=twin[0].version,
                    hint="another publisher on this base path got there first",
                )
                self._finish(job)
                return
            problem = rolled_back_problem(cfg.base_path)
            if problem is not None:
                # Never publish blind: the record may list this very checkpoint.
                self._fail(job, "publish_failed", problem.message, permanent=False)
                return
            rolled_back, floor_ns = read_rolled_back(cfg.base_path)
            if job.ckpt.fingerprint in rolled_back or job.ckpt.written_ns <= floor_ns:
                self.log.info(
                    "rolled_back_meanwhile",
                    **job.log_fields,
                    hint="`ckpt-exporter rollback` ruled this checkpoint out during its export",
                )
                self._finish(job)
                return
            # Never reuse a number that was rolled back: a server that served
            # it, or saw it fail, must not take another model for it.
            floor = highest_rolled_back_version(cfg.base_path)
            choose: Callable[[list[int]], int]
            if cfg.version_policy == "step":
                step = job.step

                def choose(existing: list[int]) -> int:
                    return step_version(step, [*existing, floor])
            else:

                def choose(existing: list[int]) -> int:
                    return next_version([*existing, floor])

            try:
                version, path = publish(job.temp_dir, cfg.base_path, choose, self._metadata(job))
            except VersionError as e:
                self._fail(job, "version_refused", str(e), permanent=True)
                return
            except OSError as e:
                self._fail(job, "publish_failed", f"{type(e).__name__}: {e}", permanent=False)
                return
            job.temp_dir = None  # it is the version now
            # Retention under the same lock, from a fresh listing, so that a
            # pin or a rollback by `ckpt-exporter` cannot race a deletion.
            self._refresh_published(st)
            self._retention(st)
        self._phase_done(job, "publish")
        st.last_publish_time = time.time()
        st.failing_since = None
        self.metrics.latest_version_bytes.labels(cfg.name).set(tree_bytes(path))
        st.attempts.pop(job.ckpt.fingerprint, None)
        st.retry_at.pop(job.ckpt.fingerprint, None)
        latency = max(0.0, time.time() - job.ckpt.written_ns / 1e9)
        self.metrics.exports.labels(cfg.name, "published").inc()
        self.metrics.latency.labels(cfg.name).observe(latency)
        self.metrics.last_publish.labels(cfg.name).set(st.last_publish_time)
        self.log.info(
            "published",
            **job.log_fields,
            version=version,
            path=str(path),
            durations={k: round(v, 3) for k, v in job.durations.items()},
            checkpoint_to_published_seconds=round(latency, 3),
        )
        st.full_export_only.discard(job.ckpt.fingerprint)
        self._finish(job)
        if self.on_published is not None:
            self.on_published(cfg.name, version, path, job.validation)

    def _metadata(self, job: Job) -> dict[str, Any]:
        files = [{"name": p.name, "bytes": p.stat().st_size} for p in job.ckpt.files if p.exists()]
        return {
            "tool": "ckpt-exporter",
            "tool_version": __version__,
            "model": job.model.cfg.name,
            "checkpoint": {
                "prefix": str(job.ckpt.prefix),
                "step": job.step,
                "fingerprint": job.ckpt.fingerprint,
                "written_ns": job.ckpt.written_ns,
                "files": files,
                "saved_counters": job.export_result.get("saved_counters", {}),
            },
            "export": {k: v for k, v in job.export_result.items() if k not in ("ok", "code_files")},
            # Which later exports may reuse this version's graph (daemon.children.incremental).
            "export_key": job.export_key,
            "validation": {
                "report": str(REPORT_RELPATH),
                "checks": [c.get("check") for c in job.validation.get("checks", [])],
                "signatures": job.validation.get("signatures", {}),
                "weights": job.validation.get("weights"),
                "warmup": job.validation.get("warmup"),
                "durations": job.validation.get("durations", {}),
            },
            # The metric decision is what "better_than = last_published" compares with next.
            "gate": job.gate.get("metric"),
            "gate_command": job.gate.get("command"),
            "durations_seconds": {k: round(v, 3) for k, v in job.durations.items()},
            "exported_at": time.time(),
        }

    def _retention(self, st: ModelState) -> None:
        doomed = plan_retention(
            [p.version for p in st.published],
            st.cfg.keep_versions,
            protected=read_pins(st.cfg.base_path),
        )
        if not doomed:
            return
        by_version = {p.version: p for p in st.published}
        for v in doomed:
            try:
                remove_version(by_version[v].path)
                self.log.info(
                    "version_removed",
                    model=st.cfg.name,
                    version=v,
                    keep_versions=st.cfg.keep_versions,
                )
            except OSError as e:
                self.log.warning(
                    "version_remove_failed", model=st.cfg.name, version=v, error=str(e)
                )
        self._refresh_published(st)

    def _phase_done(self, job: Job, phase: str) -> None:
        seconds = time.monotonic() - job.phase_started
        job.durations[phase] = seconds
        self.metrics.phase_seconds.labels(job.model.cfg.name, phase).observe(seconds)
        job.phase_started = time.monotonic()

    def _fail(
        self, job: Job, reason: str, message: str, *, permanent: bool, output: str | None = None
    ) -> None:
        st, cfg = job.model, job.model.cfg
        fp = job.ckpt.fingerprint
        # A paused model's checkpoint is not rejected: it is exported after the fix.
        outcome = "rejected" if permanent and reason not in MODEL_FAILURES else "failed"
        self.metrics.exports.labels(cfg.name, outcome).inc()
        self.metrics.failures.labels(cfg.name, job.phase, reason).inc()
        if job.phase == "validate":
            self.metrics.validations.labels(cfg.name, "failed").inc()
        if reason in ("child_crashed", "timeout") and job.phase in ("export", "validate"):
            self.metrics.worker_restarts.labels(cfg.name, job.phase).inc()
        if st.failing_since is None:
            st.failing_since = time.time()
        kept = None
        if job.temp_dir is not None and job.temp_dir.exists():
            try:
                kept = move_aside(
                    job.temp_dir,
                    cfg.base_path,
                    f"{job.ckpt.name}-{reason}",
                    # A half-written export on a full disk is nothing to inspect,
                    # and keeping it would eat the space the retry needs.
                    0 if reason == "no_space" else self.config.daemon.keep_failed,
                )
            except OSError:
                shutil.rmtree(job.temp_dir, ignore_errors=True)
            job.temp_dir = None
        fields: dict[str, Any] = dict(
            job.log_fields, phase=job.phase, reason=reason, error=message, permanent=permanent
        )
        if kept is not None:
            fields["kept_at"] = str(kept)
        if output:
            fields["output_tail"] = output
        if permanent and reason in MODEL_FAILURES:
            st.paused = {"reason": reason, "error": message[:2000], "at": time.time()}
            self.log.error(
                "model_paused",
                **fields,
                hint="the model's builder or config is at fault, not the checkpoint: nothing "
                "is exported for this model until you fix it and reload "
                "(systemctl reload, or SIGHUP); its checkpoints stay pending",
            )
        elif permanent:
            st.rejected[fp] = {
                "checkpoint": str(job.ckpt.prefix),
                "reason": reason,
                "error": message[:2000],
                "at": time.time(),
            }
            write_rejected(cfg.base_path, st.rejected)
            self.log.error(
                "export_rejected",
                **fields,
                hint="this checkpoint will not be retried; fix the model or "
                "config, later checkpoints are still exported",
            )
        else:
            n = st.attempts.get(fp, 0) + 1
            st.attempts[fp] = n
            delay = min(
                self.config.daemon.retry_backoff_seconds * 2 ** (n - 1), MAX_BACKOFF_SECONDS
            )
            st.retry_at[fp] = time.time() + delay
            self.log.error("export_failed", **fields, attempt=n, retry_in_seconds=delay)
        self._finish(job)

    def _finish(self, job: Job) -> None:
        self._cleanup(job)
        job.done = True
        st = job.model
        if st.job is job:
            st.job = None
        st.dirty = True
        # A reload that came in during this job takes effect now.
        if st.retiring and self.models.get(st.cfg.name) is st:
            self._drop_model(st.cfg.name)
            self._sync_watches()
        elif st.next_cfg is not None:
            self._switch_config(st, st.next_cfg)

    def _cleanup(self, job: Job) -> None:
        if job.early is not None:
            # The export did not succeed: the validator waiting for it goes.
            warm_stop(job.early)
            job.early = None
        if job.temp_dir is not None:
            shutil.rmtree(job.temp_dir, ignore_errors=True)
            job.temp_dir = None
        if job.staging is not None:
            shutil.rmtree(job.staging, ignore_errors=True)

    def _report_once(
        self, st: ModelState, key: str, event: str, level: str = "warning", **fields: Any
    ) -> None:
        if key in st.reported:
            return
        st.reported.add(key)
        getattr(self.log, level)(event, model=st.cfg.name, **fields)

    # --- status and shutdown ------------------------------------------------

    def status_line(self) -> str:
        parts = []
        for name, st in sorted(self.models.items()):
            newest = max((p.version for p in st.published), default=None)
            pending = st.last_plan.pending if st.last_plan else 0
            state = (
                f"exporting step {st.job.ckpt.step}"
                if st.job
                else f"paused ({st.paused['reason']})"
                if st.paused
                else "idle"
            )
            parts.append(
                f"{name}: v{newest if newest is not None else '-'}, {pending} pending, {state}"
            )
        return "; ".join(parts)

    def _update_status(self) -> None:
        line = self.status_line()
        if line != self._last_status:
            self._last_status = line
            systemd.notify(f"STATUS={line}")

    def shutdown(self) -> None:
        """Stop children, remove unfinished exports, stop watching and serving."""
        self._notify_stopping()
        for st in self.models.values():
            job = st.job
            if job is None:
                continue
            if job.proc is not None and job.proc.poll() is None:
                _kill_group(job.proc, grace=CHILD_KILL_GRACE_SECONDS)
            self.log.info(
                "export_abandoned",
                **job.log_fields,
                phase=job.phase,
                hint="it will be exported again at the next start",
            )
            self._cleanup(job)
            st.job = None
        self.warm.close()
        self.watcher.stop()
        if self.http is not None:
            self.http.stop()
        self.log.info("stopped")


def _watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings: half of systemd's ``WATCHDOG_USEC``, or 0 (off).

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for;
    a child that inherited the variables must not ping.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 2 / 1e6


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _kill_group(proc: Proc, grace: float = 0.0) -> None:
    """SIGTERM the child's process group, then SIGKILL after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        if grace > 0:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    # TensorFlow's start-up chatter is not what anyone needs at 3 a.m.
    keep = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("I0000", "W0000"))]
    return "\n".join(keep[-lines:])


def _signature_summary(result: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, sig in result.get("signatures", {}).items():
        diff = sig.get("max_abs_diff")
        out[name] = "ok" + (f" (max diff {diff:.2g})" if diff is not None else "")
    return out
