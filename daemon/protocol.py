"""How the supervisor and its children talk: module names, argv, request and result files.

The supervisor writes a JSON request file and starts a child (cold:
``python -m MODULE REQUEST.json``; warm: forked by the zygote and handed the
request path on stdin). The child writes a JSON result file (its path is in
the request) atomically, then exits with a code from :mod:`daemon.exitcodes`.
A child that dies without a result (killed, segfault, out of memory) is a
transient failure by definition.

This module is the only place the children's module names are spelled, so
the supervisor can start them without importing them. Standard library only.

The request and result files are described field by field by the
``TypedDict`` classes below: what is written today, key for key (the
published metadata carries the export result and part of the validation
report, so no key may be renamed). A key that is not always there is
``NotRequired`` (or in a ``total=False`` class): in a request, one that a
writer leaves out (the supervisor writes all but ``exporter_key``, which it
writes where workers are reused; ``ckpt-exporter validate`` writes few) or
that the child adds itself (``warm``, ``reused``); in a result, one that
only some exports or outcomes have. (:class:`CheckEntry` and
:class:`SignatureReport` are built step by step: their ``ok``, typed as
optional, is in every result file all the same.)

Requests: :class:`ExportRequest` and :class:`ValidateRequest`, both a
:class:`ChildRequest`. Results: :data:`ExportOutcome` (the worker's) and
:data:`ValidationOutcome` (the validator's), each a success report or a
:class:`FailureResult`; ``ok`` tells which.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, NotRequired, Required, TypeAlias, TypedDict

#: The export worker: one checkpoint in, one SavedModel out.
WORKER = "daemon.children.worker"
#: Run in a model's ``worker_python``: reports its TensorFlow and builder module.
INTERPRETER = "daemon.children.interpreter"
#: The validator: loads an export the way TF Serving does and proves it.
VALIDATOR = "daemon.children.validator"
#: The process that imports TensorFlow once and forks workers and validators.
ZYGOTE = "daemon.children.zygote"
#: The package of the per-format exporters (``SourceKind.exporter`` names one).
EXPORTERS_PACKAGE = "daemon.children.exporters"
#: The children a zygote may fork, with the name each gives itself (``ps``, ``top``).
CHILD_NAMES = {WORKER: "ckpt-worker", VALIDATOR: "ckpt-validate"}
#: Written on a reusable exporter's done pipe after each request it finished.
DONE = b"done\n"


# --- requests: written by the supervisor (and `ckpt-exporter validate`) -------------------


class Limits(TypedDict):
    """CPU, I/O and thread limits a child applies before it imports TensorFlow."""

    #: Added to the child's niceness (and its autogroup's: see runtime.set_autogroup_nice).
    nice: int
    #: I/O scheduling class: "idle", "best-effort", or "default" (left alone).
    io_class: str
    #: Cap on TensorFlow's intra-/inter-op and OpenMP threads; 0: no cap.
    threads: int


class WarmSettings(TypedDict):
    """``SETTINGS`` (JSON) in a warm child's argv ``MODULE --warm SETTINGS [--done-fd N]``.

    The zygote is started with the same settings less ``max_exports``, and
    applies them before it imports TensorFlow; its forked children inherit them.
    """

    #: The process the child must die with (the zygote sets itself for its children).
    parent_pid: int
    limits: Limits
    #: Whether the child may see the GPUs; always False for the validator.
    allow_gpu: bool
    #: Requests a reusable exporter may serve before it exits (1: single-use);
    #: not in the zygote's own settings.
    max_exports: NotRequired[int]


class ForkRequest(TypedDict):
    """One datagram from the supervisor to the zygote: fork this child."""

    #: :data:`WORKER` or :data:`VALIDATOR`.
    module: str
    #: The child's :class:`WarmSettings`, as JSON.
    settings: str
    #: Whether a done pipe comes with it (a reusable exporter), after its stdin.
    done: bool


class ChildRequest(TypedDict):
    """What every request file carries, whichever child reads it."""

    #: Where the child writes its result (atomically).
    result: str
    #: The supervisor's PID: a cold child dies with it (PR_SET_PDEATHSIG).
    #: Absent in a request of `ckpt-exporter validate`, as are ``limits`` and ``log``.
    parent_pid: NotRequired[int]
    #: Applied by a cold child; a warm one inherited them from the zygote.
    limits: NotRequired[Limits]
    #: Where a warm child sends its stdout and stderr (a cold one's are redirected for it).
    log: NotRequired[str]
    #: Set by the child itself when it read the request as a warm child.
    warm: NotRequired[bool]


class SignatureInput(TypedDict):
    """One input of a model's ``[models.signature]`` table."""

    name: str
    dtype: str
    #: Sizes; -1 or None: any size.
    shape: list[int | None]


