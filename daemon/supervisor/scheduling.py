"""Scheduling: which checkpoint of a model starts next, if any (scan, plan, metric gate).

:meth:`Scheduler.next_start` scans the model's checkpoint dir (level
triggered: the directory is the truth), plans with :func:`daemon.rules.planner.plan`
and, where the model has a metric gate, decides it. It returns a
:class:`Start` or None and starts nothing itself: the loop does. Its side
effects are the model's scheduling state (``wait_until``, ``last_plan``),
metrics, log lines, and the record of a gated-out checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from daemon.basepath.operations import RolledBack, load_rolled_back, rolled_back_path
from daemon.basepath.records import write_rejected
from daemon.rules.gate import decide, threshold
from daemon.rules.planner import plan
from daemon.sources import Checkpoint, ScanResult
from daemon.supervisor.context import Context
from daemon.supervisor.reporting import pause_if_bucket_unusable, report_once
from daemon.supervisor.state import ModelState

#: How long a checkpoint may stay incomplete before it is reported (once).
INCOMPLETE_REPORT_SECONDS = 5.0
#: How often a checkpoint waiting for its gate metric looks for it again.
GATE_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Start:
    """The decision to export ``ckpt`` now; ``gate`` holds the metric gate's record, if any."""

    ckpt: Checkpoint
    gate: dict[str, Any] = field(default_factory=dict)


