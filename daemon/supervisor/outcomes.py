"""How a job ends: failed (rejected, paused or retried later) or finished, and what it leaves.

A failure is classified by :mod:`daemon.rules.failures`: *permanent* (the
checkpoint is bad: recorded in ``rejected.json``, never retried), *model*
(the builder or config is at fault: the model pauses until a reload, the
checkpoint stays pending) or *transient* (timeout, crash, resources:
retried with exponential backoff). Its export folder is moved aside for
inspection, never published. Ending a job frees its model for the next one;
a reload that waited for the job is applied by the loop, not here.
"""

from __future__ import annotations

import time
from typing import Any

from daemon.basepath.publish import discard_export, discard_staging, move_aside
from daemon.basepath.records import write_rejected
from daemon.rules.failures import MODEL_FAILURES, backoff_seconds
from daemon.supervisor.context import Context
from daemon.supervisor.launcher import Launcher
from daemon.supervisor.reporting import BUCKET_HINT
from daemon.supervisor.state import Job, ModelState

_PAUSED_HINT = (
    "the model's builder or config is at fault, not the checkpoint: nothing is exported "
    "for this model until you fix it and reload (systemctl reload, or SIGHUP); its "
    "checkpoints stay pending"
)
_REJECTED_HINT = (
    "this checkpoint will not be retried; fix the model or config, later checkpoints are "
    "still exported"
)


class Outcomes:
    """Ends jobs: :meth:`fail` and :meth:`finish`; see the module docstring."""

    def __init__(self, ctx: Context, launcher: Launcher) -> None:
        self.ctx = ctx
        self.launcher = launcher

    def fail(
        self, job: Job, reason: str, message: str, *, permanent: bool, output: str | None = None
    ) -> None:
        """End ``job`` with a failure: count it, keep its export aside, decide what comes next."""
        st = job.model
        self._count(job, reason, permanent)
        if st.failing_since is None:
            st.failing_since = time.time()
        fields: dict[str, Any] = dict(
            job.log_fields, phase=job.phase, reason=reason, error=message, permanent=permanent
        )
        kept = self._keep_export(job, reason)
        if kept is not None:
            fields["kept_at"] = kept
        if output:
            fields["output_tail"] = output
        record = {"reason": reason, "error": message[:2000], "at": time.time()}
        if permanent and reason in MODEL_FAILURES:
            st.paused = record
            hint = BUCKET_HINT if reason == "object_store_unusable" else _PAUSED_HINT
            self.ctx.log.error("model_paused", **fields, hint=hint)
        elif permanent:
            st.rejected[job.ckpt.fingerprint] = {"checkpoint": str(job.ckpt.prefix), **record}
            write_rejected(st.cfg.base_path, st.rejected)
            self.ctx.log.error("export_rejected", **fields, hint=_REJECTED_HINT)
        else:
            self._retry_later(st, job.ckpt.fingerprint, fields)
        self.finish(job)

    def _count(self, job: Job, reason: str, permanent: bool) -> None:
        name, metrics = job.model.cfg.name, self.ctx.metrics
        # A paused model's checkpoint is not rejected: it is exported after the fix.
        outcome = "rejected" if permanent and reason not in MODEL_FAILURES else "failed"
        metrics.exports.labels(name, outcome).inc()
        metrics.failures.labels(name, job.phase, reason).inc()
        if job.phase == "validate":
            metrics.validations.labels(name, "failed").inc()
        if reason in ("child_crashed", "timeout") and job.phase in ("export", "validate"):
            metrics.worker_restarts.labels(name, job.phase).inc()

    def _keep_export(self, job: Job, reason: str) -> str | None:
        """Move the job's export folder aside for inspection; where it went, if kept."""
        if job.temp_dir is None or not job.temp_dir.exists():
            return None
        # A half-written export on a full disk is nothing to inspect, and
        # keeping it would eat the space the retry needs.
        keep = 0 if reason == "no_space" else self.ctx.config.daemon.keep_failed
        label = f"{job.ckpt.name}-{reason}"
        try:
            kept = move_aside(job.temp_dir, job.model.cfg.base_path, label, keep)
        except OSError:
            discard_export(job.temp_dir, job.model.cfg.base_path)
            kept = None
        job.temp_dir = None
        return None if kept is None else str(kept)

    def _retry_later(self, st: ModelState, fingerprint: str, fields: dict[str, Any]) -> None:
        n = st.attempts.get(fingerprint, 0) + 1
        st.attempts[fingerprint] = n
        delay = backoff_seconds(n, self.ctx.config.daemon.retry_backoff_seconds)
        st.retry_at[fingerprint] = time.time() + delay
        self.ctx.log.error("export_failed", **fields, attempt=n, retry_in_seconds=delay)

    def finish(self, job: Job) -> None:
        """The job is over, whatever its outcome: clean up and free its model."""
        self.cleanup(job)
        job.done = True
        st = job.model
        if st.job is job:
            st.job = None
        st.dirty = True

    def cleanup(self, job: Job) -> None:
        """Stop an early validator (and a reusable child not kept); remove the job's
        unpublished export and staging."""
        self.launcher.stop_early(job)
        self.launcher.drop_child(job)
        base = job.model.cfg.base_path
        if job.temp_dir is not None:
            discard_export(job.temp_dir, base)
            job.temp_dir = None
        if job.staging is not None:
            discard_staging(job.staging, base)