class ImagePreprocessingSpec(TypedDict):
    """``(float(pixels) * scale - mean) / std`` per channel, or ``function`` ("module:function")."""

    scale: float
    mean: list[float]
    std: list[float]
    function: str


class ExportRequest(ChildRequest):
    """The worker's request: export one pinned checkpoint into ``export_dir``."""

    #: The checkpoint format (a :data:`daemon.sources.SOURCES` key): which exporter runs.
    source: str
    #: The source's own settings from the model's config (see its scanner in daemon.sources).
    options: dict[str, Any]
    #: ``module:function`` that returns the model; "" for sources without one.
    builder: str
    #: Folders put in front of ``sys.path`` before ``builder`` is imported.
    python_path: list[str]
    #: The name the trainer gave the model in ``tf.train.Checkpoint(NAME=model)``.
    checkpoint_key: str
    #: The pinned copy: a checkpoint prefix, a Keras file, or a SavedModel folder.
    checkpoint: str
    #: The (existing, empty) folder the SavedModel is written into.
    export_dir: str
    #: The ``.npz`` of reference inputs (``in/KEY``) and outputs (``out/KEY``)
    #: the exporter writes for the validator.
    reference: str
    #: Whether the worker may see the GPUs (the trainer usually owns them).
    allow_gpu: bool
    #: The model's ``[models.signature]`` inputs; []: the model's own are used.
    signature: list[SignatureInput]
    #: "default", "image_tensor", "encoded_image" or "tf_example" (daemon.children.serving_inputs).
    input_type: str
    #: The model's name (written into the warmup records).
    model: str
    #: The model's ``sample_inputs`` file, or None.
    sample_inputs: str | None
    #: How many warmup records to write into the export (0: none).
    warmup_records: int
    #: A published version whose graph this export may reuse (daemon.children.incremental),
    #: or None: a full export.
    template: str | None
    #: Height and width of a synthesised image input whose size is unknown
    #: (daemon.children.samples.image_shape); absent: 224.
    synthetic_image_size: NotRequired[int]
    #: What an ``image_tensor`` / ``encoded_image`` input's pixels become
    #: (daemon.config.images); absent or None: another input type.
    image_preprocessing: NotRequired[ImagePreprocessingSpec | None]
    #: The key under which a reusable worker keeps its model for the next request;
    #: only where workers are reused.
    exporter_key: NotRequired[str]
    #: Set by a reusable worker itself: requests it served before this one.
    reused: NotRequired[int]


class ValidateRequest(ChildRequest):
    """The validator's request: prove the SavedModel at ``saved_model``.

    The supervisor writes every field; ``ckpt-exporter validate`` writes
    ``saved_model`` and ``result``, and ``checkpoint``, ``sample_inputs`` and
    ``golden_outputs`` when given: the validator has a default for the rest.
    """

    saved_model: str
    #: The exporter's reference ``.npz`` (see :class:`ExportRequest`); absent: none.
    reference: NotRequired[str]
    #: Tolerances for comparing outputs (default 1e-4 and 1e-5).
    rtol: NotRequired[float]
    atol: NotRequired[float]
    sample_inputs: NotRequired[str | None]
    golden_outputs: NotRequired[str | None]
    #: Nonzero: the export must have a warmup file (one it has is replayed either way).
    warmup_records: NotRequired[int]
    #: The published version an incremental export took its graph from, or None.
    graph_of: NotRequired[str | None]
    #: The pinned checkpoint, for weight parity; None where the source's weights
    #: are not a TensorFlow checkpoint.
    checkpoint: NotRequired[str | None]
    #: "all" (default): every saved variable must come from ``checkpoint``;
    #: "partial": at least one must, the others are counted and named; "off":
    #: not checked (the check is recorded as skipped).
    weight_parity: NotRequired[Literal["all", "partial", "off"]]
    #: As :class:`ExportRequest`'s, for the inputs the validator synthesises.
    synthetic_image_size: NotRequired[int]
    #: Started with the export (warm, early): preload ``graph_of``, then wait for
    #: ``go`` on stdin before validating (EOF: exit without a result).
    wait_for_export: NotRequired[bool]


# --- results: written by the children ----------------------------------------------------

#: A tensor's ``[dtype name, shape]`` (a JSON array; in a shape, None: any size).
DtypeAndShape: TypeAlias = list[str | list[int | None]]