class Scheduler:
    """Decides, model by model, what to export next; see the module docstring."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def next_start(self, st: ModelState) -> Start | None:
        """Scan and plan ``st``: the checkpoint to start now, or None (why is logged once)."""
        st.dirty = False
        st.wait_until = None
        result = self._scan(st)
        if result is None:
            return None
        rolled_back = load_rolled_back(st.cfg.base_path)  # read once a scan
        if not self._rollback_record_readable(st, rolled_back):
            return None
        st.last_scan = result
        decision = plan(
            result.checkpoints,
            rolled_back.apply(st.history()),
            export_policy=st.cfg.export_policy,
            min_interval_seconds=st.cfg.min_interval_seconds,
            now=time.time(),
            busy={st.job.ckpt.fingerprint} if st.job else set(),
        )
        st.last_plan = decision
        self.ctx.metrics.pending.labels(st.cfg.name).set(decision.pending + (1 if st.job else 0))
        waits = [t for t in (decision.wait_until, result.recheck_at) if t is not None]
        st.wait_until = min(waits, default=None)
        if decision.next is None or st.job is not None or self.ctx.stopping or st.retiring:
            return None
        if st.paused is not None:
            return None  # said once when it paused; the pending count still shows the backlog
        if self.ctx.running_jobs() >= self.ctx.config.daemon.concurrency:
            st.dirty = True  # look again when a slot frees up
            return None
        if decision.superseded:
            report_once(
                self.ctx.log,
                st,
                f"superseded:{decision.next.fingerprint}",
                "checkpoints_superseded",
                level="info",
                count=len(decision.superseded),
                newest=decision.next.name,
                policy="latest",
            )
        if not st.cfg.gate.metric:
            return Start(decision.next)
        passed = self._metric_gate(st, decision.next)
        return None if passed is None else Start(decision.next, {"metric": passed})

    def _scan(self, st: ModelState) -> ScanResult | None:
        """The source's scan of the checkpoint dir, its problems reported; None if it failed."""
        log, cfg = self.ctx.log, st.cfg
        try:
            result = st.source.scan(cfg.checkpoint_dir)
        except OSError as e:
            self.ctx.metrics.scan_errors.labels(cfg.name).inc()
            if pause_if_bucket_unusable(log, st, e, str(cfg.checkpoint_dir)):
                return None
            report_once(
                log,
                st,
                "scan",
                "scan_failed",
                path=str(cfg.checkpoint_dir),
                error=str(e),
                hint="make the checkpoint directory readable by the daemon's user",
            )
            return None
        st.reported.discard("scan")
        if not result.directory_exists:
            report_once(
                log,
                st,
                "missing_dir",
                "waiting_for_checkpoint_dir",
                path=str(cfg.checkpoint_dir),
                level="info",
            )
        else:
            st.reported.discard("missing_dir")
        for problem in result.problems:
            report_once(log, st, problem, "checkpoint_problem", problem=problem)
        self._report_incomplete(st, result)
        return result

    def _rollback_record_readable(self, st: ModelState, rolled_back: RolledBack) -> bool:
        """False (said once) while ``rolled_back.json`` is corrupt: nothing may be exported."""
        record = rolled_back.problem
        if record is not None and record.kind == "corrupt":
            report_once(
                self.ctx.log,
                st,
                "rolled_back_record",
                "rollback_record_unreadable",
                level="error",
                path=str(rolled_back_path(st.cfg.base_path)),
                error=record.message,
                hint="nothing is exported for this model until the file is readable JSON "
                "again: exporting could re-publish a checkpoint that was rolled back",
            )
            return False
        st.reported.discard("rolled_back_record")
        return True

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
                report_once(
                    self.ctx.log,
                    st,
                    f"incomplete:{prefix}",
                    "checkpoint_incomplete",
                    level="info",
                    checkpoint=str(st.cfg.checkpoint_dir / prefix),
                    hint=f"skipped until {prefix}.index and every data shard it names exist; "
                    "named in the state file but deleted, or broken",
                )

    def _metric_gate(self, st: ModelState, ckpt: Checkpoint) -> dict[str, Any] | None:
        """Decide the model's metric gate for ``ckpt`` before anything is exported.

        Returns the decision's record (for the version's metadata) when the
        checkpoint may go on; None when it must wait for its metric (the model
        looks again in :data:`GATE_POLL_SECONDS`) or was gated out (recorded,
        not retried; the model is planned again).
        """
        gate = st.cfg.gate
        value = self._read_metric(st, ckpt)
        if value is None:
            waited = time.time() - ckpt.written_ns / 1e9
            if waited < gate.wait_seconds:
                report_once(
                    self.ctx.log,
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
            source = gate.json_file or gate.tensorboard_dir
            self.gated_out(
                st,
                ckpt,
                "metric_missing",
                f"no {gate.metric!r} for step {ckpt.step} in {source} within "
                f"{gate.wait_seconds:g} s (wait_seconds)",
            )
            return None
        best = threshold(gate, [p.metadata for p in sorted(st.published, key=lambda p: p.version)])
        record = {"metric": gate.metric, "value": value, "mode": gate.mode, "better_than": best}
        if not decide(value, gate.mode, best):
            word = "lower" if gate.mode == "min" else "higher"
            last = " (the last published version's)" if isinstance(gate.better_than, str) else ""
            message = f"{gate.metric} = {value:g} is not {word} than {best:g}{last}"
            self.gated_out(st, ckpt, "metric", message, **record)
            return None
        self.ctx.metrics.gate_decisions.labels(st.cfg.name, "passed", "metric").inc()
        self.ctx.log.info("gate_passed", model=st.cfg.name, checkpoint=str(ckpt.prefix), **record)
        return record

    def _read_metric(self, st: ModelState, ckpt: Checkpoint) -> float | None:
        """The gate metric of ``ckpt``; None if not there yet or unreadable (said once)."""
        try:
            return st.metric_reader.read(st.cfg.gate, ckpt.name, ckpt.step)
        except (OSError, ValueError) as e:
            report_once(
                self.ctx.log,
                st,
                f"gate_unreadable:{ckpt.fingerprint}",
                "gate_metric_unreadable",
                checkpoint=str(ckpt.prefix),
                error=str(e),
                hint="fix the metrics file; the checkpoint waits until wait_seconds",
            )
            return None

    def gated_out(
        self, st: ModelState, ckpt: Checkpoint, reason: str, message: str, **fields: Any
    ) -> None:
        """Record ``ckpt`` as gated out: counted, logged, never retried (kept in rejected.json)."""
        self.ctx.metrics.gate_decisions.labels(st.cfg.name, "blocked", reason).inc()
        st.rejected[ckpt.fingerprint] = {
            "checkpoint": str(ckpt.prefix),
            "reason": "gated_out",
            "gate": reason,
            "error": message,
            "at": time.time(),
        }
        write_rejected(st.cfg.base_path, st.rejected)
        self.ctx.log.info(
            "gated_out",
            model=st.cfg.name,
            checkpoint=str(ckpt.prefix),
            step=ckpt.step,
            gate=reason,
            detail=message,
            **fields,
        )
        st.dirty = True
