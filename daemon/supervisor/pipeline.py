"""One checkpoint's journey: the phase machine of a :class:`~daemon.supervisor.state.Job`.

``pin`` (stage the checkpoint: :mod:`daemon.supervisor.staging`) ->
``export`` (worker child) -> ``validate`` (validator child) -> ``gate``
(the model's gate command, if any) -> ``publish``
(:mod:`daemon.supervisor.publishing`) -> retention.

:meth:`Pipeline.start` stages a checkpoint and starts its export;
:meth:`Pipeline.advance`, called by the loop on every turn, moves a job on
once its phase's child finished (or kills it at its deadline). A phase's
result decides the next step; every end of a job goes through
:class:`~daemon.supervisor.outcomes.Outcomes`. An incremental export that
fails validation is exported once more in full before the checkpoint is
blamed. A passed validation is held to the signature contract
(:mod:`daemon.rules.signatures`, against :func:`reference_version`) before
the gate and the publication.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

from daemon import exitcodes, protocol
from daemon.basepath import catalog
from daemon.basepath.layout import REPORT_RELPATH
from daemon.basepath.operations import (
    consume_signature_acceptance,
    signature_accepted,
    tree_bytes,
)
from daemon.basepath.publish import new_temp_dir, reset_export_dir, staging_dir
from daemon.config.loading import ModelConfig
from daemon.durable import write_json_atomic
from daemon.objectstore.client import CONFIGURATION_KINDS, ObjectStoreError
from daemon.protocol import (
    ExportOutcome,
    ExportRequest,
    ExportResult,
    FailureResult,
    SignatureContract,
    ValidateRequest,
    ValidationOutcome,
    ValidationResult,
)
from daemon.rules import signatures
from daemon.rules.failures import MODEL_FAILURES
from daemon.rules.gate import command_argv
from daemon.sources import SOURCES, Checkpoint
from daemon.supervisor import reuse
from daemon.supervisor.context import Context
from daemon.supervisor.launcher import Launcher, kill_group
from daemon.supervisor.outcomes import Outcomes
from daemon.supervisor.publishing import (
    LockBusy,
    Published,
    Publisher,
    PublishFailed,
    PublishOutcome,
    Skipped,
)
from daemon.supervisor.reporting import signature_summary, tail
from daemon.supervisor.scheduling import Scheduler
from daemon.supervisor.staging import CheckpointVanished, fetch_checkpoint, stage_checkpoint
from daemon.supervisor.state import Job, ModelState


def reference_version(st: ModelState) -> catalog.Published | None:
    """The version whose signatures a new export of ``st``'s model must keep.

    The one place that chooses it: the version labelled stable in TF
    Serving's model config (with ``[serving_config]``), else the newest
    version this daemon published for the model (what clients get without a
    version or label).
    """
    if st.stable_version is not None:
        for p in st.published:
            if p.version == st.stable_version:
                return p
    return st.newest


def reference_signatures(version: catalog.Published) -> Any:
    """The validation report's ``signatures`` recorded in ``version``'s metadata, or None."""
    validation = version.metadata.get("validation")
    return validation.get("signatures") if isinstance(validation, dict) else None


class Pipeline:
    """Starts jobs and moves them through their phases; see the module docstring."""

    def __init__(
        self,
        ctx: Context,
        launcher: Launcher,
        outcomes: Outcomes,
        publisher: Publisher,
        scheduler: Scheduler,
    ) -> None:
        self.ctx = ctx
        self.launcher = launcher
        self.outcomes = outcomes
        self.publisher = publisher
        self.scheduler = scheduler

    # --- start ----------------------------------------------------------------

    def start(self, st: ModelState, ckpt: Checkpoint, gate: dict[str, Any]) -> None:
        """Stage ``ckpt`` and start its export (or fail the job at once).

        A checkpoint on an object store is fetched in the I/O threads first;
        :meth:`advance` starts the export once it is staged.
        """
        job = Job(model=st, ckpt=ckpt, gate=gate)
        if job.ckpt.fingerprint not in st.full_export_only:
            job.graph_key = reuse.graph_key(st.cfg)
            job.template = reuse.template(st.cfg.base_path, st.published, job.graph_key)
        if not isinstance(ckpt.prefix, Path):
            self._fetch(job)
        elif self._stage(job):
            st.job = job
            self._begin_export(job)

    def _begin_export(self, job: Job) -> None:
        """The checkpoint is staged: create the export folder and start the worker."""
        st = job.model
        base = st.cfg.base_path
        try:
            job.temp_dir = new_temp_dir(base)
        except OSError as e:
            message = f"cannot create a folder in {base}: {e}"
            self.outcomes.fail(job, "temp_dir_failed", message, permanent=False)
            return
        request = job.export_request = self._export_request(job, job.template)
        python = worker_python(st.cfg)
        if python is None:
            job.worker_key = reuse.worker_key(self.ctx.config.daemon, st.cfg.source, request)
        if job.worker_key is not None:
            request["exporter_key"] = job.worker_key
        self.launcher.spawn(job, "export", protocol.WORKER, request, job.worker_key, python)
        if job.template is not None:
            self.launcher.start_validator_early(job, self._validate_request(job, job.template))

    def _stage(self, job: Job) -> bool:
        """Stage the job's checkpoint (phase ``pin``); False if the job ended instead."""
        log = self.ctx.log.bind(**job.log_fields)
        job.staging = staging_dir(job.model.cfg.base_path, job.id)
        try:
            copy = SOURCES[job.model.cfg.source].rewrites_in_place
            job.staged, method = stage_checkpoint(job.ckpt, job.staging, copy=copy)
        except CheckpointVanished as e:
            log.info("checkpoint_vanished", detail=str(e))
            self.outcomes.cleanup(job)
            job.model.dirty = True
            return False
        except OSError as e:
            self.outcomes.cleanup(job)
            message = f"cannot stage into {job.staging}: {e}"
            self.outcomes.fail(job, "pin_failed", message, permanent=False)
            return False
        self._phase_done(job, "pin")
        log.info("export_started", pinned_by=method)
        return True

    def _fetch(self, job: Job) -> None:
        """Start downloading the job's checkpoint into staging (only the tensors it needs)."""
        st = job.model
        st.job = job
        job.staging = staging_dir(st.cfg.base_path, job.id)
        tensors = reuse.needed_tensors(job.template)
        job.deadline = time.monotonic() + self.ctx.config.daemon.export_timeout_seconds
        progress = _progress_line(self.ctx.log.bind(**job.log_fields), "fetch_progress")
        job.io = self._submit(job, fetch_checkpoint, job.ckpt, job.staging, tensors, progress)
        self.ctx.log.info(
            "fetch_started",
            **job.log_fields,
            tensors=None if tensors is None else len(tensors),
        )

    def _fetched(self, job: Job, future: Future[Any]) -> None:
        """The fetch ended: start the export, or end the job."""
        try:
            job.staged, method, downloaded = future.result()
        except CheckpointVanished as e:
            self.ctx.log.info("checkpoint_vanished", **job.log_fields, detail=str(e))
            self.outcomes.finish(job)
            return
        except OSError as e:
            self._storage_failed(job, e, "pin_failed", f"cannot fetch {job.ckpt.prefix}: {e}")
            return
        self._phase_done(job, "pin")
        self.ctx.log.info(
            "export_started", **job.log_fields, pinned_by=method, downloaded_bytes=downloaded
        )
        self._begin_export(job)

    def _storage_failed(self, job: Job, e: OSError, reason: str, message: str) -> None:
        """A fetch or an upload failed: pause the model if the bucket is unusable, else retry."""
        if isinstance(e, ObjectStoreError) and e.kind in CONFIGURATION_KINDS:
            self.outcomes.fail(job, "object_store_unusable", message, permanent=True)
        else:
            self.outcomes.fail(job, reason, message, permanent=False)

    def _export_request(self, job: Job, template: str | None) -> ExportRequest:
        cfg, d = job.model.cfg, self.ctx.config.daemon
        assert job.staging is not None and job.temp_dir is not None
        return {
            "result": str(job.staging / "export.result.json"),
            "source": cfg.source,
            "options": dict(cfg.options),
            "builder": cfg.builder,
            "python_path": [str(p) for p in cfg.python_path],
            "checkpoint_key": cfg.checkpoint_key,
            "checkpoint": str(job.staged),
            "export_dir": str(job.temp_dir),
            "reference": str(job.staging / "reference.npz"),
            "allow_gpu": d.allow_gpu,
            "signature": [
                {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in cfg.signature
            ],
            "input_type": cfg.input_type,
            "image_preprocessing": (
                cfg.image_preprocessing.spec() if cfg.image_preprocessing else None
            ),
            "model": cfg.name,
            "sample_inputs": _str_or_none(cfg.sample_inputs),
            "warmup_records": cfg.warmup_records,
            "template": template,
            "synthetic_image_size": cfg.synthetic_image_size,
        }

    def _validate_request(self, job: Job, graph_of: str | None) -> ValidateRequest:
        cfg = job.model.cfg
        assert job.temp_dir is not None and job.staging is not None
        request: ValidateRequest = {
            "result": str(job.staging / "validate.result.json"),
            "saved_model": str(job.temp_dir),
            "reference": str(job.staging / "reference.npz"),
            "rtol": cfg.rtol,
            "atol": cfg.atol,
            "sample_inputs": _str_or_none(cfg.sample_inputs),
            "golden_outputs": _str_or_none(cfg.golden_outputs),
            "warmup_records": cfg.warmup_records,
            # An incremental export's graph is that version's (see daemon.children.validator).
            "graph_of": graph_of,
            # Weight parity against the staged copy, where the source allows.
            "checkpoint": str(job.staged) if SOURCES[cfg.source].weights_in_checkpoint else None,
            "synthetic_image_size": cfg.synthetic_image_size,
        }
        if "weight_parity" in cfg.options:  # a source that may relax it (command)
            request["weight_parity"] = cfg.options["weight_parity"]
        return request

    # --- advance --------------------------------------------------------------

    def advance(self, job: Job) -> None:
        """Move ``job`` forward if its current phase has finished."""
        if job.io is not None:
            self._advance_io(job)
            return
        if job.phase == "publish":
            self._publish(job)
            return
        assert job.proc is not None and job.staging is not None
        if not job.child_done.is_set():
            if time.monotonic() > job.deadline:
                kill_group(job.proc)
                timeout = self.ctx.config.daemon.export_timeout_seconds
                message = (
                    f"{job.phase} did not finish within {timeout:g} s (export_timeout_seconds)"
                )
                self.outcomes.fail(job, "timeout", message, permanent=False)
            return
        if job.phase == "gate":
            self._command_gate_done(job)
            return
        raw = protocol.read_result(job.staging / f"{job.phase}.result.json")
        if raw is None:
            self._no_result(job)
        elif job.phase == "export":
            self._export_done(job, cast(ExportOutcome, raw))
        else:
            self._validate_done(job, cast(ValidationOutcome, raw))

    def _submit(self, job: Job, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in the I/O threads; its end wakes the loop as a child's end does."""
        future = self.ctx.io.submit(fn, *args)
        events = self.ctx.events
        future.add_done_callback(lambda _f: events.put(("child", job.id)))
        return future

    def _advance_io(self, job: Job) -> None:
        """The job's storage work (fetch or upload) ran in a thread: go on once it is done."""
        assert job.io is not None
        if not job.io.done():
            return
        future, job.io = job.io, None
        if job.phase == "pin":
            self._fetched(job, future)
        else:
            self._publish_outcome(job, future.result())

    def _export_done(self, job: Job, result: ExportOutcome) -> None:
        if not result["ok"]:
            self._failed(job, result)
            return
        self._phase_done(job, "export")
        self._exported(job, result)

    def _validate_done(self, job: Job, result: ValidationOutcome) -> None:
        refused = None
        if result["ok"] and "signatures" in result:
            refused = self._signature_contract(job, result)
        self._write_report(job, result)
        if refused is not None:
            self._signature_refused(job, result, refused)
            return
        if not result["ok"]:
            incremental = job.export_result.get("incremental", {}) if job.export_result else {}
            if incremental.get("template"):
                self._retry_in_full(job, result)
            else:
                self._failed(job, result)
            return
        assert "signatures" in result  # a passed validation is a report
        self._phase_done(job, "validate")
        self._validated(job, result)

    def _signature_contract(self, job: Job, result: ValidationResult) -> str | None:
        """Hold the export's signatures to the contract; the refusal, or None to go on.

        Records the verdict as the report's ``signature_contract``; a refusal
        also turns the report into a failed one (``signature_changed``, the
        changes that break clients in its error), so the report kept with
        the moved-aside export says why. Returns ``"permanent"`` or
        ``"transient"`` (the acceptance record could not be read) on refusal.
        """
        st, cfg = job.model, job.model.cfg
        log = self.ctx.log.bind(**job.log_fields)
        reference = reference_version(st)
        contract: SignatureContract = {
            "reference": None if reference is None else reference.version
        }
        result["signature_contract"] = contract
        unreadable = None
        try:
            contract["acceptance"] = signature_accepted(cfg.base_path)
        except OSError as e:
            contract["acceptance"] = False
            unreadable = f"the accept-signature record of {cfg.base_path} cannot be read: {e}"
            log.warning("signature_acceptance_unreadable", error=unreadable)
        if reference is None:
            contract["skipped"] = "no version published yet"
            return None
        old = signatures.from_report(reference_signatures(reference))
        new = signatures.from_report(result["signatures"])
        if old is None or new is None:
            whose = f"version {reference.version}" if old is None else "this export"
            contract["skipped"] = (
                f"{whose} records no declared signatures (validated before the signature "
                "contract existed)"
            )
            why = contract["skipped"]
            log.info("signature_check_skipped", reference=reference.version, why=why)
            return None
        changes = signatures.diff(old, new)
        breaking = signatures.breaking(changes)
        contract["changes"] = [str(c) for c in changes]
        contract["breaking"] = [str(c) for c in breaking]
        if not breaking:
            if changes:
                log.info(
                    "signatures_extended", reference=reference.version, changes=contract["changes"]
                )
            return None
        diff = signatures.render(breaking)
        if cfg.allow_signature_change:
            contract["allowed_by"] = "allow_signature_change"
        elif contract["acceptance"]:
            contract["allowed_by"] = "accept-signature"
        if "allowed_by" in contract:
            log.warning(
                "signature_change_allowed",
                reference=reference.version,
                allowed_by=contract["allowed_by"],
                diff=diff,
            )
            return None
        message = (
            f"the signatures break clients of version {reference.version}: {diff}. "
            f"To publish the change anyway: `ckpt-exporter accept-signature {cfg.name}` "
            "(the next version only) or allow_signature_change = true"
        )
        if unreadable is not None:
            message = f"{message}; {unreadable}, retried"
        result.update(
            {
                "ok": False,
                "reason": "signature_changed",
                "error": message,
                "permanent": unreadable is None,
            }
        )
        return "permanent" if unreadable is None else "transient"

    def _signature_refused(self, job: Job, result: ValidationOutcome, how: str) -> None:
        """The signature contract refused the export: rejected, or retried (see above)."""
        message = str(result.get("error"))
        if how == "permanent":
            self.outcomes.fail(job, "signature_changed", message, permanent=True)
        else:
            self.outcomes.fail(job, "signature_changed", message, permanent=False)

    def _failed(self, job: Job, result: FailureResult | ValidationResult) -> None:
        """The phase's child reported a failure: end the job with its reason."""
        assert job.staging is not None
        output = tail(job.staging / f"{job.phase}.log")
        error, permanent = str(result.get("error")), bool(result.get("permanent"))
        self.outcomes.fail(
            job, str(result.get("reason", "unknown")), error, permanent=permanent, output=output
        )

    def _no_result(self, job: Job) -> None:
        """The phase's child ended without writing a result: a full disk, or a crash."""
        assert job.proc is not None and job.staging is not None
        output = tail(job.staging / f"{job.phase}.log")
        if job.proc.returncode == exitcodes.NO_SPACE:
            message = (
                f"the {job.phase} process could not write its result into {job.staging}: "
                f"no space left on the device of {job.model.cfg.base_path}; free some space, "
                "the export is retried"
            )
            self.outcomes.fail(job, "no_space", message, permanent=False, output=output)
            return
        code = job.proc.poll()
        how = (
            "said it was done without a result"
            if code is None
            else f"was killed by {signal.Signals(-code).name}"
            if code < 0
            else f"exited with status {code} without a result"
        )
        if code is None:
            kill_group(job.proc)
        message = f"the {job.phase} process {how}; its output is in the log above"
        self.outcomes.fail(job, "child_crashed", message, permanent=False, output=output)

    def _exported(self, job: Job, result: ExportResult) -> None:
        job.export_result = result
        self.launcher.keep_exporter(job, result.get("code_files", {}))
        incremental = result.get("incremental", {})
        self.ctx.log.info(
            "exported",
            **job.log_fields,
            seconds=round(job.durations["export"], 3),
            variables=result.get("variables"),
            warm=bool(result.get("warm")),
            # Exports this worker did before this one (0: a fresh process).
            reused=result.get("reused", 0),
            # Which version's graph was reused, or why not (daemon.children.incremental).
            incremental_from=incremental.get("template"),
            incremental_fallback=incremental.get("fallback"),
            # Linked or copied from the checkpoint without TensorFlow, or
            # why not (then restored by TensorFlow).
            weights=incremental.get("weights"),
            link_fallback=incremental.get("link_fallback"),
        )
        if not self.launcher.release_validator(job):
            request = self._validate_request(job, incremental.get("template"))
            key = self.launcher.validator_key(job)
            self.launcher.spawn(job, "validate", protocol.VALIDATOR, request, key)

    def _validated(self, job: Job, result: ValidationResult) -> None:
        job.validation = result
        self.launcher.keep_validator(job)
        weights, warmup = result.get("weights"), result.get("warmup")
        self.ctx.metrics.validations.labels(job.model.cfg.name, "passed").inc()
        self.ctx.log.info(
            "validated",
            **job.log_fields,
            seconds=round(job.durations["validate"], 3),
            signatures=signature_summary(result),
            # How many exported variables were proven to come from the checkpoint.
            weights_matched=weights.get("matched", weights["variables"]) if weights else None,
            warmup_records=warmup["records"] if warmup else None,
            warm=bool(result.get("warm")),
        )
        if job.model.cfg.gate.command:
            self._start_command_gate(job)
        else:
            self._to_publish(job)

    def _retry_in_full(self, job: Job, result: ValidationOutcome) -> None:
        """An incremental export failed validation: export the checkpoint again in full.

        The template's graph may be what is wrong (code the builder imports
        changed, for example), so the checkpoint is not blamed until a full
        export of it fails too.
        """
        st = job.model
        self.ctx.metrics.validations.labels(st.cfg.name, "failed").inc()
        self.ctx.log.warning(
            "incremental_export_failed",
            **job.log_fields,
            reason=result.get("reason"),
            error=str(result.get("error"))[:500],
            hint="exporting this checkpoint again in full",
        )
        st.full_export_only.add(job.ckpt.fingerprint)
        if job.worker_key is not None:
            # The full export is the ground truth: a fresh process, with the
            # code as it is on disk now, not the worker that made this one.
            self.launcher.retire(job.worker_key, "incremental_export_failed")
        assert job.temp_dir is not None
        reset_export_dir(job.temp_dir, st.cfg.base_path)
        job.export_result = None
        job.phase_started = time.monotonic()
        assert job.export_request is not None
        request = job.export_request.copy()
        request["template"] = None
        python = worker_python(st.cfg)
        self.launcher.spawn(job, "export", protocol.WORKER, request, job.worker_key, python)

    def _write_report(self, job: Job, result: ValidationOutcome) -> None:
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
            self.ctx.log.warning("report_not_written", **job.log_fields, error=str(e))

    # --- gate command and publication -----------------------------------------

    def _start_command_gate(self, job: Job) -> None:
        """Run the model's gate command on the validated export (phase ``gate``)."""
        assert job.temp_dir is not None
        cfg = job.model.cfg
        argv = command_argv(cfg.gate, job.temp_dir, job.ckpt.prefix, cfg.name, job.step)
        try:
            self.launcher.start_command(job, argv, job.temp_dir)
        except OSError as e:
            message = f"cannot run the gate command {argv[0]!r}: {e.strerror or e}"
            self.outcomes.fail(job, "gate_unusable", message, permanent=True)

    def _command_gate_done(self, job: Job) -> None:
        """Publish when the gate command exited 0; gate the checkpoint out otherwise."""
        assert job.proc is not None and job.staging is not None
        code = job.proc.wait()  # it has exited: that is why we are here
        output = tail(job.staging / "gate.log")
        if code < 0:
            message = f"the gate command was killed by {signal.Signals(-code).name}"
            self.outcomes.fail(job, "child_crashed", message, permanent=False, output=output)
            return
        self._phase_done(job, "gate")
        if code != 0:
            message = f"the gate command exited with status {code}"
            self.scheduler.gated_out(job.model, job.ckpt, "command", message, output_tail=output)
            self.outcomes.finish(job)
            return
        self.ctx.metrics.gate_decisions.labels(job.model.cfg.name, "passed", "command").inc()
        job.gate["command"] = {"argv": list(job.model.cfg.gate.command), "exit_status": 0}
        self.ctx.log.info("gate_passed", **job.log_fields, gate="command")
        self._to_publish(job)

    def _to_publish(self, job: Job) -> None:
        job.phase = "publish"
        job.phase_started = time.monotonic()
        job.proc = None
        self._publish(job)

    def _publish(self, job: Job) -> None:
        """Try to publish; on a busy lock the job stays in ``publish`` for the next turn.

        Onto an object store the upload takes seconds to minutes: it runs in
        the I/O threads and :meth:`advance` picks up its outcome.
        """
        if not isinstance(job.model.cfg.base_path, Path):
            job.io = self._submit(job, self.publisher.publish, job)
            return
        self._publish_outcome(job, self.publisher.publish(job))

    def _publish_outcome(self, job: Job, outcome: PublishOutcome) -> None:
        if isinstance(outcome, LockBusy):
            if not job.lock_wait_logged:
                self.ctx.log.warning(
                    "waiting_for_lock",
                    **job.log_fields,
                    lock=str(outcome.lock),
                    held_by_pid=outcome.holder,
                )
                job.lock_wait_logged = True
        elif isinstance(outcome, Skipped):
            self.ctx.log.info(outcome.event, **job.log_fields, **outcome.fields)
            self.outcomes.finish(job)
        elif isinstance(outcome, PublishFailed):
            permanent = outcome.permanent or outcome.reason in MODEL_FAILURES
            self.outcomes.fail(job, outcome.reason, outcome.message, permanent=permanent)
        else:
            self._published(job, outcome)

    def _published(self, job: Job, outcome: Published) -> None:
        st, name = job.model, job.model.cfg.name
        self._phase_done(job, "publish")
        st.last_publish_time = time.time()
        st.failing_since = None
        st.attempts.pop(job.ckpt.fingerprint, None)
        st.retry_at.pop(job.ckpt.fingerprint, None)
        st.full_export_only.discard(job.ckpt.fingerprint)
        latency = max(0.0, time.time() - job.ckpt.written_ns / 1e9)
        metrics = self.ctx.metrics
        metrics.latest_version_bytes.labels(name).set(tree_bytes(outcome.path))
        metrics.exports.labels(name, "published").inc()
        metrics.latency.labels(name).observe(latency)
        metrics.last_publish.labels(name).set(st.last_publish_time)
        self.ctx.log.info(
            "published",
            **job.log_fields,
            version=outcome.version,
            path=str(outcome.path),
            durations={k: round(v, 3) for k, v in job.durations.items()},
            checkpoint_to_published_seconds=round(latency, 3),
        )
        job.published_version = outcome.version
        self._consume_acceptance(job, outcome.version)
        self.outcomes.finish(job)

    def _consume_acceptance(self, job: Job, version: int) -> None:
        """A published export that saw an ``accept-signature`` record consumes it (one-shot)."""
        contract = job.validation.get("signature_contract") if job.validation else None
        if not contract or not contract.get("acceptance"):
            return
        fields = dict(job.log_fields, version=version)
        try:
            consume_signature_acceptance(job.model.cfg.base_path)
        except OSError as e:
            self.ctx.log.warning("signature_acceptance_not_consumed", **fields, error=str(e))
            return
        self.ctx.log.info(
            "signature_acceptance_consumed", **fields, allowed_by=contract.get("allowed_by")
        )

    def _phase_done(self, job: Job, phase: str) -> None:
        seconds = time.monotonic() - job.phase_started
        job.durations[phase] = seconds
        self.ctx.metrics.phase_seconds.labels(job.model.cfg.name, phase).observe(seconds)
        job.phase_started = time.monotonic()


#: Long storage work says how far it got at most this often.
PROGRESS_SECONDS = 10.0


def _progress_line(log: Any, event: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback: ``event`` at most every :data:`PROGRESS_SECONDS`.

    Called from an I/O thread (never concurrently); structlog loggers are thread-safe.
    """
    last = time.monotonic()

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS and done < total:
            last = now
            log.info(event, done_bytes=done, total_bytes=total, percent=round(100 * done / total))

    return progress


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def worker_python(cfg: ModelConfig) -> str | None:
    """The interpreter that runs ``cfg``'s export worker: its ``worker_python``, or None (ours)."""
    return str(cfg.worker_python) if cfg.worker_python is not None else None