#: What an export was made from or with: the Keras or ``tf.Module`` model the
#: builder returned, a serving module with its own signatures, a SavedModel as
#: it was, a command's SavedModel, a TF1 graph, or a template's graph over
#: linked checkpoint tensors.
ExportKind: TypeAlias = Literal[
    "keras", "tf.Module", "serving_module", "saved_model", "command", "tf1_checkpoint", "linked"
]


class ExportDurations(TypedDict, total=False):
    """Seconds of an export's steps; which ones depends on the exporter."""

    #: Importing and calling the builder (keras_file, tf_checkpoint).
    import_seconds: float
    #: Restoring the checkpoint (keras_file, tf1_checkpoint, tf_checkpoint).
    restore_seconds: float
    #: Writing the SavedModel and recording the reference (keras_file, tf1_checkpoint,
    #: tf_checkpoint).
    save_seconds: float
    #: A linked export, all of it.
    link_seconds: float
    #: Copying the SavedModel (saved_model).
    copy_seconds: float
    #: Running the user's command (command).
    command_seconds: float
    #: Recording the reference with TF2's loader (saved_model, command).
    reference_seconds: float


class Incremental(TypedDict, total=False):
    """How an export reused a published version (daemon.children.incremental), or why not.

    ``{}``: a full export that was not offered a template.
    """

    #: The version whose graph was reused; absent: a full export.
    template: str
    #: How many variables were written into that graph, or linked.
    variables: int
    #: Why that graph did not fit the model (then a full export).
    fallback: str
    #: Why linking the checkpoint's tensors did not apply (then TensorFlow restored them).
    link_fallback: str
    #: A linked export: the checkpoint's data shards hard-linked, or the tensors copied.
    weights: Literal["linked", "copied"]


class WarmupWritten(TypedDict):
    """The warmup records an export got (``warmup_records`` > 0)."""

    #: Records written; None when the SavedModel brought its own warmup file.
    records: int | None
    #: The warmup file kept as it was (with ``records`` None).
    kept: NotRequired[str]


class ExportOptional(TypedDict, total=False):
    """The fields of an export result that only some exports have, or the worker adds."""

    #: ``serving_default``'s inputs; absent for a linked export (no model was run).
    inputs: dict[str, DtypeAndShape]
    #: ``serving_default``'s output names; absent for a linked export.
    outputs: list[str]
    #: keras_file and tf_checkpoint exports (linked ones too).
    incremental: Incremental
    #: tf_checkpoint exports TensorFlow restored (not linked): "written", or
    #: "not written: WHY" (then no later export can link to this one).
    weights_map: str
    #: tf_checkpoint: the model was kept from this worker's previous export.
    model_reused: bool
    #: keras_file exports, and tf_checkpoint exports TensorFlow restored: the
    #: same value as ``durations.save_seconds`` (the result is built with both).
    save_seconds: float
    #: Added by the worker with ``warmup_records``.
    warmup: WarmupWritten
    #: Added by the worker: it was forked by the zygote (not started cold).
    warm: bool
    #: Added by the worker: exports this process served before this one (0: fresh).
    reused: int
    #: Added by the worker with an ``exporter_key``: ``path -> [st_mtime_ns, st_size]``
    #: of the files the builder imported (a change retires the worker).
    code_files: dict[str, list[int]]


class ExporterResult(ExportOptional):
    """What an exporter's ``export(request)`` returns (daemon.children.exporters)."""

    kind: ExportKind
    #: Variables of the export; None when TF2's loader does not list them.
    variables: int | None
    #: Step counters saved in the checkpoint (``step``, ``global_step``, ``save_counter``).
    saved_counters: dict[str, int]
    durations: ExportDurations


class ExportResult(ExporterResult):
    """The worker's result file after an export that succeeded.

    Published as the version's metadata ``export``, less ``ok`` and ``code_files``.
    """

    ok: Literal[True]


class FailureResult(TypedDict):
    """A child's result when it failed without a report of its own.

    Any failure of the worker; the validator's outside its checks (out of
    memory, an unexpected exception). Made by daemon.children.runtime.failure.
    """

    ok: Literal[False]
    #: A short reason, the metrics' label (``restore_mismatch``, ``no_space``, ...).
    reason: str
    #: What happened, for the log.
    error: str
    #: True: this checkpoint will never export (retrying cannot help).
    permanent: bool
    #: Added by the child, as in its success results.
    warm: NotRequired[bool]
    #: Added by the worker, as in :class:`ExportOptional`.
    reused: NotRequired[int]
    code_files: NotRequired[dict[str, list[int]]]


