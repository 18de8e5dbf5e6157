"""Starting and stopping the children of a job: warm or cold, and the thread that waits for each.

A phase's child is forked from a zygote when the warm pool has one
(:mod:`daemon.supervisor.warm_pool`) and started from scratch otherwise; a
reusable export worker kept from the model's previous export is preferred.
Either way a thread per child only waits for it and puts ``("child",
job_id)`` on the event queue; the main loop reacts. Nothing here decides a
job's fate: a child that cannot be started warm is started cold, and what
a child's end means is :mod:`daemon.supervisor.pipeline`'s business.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from daemon import protocol
from daemon.durable import write_json_atomic
from daemon.protocol import ExportRequest, Limits, ValidateRequest
from daemon.supervisor.context import Context
from daemon.supervisor.state import Job
from daemon.supervisor.warm_pool import WARM_MODULES, Proc, WarmChild, WarmPool
from daemon.supervisor.warm_pool import stop as warm_stop

#: A request file's contents, before the fields every child gets are added.
Request = ExportRequest | ValidateRequest


class Launcher:
    """Starts each phase's child for the jobs of one supervisor, through its warm pool."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.warm = WarmPool(enabled=ctx.config.daemon.warm_workers)

    # --- settings -------------------------------------------------------------

    def child_limits(self) -> Limits:
        """CPU, I/O and thread limits for the worker and validator children."""
        d = self.ctx.config.daemon
        return {
            "nice": d.worker_nice,
            "io_class": d.worker_io_class,
            "threads": d.worker_threads_effective,
        }

    def warm_settings(self, module: str) -> str:
        d = self.ctx.config.daemon
        return WarmPool.settings(module, self.child_limits(), d.allow_gpu, d.exporter_max_exports)

    def write_request(self, job: Job, phase: str, request: Request) -> Path:
        """Write the request file of ``phase``, with the fields every child gets; its path."""
        assert job.staging is not None
        request = request.copy()
        request["parent_pid"] = os.getpid()
        request["result"] = str(job.staging / f"{phase}.result.json")
        request["limits"] = self.child_limits()
        request["log"] = str(job.staging / f"{phase}.log")  # where a warm child's output goes
        req_path = job.staging / f"{phase}.request.json"
        write_json_atomic(req_path, request)
        return req_path

    # --- starting -------------------------------------------------------------

    def spawn(
        self,
        job: Job,
        phase: str,
        module: str,
        request: Request,
        worker_key: str | None = None,
        python: str | None = None,
    ) -> None:
        """Start ``module`` on ``request`` for ``job``'s ``phase``: kept worker, fork, or cold.

        ``worker_key``: an export worker kept under this key may take the request.
        ``python``: another interpreter (a model's ``worker_python``); such a
        child always starts cold, since the zygotes run the daemon's own.
        """
        assert job.staging is not None
        req_path = self.write_request(job, phase, request)
        settings = self.warm_settings(module)
        warm = None
        if worker_key is not None and python is None:
            warm, retired = self.warm.take_kept(worker_key, settings)
            if retired is not None:
                self.retired(*retired)
        reused = warm is not None
        if python is None:
            warm = warm or self.warm.take(module, settings)
        proc = None
        if warm is not None:
            try:
                proc = warm.hand(str(req_path))
            except OSError:
                # It died between the pool's check and now (EPIPE): start cold.
                warm_stop(warm)
                warm, reused = None, False
        if proc is None:
            argv = protocol.child_command(module, req_path, python)
            proc = self._spawn_cold(argv, job.staging / f"{phase}.log")
        job.proc = proc
        # The PID, so that "what is process 12345 doing?" has an answer in the log.
        self.ctx.log.info(
            "child_started",
            **job.log_fields,
            phase=phase,
            pid=proc.pid,
            warm=warm is not None,
            reused=reused,
        )
        self.watch(job, phase, warm)

    def _spawn_cold(self, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("wb") as out:
            # A session of its own: Ctrl-C in a terminal reaches only the
            # supervisor, which then stops the child deliberately.
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_command(self, job: Job, argv: list[str], cwd: Path) -> None:
        """Run the gate command as ``job``'s ``gate`` phase; OSError if it cannot start."""
        assert job.staging is not None
        with (job.staging / "gate.log").open("wb") as out:
            job.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # killed as a group on timeout or shutdown
            )
        self.ctx.log.info(
            "child_started", **job.log_fields, phase="gate", pid=job.proc.pid, warm=False
        )
        self.watch(job, "gate", None)

    def watch(self, job: Job, phase: str, warm: WarmChild | None) -> None:
        """Make ``phase`` the job's phase and wait for its child on a thread of its own."""
        job.phase = phase
        job.child = warm
        job.phase_started = time.monotonic()
        job.deadline = job.phase_started + self.ctx.config.daemon.export_timeout_seconds
        proc, done, job_id, events = job.proc, threading.Event(), job.id, self.ctx.events
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
            events.put(("child", job_id))

        threading.Thread(target=wait_and_tell, name=f"wait-{phase}-{job.id}", daemon=True).start()

    # --- a validator started with the export ----------------------------------

    def start_validator_early(self, job: Job, request: ValidateRequest) -> None:
        """Fork a warm validator and hand it its request now, for an incremental export.

        It imports the template version's graph while the worker writes the
        weights (:func:`daemon.children.validator.preload`), then waits for
        ``go``, sent when the export succeeded (:meth:`release_validator`);
        any other end of the job stops it (:meth:`stop_early`). Without a
        zygote to fork it from, validation starts after the export as usual.
        """
        settings = self.warm_settings(protocol.VALIDATOR)
        warm = self._kept_validator(job, settings) or self.warm.take(protocol.VALIDATOR, settings)
        if warm is None:
            return
        request = request.copy()
        request["wait_for_export"] = True
        req_path = self.write_request(job, "validate", request)
        try:
            warm.hand(str(req_path), then_go=True)
        except OSError:
            warm_stop(warm)
            return
        job.early = warm
        self.ctx.log.info(
            "child_started",
            **job.log_fields,
            phase="validate",
            pid=warm.proc.pid,
            warm=True,
            reused=False,
            early=True,
        )

    def release_validator(self, job: Job) -> bool:
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
        self.watch(job, "validate", early)
        return True

    def stop_early(self, job: Job) -> None:
        """The export did not succeed: the validator waiting for it goes."""
        if job.early is not None:
            warm_stop(job.early)
            job.early = None

    def drop_child(self, job: Job) -> None:
        """The job is over: a reusable child it still holds (not kept) is stopped.

        A reusable validator that passed an export the signature contract then
        refused, say, waits for another request that will never come.
        """
        c, job.child = job.child, None
        if c is not None and c.done is not None and c.proc.poll() is None:
            warm_stop(c)

    # --- the pool -------------------------------------------------------------

    @staticmethod
    def validator_key(job: Job) -> str | None:
        """The key a validator of ``job``'s export is kept under: its graph key, or None."""
        return None if job.graph_key is None else f"validator:{job.graph_key}"

    def _kept_validator(self, job: Job, settings: str) -> WarmChild | None:
        key = self.validator_key(job)
        if key is None:
            return None
        warm, retired = self.warm.take_kept(key, settings)
        if retired is not None:
            self.retired(*retired)
        return warm

    def keep_validator(self, job: Job) -> None:
        """Keep a reusable validator that passed ``job``'s export for the model's next one.

        It holds that graph's session (where it could keep one, see
        :mod:`daemon.children.validator`); the next export of the same graph
        key is handed to it. Without a graph key it is stopped.
        """
        c, job.child = job.child, None
        if c is None or c.module != protocol.VALIDATOR or c.proc.poll() is not None:
            return
        key = self.validator_key(job)
        if c.done is None or key is None:
            warm_stop(c)
            return
        for e in self.warm.keep(c, key, {}, self.ctx.config.daemon.concurrency):
            self.retired(e, "evicted")

    def keep_exporter(self, job: Job, code_files: dict[str, list[int]]) -> None:
        """Give a reusable export worker that finished its export back to the pool."""
        c, job.child = job.child, None
        if c is None or c.proc.poll() is not None or c.done is None:
            return  # single-use, or it exited (its last export)
        if job.worker_key is None:
            warm_stop(c)
            return
        concurrency = self.ctx.config.daemon.concurrency
        for e in self.warm.keep(c, job.worker_key, code_files, concurrency):
            self.retired(e, "evicted")

    def retire(self, key: str | None, reason: str) -> None:
        """Retire the kept exporters (of ``key``, or all): their code may be stale."""
        for c in self.warm.retire(key):
            self.retired(c, reason)

    def refill(self) -> None:
        """Keep a zygote ready to fork workers and validators (``warm_workers``).

        Only while an export slot is free: a zygote importing TensorFlow next
        to a running export would take CPU from it (and from the trainer) to
        save time for an export that cannot start yet anyway.
        """
        d = self.ctx.config.daemon
        self.warm.enabled = d.warm_workers
        if not self.warm.enabled:
            self.warm.close()
        elif self.ctx.running_jobs() < d.concurrency:
            self.warm.refill({m: self.warm_settings(m) for m in WARM_MODULES})
        for gone in self.warm.take_exits():
            self.ctx.log.warning(
                "zygote_exited",
                pid=gone["pid"],
                code=gone["code"],
                retry_in_seconds=gone["retry_in"],
                hint="exports start cold meanwhile; if it keeps exiting, check that the "
                "daemon's user can run: python -c 'import tensorflow'",
            )
        for c in self.warm.expire(d.exporter_idle_seconds):
            self.retired(c, "idle")
        self.ctx.metrics.warm_children_bytes.set(self.warm.rss_bytes())

    def retired(self, c: WarmChild, reason: str) -> None:
        """Log a kept child's end: ``exporter_retired`` or ``validator_retired``."""
        event = "validator_retired" if c.module == protocol.VALIDATOR else "exporter_retired"
        self.ctx.log.info(event, pid=c.proc.pid, exports=c.exports, reason=reason)

    def close(self) -> None:
        self.warm.close()


def kill_group(proc: Proc, grace: float = 0.0) -> None:
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
