"""The supervisor: the main loop, signals, and the units that carry checkpoints.

Shape (after gunicorn's arbiter): signal handlers and watcher threads only put
an event on a queue; the main loop alone reads the disk, starts children,
publishes and updates metrics, by dispatching each event to its handler and
then moving every model on. The loop only dispatches; the work is done by
units that return what happened:

- :class:`~daemon.supervisor.scheduling.Scheduler`: which checkpoint starts next;
- :class:`~daemon.supervisor.pipeline.Pipeline`: a job's phases (stage,
  export, validate, gate, publish) with its children started by
  :class:`~daemon.supervisor.launcher.Launcher`, its publication by
  :class:`~daemon.supervisor.publishing.Publisher` and its end by
  :class:`~daemon.supervisor.outcomes.Outcomes`;
- :class:`~daemon.supervisor.models.Models`: the model table and reloads.

The supervisor never imports TensorFlow, NumPy or :mod:`daemon.children`
(a test checks), so it starts fast and a crash in TensorFlow code cannot take
it down.

Signals: SIGHUP re-reads the config (a bad one is logged and the old one
kept); the first SIGTERM or SIGINT stops taking work and gives a running
export ``shutdown_grace_seconds`` to finish; a second one stops at once.
Under systemd the loop sends ``WATCHDOG=1`` only after checking that its
threads are alive, so a hung loop or a dead watcher gets the service restarted.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import __version__, exitcodes
from daemon.basepath.records import read_rejected
from daemon.config.builders import check_builders
from daemon.config.loading import Config, ConfigError, load_config
from daemon.objectstore.url import Location
from daemon.protocol import ValidationResult
from daemon.rules.health import HealthSnapshot, evaluate
from daemon.sources import Checkpoint
from daemon.supervisor import systemd
from daemon.supervisor.context import Context, Event
from daemon.supervisor.labels import Labels
from daemon.supervisor.launcher import Launcher, kill_group
from daemon.supervisor.metrics import HTTPServer, Metrics
from daemon.supervisor.models import Models
from daemon.supervisor.outcomes import Outcomes
from daemon.supervisor.pipeline import Pipeline
from daemon.supervisor.publishing import Publisher
from daemon.supervisor.reporting import status_line
from daemon.supervisor.scheduling import Scheduler
from daemon.supervisor.state import Job, ModelState
from daemon.supervisor.watch import Watcher

#: How long a child gets after SIGTERM before SIGKILL on shutdown.
CHILD_KILL_GRACE_SECONDS = 5.0

#: Called with (model, version, path, validation result) after each publication.
OnPublished = Callable[[str, int, Location, ValidationResult], None]


class Supervisor:
    """Runs the daemon for one :class:`Config`. Call :meth:`run` from the main thread."""

    def __init__(
        self,
        config: Config,
        log: Any,
        *,
        metrics: Metrics | None = None,
        force_polling: bool = False,
        on_published: OnPublished | None = None,
        log_format_override: str | None = None,
    ) -> None:
        self.ctx = ctx = Context(config=config, log=log, metrics=metrics or Metrics())
        self.log, self.metrics = log, ctx.metrics
        self.publisher = Publisher(ctx)
        self.table = Models(ctx, self.publisher, log_format_override)
        self.models = ctx.models
        self.launcher = Launcher(ctx)
        self.outcomes = Outcomes(ctx, self.launcher)
        self.scheduler = Scheduler(ctx)
        self.pipeline = Pipeline(ctx, self.launcher, self.outcomes, self.publisher, self.scheduler)
        self.labels = Labels(ctx)
        self.watcher = Watcher(self._hint, log, force_polling=force_polling)
        self.stop_deadline: float | None = None
        self.http: HTTPServer | None = None
        self.on_published = on_published
        self._handlers: dict[str, Callable[[Any], None]] = {
            "signal": self._on_signal_event,
            "hint": self._on_hint,
            "child": lambda _job_id: None,  # the job is advanced right after the queue drains
        }
        self._next_rescan = 0.0
        self._next_poll = 0.0  # of checkpoint folders on object stores (no events there)
        self._last_status = ""
        self._stopping_notified = False
        self._health = HealthSnapshot(loop_monotonic=time.monotonic())
        self.watchdog = systemd.Watchdog()

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def stopping(self) -> bool:
        return self.ctx.stopping

    @property
    def metrics_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    # --- messages from other threads and signal handlers --------------------

    def _hint(self, model: str) -> None:
        self.ctx.events.put(("hint", model))

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # SimpleQueue.put is reentrant, so it is safe inside a signal handler.
        self.ctx.events.put(("signal", signum))

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # --- start-up -----------------------------------------------------------

    def start(self) -> None:
        """Rebuild state from disk, clean up after a crash, start watching and serving."""
        for st in self.models.values():
            self.metrics.init_model(st.cfg.name)
            self.table.load(st)
        hp = self.config.daemon.metrics_host_port
        if hp is not None:
            self.http = self.metrics.serve(*hp, health=self.health)
            self.log.info("metrics_listening", address=f"{hp[0]}:{self.http.port}")
        self.watcher.start()
        self._sync_watches()
        self.log.info(
            "started",
            version=__version__,
            models=sorted(self.models),
            watch_backend=self.watcher.backend,
            pid=os.getpid(),
            config=str(self.config.path) if self.config.path else None,
        )
        systemd.notify("READY=1", f"STATUS={self.status_line()}")

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
                    not self.ctx.running_jobs()
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
        self.table.load(st)
        ckpt, problem = self._pick_checkpoint(st, prefix)
        if ckpt is None:
            return exitcodes.PERMANENT_FAILURE, problem
        done = [p for p in st.published if p.fingerprint == ckpt.fingerprint]
        if done:
            return exitcodes.OK, f"{ckpt.name} is already published as version {done[0].version}"
        try:
            # A zygote now (warm_workers): it imports TensorFlow while the
            # export starts, and the validator is then forked from it instead
            # of importing TensorFlow a second time after the export.
            self.launcher.refill()
            # The operator named this checkpoint: the metric gate does not
            # apply (the command gate, part of the pipeline, still does).
            self.pipeline.start(st, ckpt, {})
            job = st.job
            while job is not None and not job.done and not self.stopping:
                with contextlib.suppress(queue.Empty):
                    self._dispatch(self.ctx.events.get(timeout=1.0))
                self._advance(job)
        finally:
            if st.job is not None:
                self.shutdown()
            self.launcher.close()
        if job is not None and job.published_version is not None:
            return exitcodes.OK, f"{ckpt.name} published as version {job.published_version}"
        return exitcodes.PERMANENT_FAILURE, f"{ckpt.name} was not published (see the log)"

    def _pick_checkpoint(
        self, st: ModelState, prefix: Path | None
    ) -> tuple[Checkpoint | None, str]:
        """The complete checkpoint ``prefix`` (default: the newest), or None and why not."""
        directory = st.cfg.checkpoint_dir
        scan = st.source.scan(directory)
        if not scan.directory_exists:
            return None, f"{directory} does not exist"
        if prefix is None:
            if not scan.checkpoints:
                return None, f"no complete checkpoint in {directory}"
            return scan.checkpoints[-1], ""
        found = [c for c in scan.checkpoints if c.prefix == prefix.resolve()]
        if not found:
            complete = ", ".join(c.name for c in scan.checkpoints) or "none"
            return None, (
                f"{prefix} is not a complete checkpoint in {directory} (complete: {complete})"
            )
        return found[0], ""

    def _tick(self) -> None:
        """One turn: take the events, move the jobs on, rescan when due, start what is due."""
        now = time.monotonic()
        self._health = HealthSnapshot(
            loop_monotonic=now,
            failing_since={n: s.failing_since for n, s in self.models.items()},
        )
        self._watchdog(now)
        self._drain_events(timeout=max(0.0, min(self._next_wake(now) - now, 1.0)))
        if self.stopping:
            # Stop taking work, but let running jobs move on to the end.
            self._advance_jobs()
            self._update_status()
            return
        if time.monotonic() >= self._next_rescan:
            self._rescan()
        if time.monotonic() >= self._next_poll:
            self._poll_remote()
        self._advance_jobs()
        self.labels.tick(self.models)
        # After the jobs moved on (one may have just finished) and before new
        # ones start, so that the next job finds its children started.
        self.launcher.refill()
        for st in list(self.models.values()):
            if st.retiring:
                continue
            if st.wait_until is not None and time.time() >= st.wait_until:
                st.dirty = True
            if st.dirty:
                self._scan_and_plan(st)
        self._update_status()

    def _drain_events(self, timeout: float) -> None:
        """Wait up to ``timeout`` for an event, then handle all that arrived (one scan a burst)."""
        try:
            event: Event | None = self.ctx.events.get(timeout=timeout)
        except queue.Empty:
            event = None
        while event is not None:
            self._dispatch(event)
            try:
                event = self.ctx.events.get_nowait()
            except queue.Empty:
                event = None

    def _dispatch(self, event: Event) -> None:
        kind, value = event
        self._handlers[kind](value)

    def _rescan(self) -> None:
        """Mark every model for a scan; re-read the base path of idle ones (it is the truth)."""
        self._next_rescan = time.monotonic() + self.config.daemon.rescan_interval_seconds
        for st in self.models.values():
            st.dirty = True
            if st.job is None:
                # Someone may have rolled back, deleted or pinned versions since we last looked.
                self.publisher.refresh(st)
                st.rejected.update(read_rejected(st.cfg.base_path))
                self.labels.take_requests(st)
        self._sync_watches()

    def _poll_remote(self) -> None:
        """Mark models whose checkpoints are on an object store for a scan (no events there)."""
        self._next_poll = time.monotonic() + self.config.daemon.object_store_poll_seconds
        for st in self.models.values():
            if not isinstance(st.cfg.checkpoint_dir, Path):
                st.dirty = True

    def _advance_jobs(self) -> None:
        for st in list(self.models.values()):
            if st.job is not None:
                self._advance(st.job)

    def _advance(self, job: Job) -> None:
        """Move ``job`` on; once it has ended, settle what waited for it."""
        self.pipeline.advance(job)
        if not job.done:
            return
        st = job.model
        if job.published_version is not None:
            self.labels.published(st, job.published_version)
        if job.published_version is not None and self.on_published is not None:
            assert job.validation is not None
            self.on_published(
                st.cfg.name, job.published_version, _version_path(job), job.validation
            )
        # A reload that came in during this job takes effect now.
        if self.table.settle(st):
            self._sync_watches()

    def _scan_and_plan(self, st: ModelState) -> None:
        """Ask the scheduler about ``st`` and start what it says."""
        start = self.scheduler.next_start(st)
        if start is not None:
            self.pipeline.start(st, start.ckpt, start.gate)

    def _next_wake(self, now: float) -> float:
        wake = self._next_rescan
        if any(not isinstance(s.cfg.checkpoint_dir, Path) for s in self.models.values()):
            wake = min(wake, self._next_poll)
        for st in self.models.values():
            if st.job is not None:
                # Poll running jobs (deadline, lock retry) at least every second.
                wake = min(wake, now + 1.0, st.job.deadline or wake)
            if st.wait_until is not None:
                wake = min(wake, now + max(0.0, st.wait_until - time.time()))
        if self.watchdog.interval:
            wake = min(wake, self.watchdog.next_ping)
        if self.stop_deadline is not None:
            wake = min(wake, self.stop_deadline)
        return wake

    def _watchdog(self, now: float) -> None:
        if not self.watchdog.due(now):
            return
        dead = [] if self.watcher.alive() else ["watcher"]
        if self.http is not None and not self.http.alive():
            dead.append("metrics_http")
        self.watchdog.ping(now, dead, self.log)

    # --- event handlers -----------------------------------------------------

    def _on_signal_event(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload()
        else:
            self._request_stop(signal.Signals(signum).name)

    def _on_hint(self, model: str) -> None:
        st = self.models.get(model)
        if st is None:
            return
        st.dirty = True
        if self.watcher.is_standin(model):
            # Something changed next to a missing checkpoint dir (it may have
            # appeared): watch it now, not at the next rescan.
            self._sync_watches()

    def _request_stop(self, signame: str) -> None:
        now = time.monotonic()
        running = [st.job.log_fields for st in self.models.values() if st.job is not None]
        if self.stopping:
            self.log.warning("stop_forced", signal=signame, abandoning=running)
            self.stop_deadline = now
            return
        self.ctx.stopping = True
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
            changes = self.table.apply(new)
            self._sync_watches()
            self._next_rescan = 0.0  # rescan everything on the next turn
            self.log.info(
                "reloaded",
                resumed=changes.resumed,
                config=str(new.path),
                added=changes.added,
                removed=changes.removed,
                changed=changes.changed,
                deferred=sorted(n for n, s in self.models.items() if s.next_cfg or s.retiring),
            )
            # A reload is also how an operator says "my code changed": no
            # export after it runs in a worker that imported the old code.
            self.launcher.retire(None, "reloaded")
            return True
        finally:
            systemd.notify("READY=1", f"STATUS={self.status_line()}")

    def _sync_watches(self) -> None:
        # Only local folders have events to watch; object stores are polled.
        self.watcher.sync(
            {
                n: s.cfg.checkpoint_dir
                for n, s in self.models.items()
                if not s.retiring and isinstance(s.cfg.checkpoint_dir, Path)
            }
        )
        self.metrics.set_watch_backend(self.watcher.backend)

    # --- status and shutdown ------------------------------------------------

    def status_line(self) -> str:
        return status_line(self.models.items())

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
                kill_group(job.proc, grace=CHILD_KILL_GRACE_SECONDS)
            self.log.info(
                "export_abandoned",
                **job.log_fields,
                phase=job.phase,
                hint="it will be exported again at the next start",
            )
            self.outcomes.cleanup(job)
            st.job = None
        self.launcher.close()
        self.labels.close()
        self.watcher.stop()
        if self.http is not None:
            self.http.stop()
        self.log.info("stopped")


def _version_path(job: Job) -> Location:
    return job.model.cfg.base_path / str(job.published_version)
