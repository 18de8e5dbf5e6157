"""Failure reasons: every reason an export can fail with, its phases and its kind.

A failed job carries a *reason*, a short ``snake_case`` word that names what
went wrong. It labels the ``ckpt_exporter_export_failures_total`` metric, the
``export_failed``/``export_rejected``/``model_paused`` log events and the
entries of ``rejected.json``. :data:`FAILURES` lists every reason the daemon
can produce; a reason raised anywhere in ``daemon/`` without an entry here
fails the tests.

Each reason has one *kind*, which says what the supervisor does about it:

- ``"transient"``: the environment is at fault (a timeout, a crash, memory,
  a full disk, I/O). The checkpoint is retried after :func:`backoff_seconds`
  (``retry_backoff_seconds``, doubling with each attempt, at most an hour).
- ``"permanent"``: the checkpoint is at fault (it does not match the model, it
  is corrupt, its export fails validation, its version would go backwards).
  It is recorded in ``rejected.json`` and never retried; later checkpoints are
  still exported.
- ``"model"``: the model's code or config is at fault (the builder, the export
  command, ``sample_inputs``, the gate command). Rejecting the checkpoint
  would lose it for good once the user fixes the model, so instead the model
  pauses: nothing is exported for it until the next reload or start, and its
  checkpoints stay pending (:data:`MODEL_FAILURES`).

Whether a failure is retried is decided where it is raised (the
``permanent`` flag of a child's result, or of the supervisor's own
failures); the kind recorded here is what that flag is at every raise site,
or, for the few reasons raised both ways, at most of them (the description
says when). A permanent failure whose reason is of kind ``"model"`` pauses
the model instead of rejecting the checkpoint.

A restore that does not fit (``tf_checkpoint``) blames the builder, not the
checkpoint, until the builder has proven itself: ``builder_mismatch``
(model) while no version made with the model's export key (the builder, its
module's bytes, its settings) has been published, ``restore_mismatch``
(permanent) once one has, since the builder then fits this model's
checkpoints and the odd one out is the checkpoint. A wrong builder so pauses
the model at its first checkpoint instead of rejecting every checkpoint of
the run.

Pure: standard library only, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: A job's phases in the order it passes them (the ``phase`` metric label).
PHASES = ("pin", "export", "validate", "gate", "publish")
#: The kinds of failure; see the module docstring.
KINDS = ("transient", "permanent", "model")

Phase = Literal["pin", "export", "validate", "gate", "publish"]
Kind = Literal["transient", "permanent", "model"]

#: Longest wait between two attempts at a transiently failing checkpoint.
MAX_BACKOFF_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Failure:
    """One failure reason.

    ``phases``: the job phases it is counted in (``job.phase`` when it fails,
    which is the ``phase`` label of the failures metric). ``kind``: what the
    supervisor does about it (module docstring). ``description``: one line
    for people: what it means and what to do. ``counted``: whether it is
    counted in ``ckpt_exporter_export_failures_total``; ``gated_out`` is
    counted in ``ckpt_exporter_gate_decisions_total`` instead.
    """

    reason: str
    phases: tuple[Phase, ...]
    kind: Kind
    description: str
    counted: bool = True

    def __post_init__(self) -> None:
        # A typo here would mislabel a metric or misfile a checkpoint: refuse it at import.
        if not self.phases or not set(self.phases) <= set(PHASES):
            raise ValueError(f"{self.reason}: phases {self.phases} not among {PHASES}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.reason}: kind {self.kind!r} not among {KINDS}")
        if "\n" in self.description or not self.description:
            raise ValueError(f"{self.reason}: the description must be one non-empty line")


_ALL: tuple[Failure, ...] = (
    # --- pin: the supervisor stages the checkpoint and makes the export folder
    Failure(
        "pin_failed",
        ("pin",),
        "transient",
        "the checkpoint's files could not be linked or copied into staging "
        "(permissions, full disk, I/O); retried",
    ),
    Failure(
        "temp_dir_failed",
        ("pin",),
        "transient",
        "the export folder could not be created in the base path (unwritable, full or "
        "missing); counted in phase pin, which it ends; retried",
    ),
    # --- export: the model's code or config (the model pauses until reload)
    Failure(
        "builder_import",
        ("export",),
        "model",
        "the builder's module (or a Keras file's custom_objects) cannot be imported; "
        "fix the code or python_path, then reload",
    ),
    Failure(
        "builder_error",
        ("export",),
        "model",
        "the builder raised, or returned something that is not a model; fix it, then reload",
    ),
    Failure(
        "no_signature",
        ("export",),
        "model",
        "the serving inputs cannot be told (no input signature, a tensor name that does "
        "not exist, an input_type the model does not fit); fix [models.signature] or the "
        "builder, then reload",
    ),
    Failure(
        "command_failed",
        ("export",),
        "model",
        'the export command of source = "command" could not start, exited non-zero or '
        "left no saved_model.pb; fix it, then reload",
    ),
    Failure(
        "builder_mismatch",
        ("export",),
        "model",
        "the builder's model (its restore target) does not match the checkpoint (objects "
        "missing or unbound, shapes that differ, no object checkpoint_key) and no version "
        "made with this builder and settings (export key) has been published: the builder "
        "is taken to be wrong; fix it or checkpoint_key, then reload",
    ),
    Failure(
        "sample_inputs",
        ("export", "validate"),
        "model",
        "sample_inputs or golden_outputs cannot be read or do not fit the signatures "
        "(keys, dtypes, shapes); fix the file, then reload",
    ),
    Failure(
        "warmup_unavailable",
        ("export", "validate"),
        "model",
        "warmup_records needs the tensorflow-serving-api protos, which are not installed; "
        "install them, then reload",
    ),
    Failure(
        "gate_unusable",
        ("validate",),
        "model",
        "the gate command cannot be started (not found, not executable); counted in phase "
        "validate, which it follows; fix [models.gate] command, then reload",
    ),
    # --- export: the checkpoint (rejected) or the environment (retried)
    Failure(
        "checkpoint_corrupt",
        ("export",),
        "permanent",
        "the checkpoint (or Keras file, or TF1 graph) cannot be read: truncated or corrupt",
    ),
    Failure(
        "checkpoint_vanished",
        ("export",),
        "transient",
        "the pinned checkpoint files disappeared during the export (removed by someone "
        "else); retried",
    ),
    Failure(
        "restore_mismatch",
        ("export",),
        "permanent",
        "the checkpoint does not match the builder's model although a version made with the "
        "same builder and settings (export key) was published: this checkpoint is rejected; "
        "a TF1 graph that cannot be restored",
    ),
    Failure(
        "no_variables",
        ("export", "validate"),
        "permanent",
        "the model has no variables, or the export's variables/ cannot be read "
        "(TF Serving would restore no weights)",
    ),
    Failure(
        "load_failed",
        ("export", "validate"),
        "permanent",
        "the SavedModel cannot be loaded (by the saved_model source, or by the validator "
        "as TF Serving's loader would)",
    ),
    Failure(
        "no_serving_default",
        ("export", "validate"),
        "permanent",
        "the SavedModel has no serving_default signature: requests without a signature "
        "name would fail",
    ),
    Failure(
        "bad_request",
        ("export",),
        "permanent",
        "the worker was asked for a source it does not know (a bug: the config check "
        "refuses unknown sources first)",
    ),
    Failure(
        "export_error",
        ("export",),
        "permanent",
        "the export raised an unexpected error; its traceback is in the error",
    ),
    Failure(
        "os_error",
        ("export",),
        "transient",
        "the export hit an operating-system error (permissions, I/O); retried",
    ),
    # --- validate: the export does not serve as it must (rejected)
    Failure(
        "not_a_saved_model",
        ("validate",),
        "permanent",
        "the export folder has no saved_model.pb",
    ),
    Failure(
        "signature_failed",
        ("validate",),
        "permanent",
        "a signature failed to run or breaks TF Serving's Classify/Regress rules; each "
        "signature's verdict is in the validation report",
    ),
    Failure(
        "not_finite",
        ("validate",),
        "permanent",
        "a signature's floating output holds NaN or infinity",
    ),
    Failure(
        "output_mismatch",
        ("validate",),
        "permanent",
        "serving_default's outputs differ from the exporter's in-memory model beyond rtol/atol",
    ),
    Failure(
        "golden_mismatch",
        ("validate",),
        "permanent",
        "the outputs differ from golden_outputs beyond rtol/atol",
    ),
    Failure(
        "weight_mismatch",
        ("validate",),
        "permanent",
        "a saved variable holds no value of the checkpoint (the restore missed it), or "
        "the weights map does not fit the export",
    ),
    Failure(
        "no_reference",
        ("validate",),
        "permanent",
        "a linked export has neither exporter outputs nor a weights map that could be checked",
    ),
    Failure(
        "warmup_failed",
        ("validate",),
        "permanent",
        "the warmup file is not TFRecord, holds over 1000 records, or has a record the "
        "server would fail on; transient (retried) when the file is missing although "
        "warmup_records is set",
    ),
    Failure(
        "signature_changed",
        ("validate",),
        "permanent",
        "the SignatureDefs break clients of the reference version (a signature, input or "
        "output removed or renamed, an input added, a dtype, method or incompatible shape "
        "changed; the diff is in the validation report); set allow_signature_change or run "
        "ckpt-exporter accept-signature MODEL to let it through; transient (retried) when "
        "the accept-signature record cannot be read",
    ),
    Failure(
        "validate_error",
        ("validate",),
        "permanent",
        "the validator raised an unexpected error; its traceback is in the error",
    ),
    # --- any child: the environment (retried)
    Failure(
        "timeout",
        ("export", "validate", "gate"),
        "transient",
        "the phase ran past export_timeout_seconds and its processes were killed; retried",
    ),
    Failure(
        "child_crashed",
        ("export", "validate", "gate"),
        "transient",
        "the child process (or the gate command) died without a result; its output is "
        "in the log; retried",
    ),
    Failure(
        "out_of_memory",
        ("export", "validate"),
        "transient",
        "the child ran out of memory (MemoryError); retried",
    ),
    Failure(
        "resource_exhausted",
        ("export", "validate"),
        "transient",
        "TensorFlow ran out of a resource (ResourceExhaustedError, usually device memory); retried",
    ),
    Failure(
        "no_space",
        ("export", "validate"),
        "transient",
        "no space left (or quota exceeded) on the base path's device; the failed folder "
        "is not kept; free some space, it is retried",
    ),
    Failure(
        "unknown",
        ("export", "validate"),
        "transient",
        "a child reported a failure without a reason (a bug); retried unless it said permanent",
    ),
    # --- gate
    Failure(
        "gated_out",
        ("gate",),
        "permanent",
        "the publication gate blocked the checkpoint (metric not better, metric missing "
        "within wait_seconds, or gate command non-zero); never retried",
        counted=False,
    ),
    # --- publish
    Failure(
        "publish_failed",
        ("publish",),
        "transient",
        "the version could not be written into the base path (I/O, full disk, an "
        "unreadable rollback record); retried",
    ),
    Failure(
        "version_refused",
        ("publish",),
        "permanent",
        "no valid version number for the checkpoint (step policy: no step, or not above "
        "the newest version; or the int64 limit reached)",
    ),
    # --- object stores (fetching a checkpoint, publishing a version)
    Failure(
        "object_store_unusable",
        ("pin", "publish"),
        "model",
        "the bucket is missing, or the credentials are missing, wrong or not allowed the "
        "operation on it (the error names the bucket, object and operation); the model "
        "pauses until a reload",
    ),
)

#: Every failure reason the daemon can produce, by reason.
FAILURES: dict[str, Failure] = {f.reason: f for f in _ALL}
if len(FAILURES) != len(_ALL):  # a reason listed twice: the second would silently win
    raise ValueError("a failure reason is listed twice")

#: Reasons that pause the model instead of rejecting the checkpoint.
MODEL_FAILURES: frozenset[str] = frozenset(r for r, f in FAILURES.items() if f.kind == "model")


def known_failures_by_phase() -> dict[str, tuple[str, ...]]:
    """Each phase's counted reasons, in :data:`PHASES` and registry order.

    For pre-initialising the failures metric, so that ``increase()`` over a
    (phase, reason) series starts from 0 rather than from a missing series.
    Reasons not counted there (``gated_out``) are left out.
    """
    return {
        phase: tuple(r for r, f in FAILURES.items() if f.counted and phase in f.phases)
        for phase in PHASES
    }


def backoff_seconds(attempt: int, first: float, longest: float = MAX_BACKOFF_SECONDS) -> float:
    """The wait before retrying after failed attempt number ``attempt`` (1, 2, ...).

    ``first`` (``retry_backoff_seconds``) after the first failure, doubling
    with each further one, never more than ``longest``:
    ``min(first * 2 ** (attempt - 1), longest)``.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, not {attempt}")
    try:
        # float(): mypy types int ** int as Any (a negative exponent gives a float).
        return float(min(first * 2 ** (attempt - 1), longest))
    except OverflowError:
        # 2 ** 1024 and above do not fit a float: far past the cap anyway.
        return longest