class CheckDetails(TypedDict, total=False):
    """A validation check's entry but its name: what it records, which fields by check."""

    #: Set when the check ends, as is ``seconds``: in every result file.
    ok: bool
    #: On failure: the failure's reason.
    reason: str
    seconds: float

    #: serving_load: the MetaGraph tags loaded.
    tags: list[str]
    #: serving_load: "full" (every op placed, as the server does) or "pruned"
    #: (the graph is byte-identical to ``graph_of``'s, placed when that was validated).
    placement: Literal["full", "pruned"]
    #: serving_load: the graph was imported ahead, while the export ran.
    preloaded: bool
    #: serving_load reused the session of a byte-identical graph this
    #: validator passed before: only the restore op ran (daemon.children.validator).
    kept: bool
    #: signatures: how many were run.
    count: int
    #: signatures: the names of those that failed.
    failed: list[str]
    #: golden_outputs: the golden ``.npz``; warmup: the warmup file (relative path).
    file: str | None
    #: golden_outputs: the largest absolute difference, by signature.
    compared: dict[str, float]
    #: warmup: as :class:`WarmupReplay`.
    records: int
    replayed: dict[str, int]
    #: weight_parity: the checkpoint compared with.
    checkpoint: str
    #: weight_parity: why it was not run (``weight_parity = "off"``).
    skipped: str


class CheckEntry(CheckDetails, total=False):
    """One entry of a validation report's ``checks``, in the order they ran."""

    #: serving_load, signatures, golden_outputs, warmup or weight_parity.
    check: Required[str]


class DeclaredTensor(TypedDict):
    """An input or output as its SignatureDef declares it (not as it was fed)."""

    #: The dtype's name (``float32``); ``ENCODING:NAME`` for a tensor not
    #: encoded by name (``coo_sparse:int64``, ``composite_tensor:unknown``).
    dtype: str
    #: Sizes, None where unknown; None for an unknown rank.
    shape: list[int | None] | None


class DeclaredSignature(TypedDict):
    """A SignatureDef's inputs and outputs as declared, by key (daemon.rules.signatures)."""

    inputs: dict[str, DeclaredTensor]
    outputs: dict[str, DeclaredTensor]


class SignatureReport(TypedDict, total=False):
    """One signature's entry in a validation report's ``signatures``."""

    #: The SignatureDef's method name (``tensorflow/serving/predict``, ...).
    method: Required[str]
    #: Its inputs and outputs as declared: what the signature contract compares
    #: with the next version's. In every entry since the contract exists.
    declared: DeclaredSignature
    #: Set on every way out: in every result file.
    ok: bool
    #: On failure: ``signature_rules``, ``run_failed``, ``not_finite`` or ``output_mismatch``.
    reason: str
    error: str
    #: The inputs fed (absent when the signature broke TF Serving's rules first).
    inputs: dict[str, DtypeAndShape]
    inputs_from: Literal["reference", "sample_inputs", "synthesised"]
    #: Each output's shape.
    outputs: dict[str, list[int]]
    #: ``serving_default`` with reference outputs: the largest absolute difference.
    max_abs_diff: float


class WeightParity(TypedDict):
    """A validation report's ``weights``: every variable came from the checkpoint."""

    ok: Literal[True]
    #: Variables checked (all of the SavedModel's).
    variables: int
    checkpoint: str
    #: "key": each against the tensor the export's weights map names;
    #: "value": each against any tensor of the checkpoint, by dtype, shape and bytes.
    matched_by: Literal["key", "value"]
    #: Variables proven to come from the checkpoint: all of them, except with
    #: ``weight_parity = "partial"`` (absent in reports older than that mode).
    matched: NotRequired[int]
    #: ``weight_parity = "partial"``: the first unmatched variables, by name.
    unmatched: NotRequired[list[str]]


class WarmupReplay(TypedDict):
    """A validation report's ``warmup``: the export's warmup records, replayed."""

    records: int
    #: Records by kind (``predict_log``, ...; ``KIND_not_replayed``: run by the
    #: server, not by the validator).
    replayed: dict[str, int]


class SignatureContract(TypedDict, total=False):
    """A validation report's ``signature_contract``: the SignatureDefs against a reference.

    Added by the supervisor (daemon.supervisor.pipeline) to a passed report
    before the gate and the publication; rules in daemon.rules.signatures.
    """

    #: The version compared with; None: there was none.
    reference: Required[int | None]
    #: Why nothing was compared (no reference, or one that records no declared signatures).
    skipped: str
    #: Every change, one readable line each (``serving_default: input 'x' dtype ...``).
    changes: list[str]
    #: The changes that break clients of the reference.
    breaking: list[str]
    #: What let breaking changes through: ``allow_signature_change`` (the
    #: model's config) or ``accept-signature`` (the one-shot record).
    allowed_by: Literal["allow_signature_change", "accept-signature"]
    #: An ``accept-signature`` record was there when this export was checked:
    #: publishing it consumes the record.
    acceptance: bool


class ValidationResult(TypedDict):
    """The validator's result file when validation ran: the validation report.

    Written to the export folder (less ``warm`` and ``saved_model``), and
    summarised in the published metadata. ``ok`` False: ``reason``,
    ``error`` and ``permanent`` say what failed, and the checks up to it stay.
    """

    ok: bool
    saved_model: str
    signatures: dict[str, SignatureReport]
    checks: list[CheckEntry]
    #: ``CHECK_seconds`` of each check that ran.
    durations: dict[str, float]
    #: Why there are no reference outputs to compare with (a linked export).
    reference: NotRequired[str]
    #: With a ``checkpoint`` in the request, once weight parity passed.
    weights: NotRequired[WeightParity]
    #: With a warmup file (or ``warmup_records``), once replayed; None when the
    #: file went away meanwhile.
    warmup: NotRequired[WarmupReplay | None]
    #: On failure, as in :class:`FailureResult`.
    reason: NotRequired[str]
    error: NotRequired[str]
    permanent: NotRequired[bool]
    #: Added by the validator: it was forked by the zygote (not started cold).
    warm: NotRequired[bool]
    #: Added by the supervisor to a passed report: the signature contract's verdict.
    signature_contract: NotRequired[SignatureContract]


class InterpreterReport(TypedDict):
    """What ``daemon.children.interpreter`` prints about a model's ``worker_python``."""

    #: ``[major, minor, micro]``.
    python: list[int]
    executable: str
    #: ``tf.__version__`` as imported, or None with ``tensorflow_error`` saying why.
    tensorflow: str | None
    tensorflow_error: str | None
    #: Installed distributions an export depends on (name -> version).
    libraries: dict[str, str]
    #: Where the builder's module would be imported from there, or why not.
    builder_file: str | None
    builder_problem: str | None


#: The worker's result file: ``ok`` tells which.
ExportOutcome: TypeAlias = ExportResult | FailureResult
#: The validator's result file: a report (``ok`` either way), or a failure
#: outside the checks (out of memory, an unexpected exception).
ValidationOutcome: TypeAlias = ValidationResult | FailureResult


#: How a child starts under another interpreter (a model's ``worker_python``):
#: that interpreter has its own packages (the trainer's TensorFlow, its
#: training code) but not this one's, and adding this environment's
#: site-packages to its path would put this TensorFlow before its own. So the
#: ``daemon`` package alone is registered from its folder (argv 1 and 2),
#: then the child module runs as ``python -m`` would run it (argv 3 on).
_BOOTSTRAP = (
    "import importlib.util, runpy, sys\n"
    "spec = importlib.util.spec_from_file_location(\n"
    "    'daemon', sys.argv[1], submodule_search_locations=[sys.argv[2]])\n"
    "package = importlib.util.module_from_spec(spec)\n"
    "sys.modules['daemon'] = package\n"
    "spec.loader.exec_module(package)\n"
    "module, sys.argv = sys.argv[3], sys.argv[3:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def child_command(module: str, request: Path, python: str | None = None) -> list[str]:
    """The argv that runs a child module cold: ``python -m MODULE REQUEST``.

    With ``python`` (another interpreter), this ``daemon`` package is loaded
    into it by :data:`_BOOTSTRAP`; the child code imports only the standard
    library, TensorFlow, Keras and NumPy besides ``daemon`` itself.
    """
    return module_command(module, [str(request)], python)


def module_command(module: str, args: list[str], python: str | None = None) -> list[str]:
    """``python -m MODULE ARGS...``, with this interpreter or (bootstrapped) with ``python``."""
    if python is None:
        return [sys.executable, "-m", module, *args]
    package = Path(__file__).resolve().parent
    init = str(package / "__init__.py")
    return [python, "-c", _BOOTSTRAP, init, str(package), module, *args]


def read_result(path: Path) -> dict[str, Any] | None:
    """The child's result, or None if it died before writing one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
