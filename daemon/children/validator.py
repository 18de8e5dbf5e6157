"""The validator: load a SavedModel the way TF Serving does and prove what it will serve.

Runs as ``python -m daemon.children.validator REQUEST.json`` in a fresh process that never
imported the user's builder, so an export that only works because user code
was in memory is caught. Checks, in order, each recorded in the report:

- ``serving_load``: load the MetaGraph tagged ``serve`` into a graph-mode
  session, which runs the restore op and then the init ops, as the model
  server's C++ loader does (a TF2 ``tf.saved_model.load`` accepts exports the
  server rejects); require a ``serving_default`` signature. Every op of the
  graph is placed, as the server does, except for an incremental export whose
  graph is byte-identical to the version it came from (``graph_of``): that
  graph was placed in full when that version was validated;
- ``signatures``: run every SignatureDef through its tensor names with inputs
  of its own dtypes and shapes (see :class:`_Inputs`); classify and regress
  signatures must also follow the key, dtype and shape rules of TF Serving's
  Classify and Regress APIs; every floating output must be finite, and
  ``serving_default``'s must equal the exporter's within ``rtol``/``atol``;
- ``golden_outputs``: with a golden ``.npz``, outputs equal it within tolerance;
- ``warmup``: replay ``assets.extra/tf_serving_warmup_requests`` record by record
  as the server does at load (:mod:`daemon.children.warmup_records`);
- ``weight_parity``: given the source ``checkpoint`` (the pinned copy), every
  variable saved in the SavedModel holds exactly the value of a tensor in that
  checkpoint (:func:`weight_parity`); with a weights map
  (``assets.extra/ckpt_exporter_weights.json``, :mod:`daemon.children.incremental`),
  exactly the value of the one tensor the map names for it. Output parity
  alone cannot see a restore that matched nothing: the exporter's reference
  comes from the same model. A linked export has no reference outputs; its
  map must then be checked, or validation fails (``no_reference``). The
  request's ``weight_parity`` (a ``command`` source's option) may ask for
  less: ``"partial"`` passes when at least one variable matched and counts
  and names the others, ``"off"`` records the check as skipped.

The result is the validation report: ``ok``, the checks run with their
timings, each signature's declared inputs and outputs (dtypes, shapes: what the
supervisor's signature contract compares), the inputs fed (and where they
came from) and the outputs' shapes, and on failure ``reason``, ``error`` and ``permanent``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, Unpack, cast

from daemon import exitcodes
from daemon.basepath.layout import WARMUP_RELPATH, WEIGHTS_MAP_RELPATH
from daemon.children import incremental, reference, runtime, samples, warmup_records
from daemon.formats import bundle
from daemon.protocol import (
    CheckDetails,
    CheckEntry,
    DeclaredSignature,
    DeclaredTensor,
    SignatureReport,
    ValidateRequest,
    ValidationOutcome,
    ValidationResult,
    WeightParity,
)

#: Entries of a TF2 checkpoint that are bookkeeping, not variables.
_NOT_VARIABLES = ("_CHECKPOINTABLE_OBJECT_GRAPH",)


def _digest(value: Any) -> str:
    """A digest of a tensor's dtype, shape and exact bytes (strings element by element)."""
    import numpy as np

    arr = np.asarray(value)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    if arr.dtype == object:
        for item in arr.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            h.update(len(data).to_bytes(8, "little") + data)
    else:
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _signatures(reader: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each checkpoint entry's dtype and shape, read from the index without the data."""
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    return {k: (dtypes[k].name, tuple(shapes[k])) for k in shapes if k not in _NOT_VARIABLES}


def weight_parity(
    saved_model: str, checkpoint: str, mode: Literal["all", "partial"] = "all"
) -> WeightParity:
    """Check that every variable of ``saved_model`` came from ``checkpoint``.

    Matching is by exact value (dtype, shape and bytes), not by name: the
    SavedModel names variables by its own object graph (``variables/0``...)
    and a trainer's checkpoint by another (``model/...``, or
    ``optimizer/_trainable_variables/0`` when Keras tracks them there). A
    variable left at its initializer, one the restore did not reach, or one
    altered on the way matches no tensor of the checkpoint and fails with its
    name. Memory stays at about two tensors at a time.

    The stored bytes of both checkpoints are compared directly, found through
    their indexes (:mod:`daemon.formats.bundle`); the CRC32C each index keeps of each
    tensor only says which tensor to compare with first. A variable whose
    candidate differs, or that has none, is looked up by digest among every
    tensor of its dtype and shape before it is called unmatched, so the
    checksum never decides a verdict. An index this reader does not
    understand (or a partitioned variable) falls back to TensorFlow's reader.

    ``mode = "partial"`` is for exports that legitimately hold variables of
    their own (an external exporter's preprocessing constants): it fails
    only when no variable matched (the restore reached nothing), and
    otherwise reports how many matched and names the first unmatched.
    """
    prefix = os.path.join(saved_model, "variables", "variables")
    try:
        record = incremental.read_weights_map(saved_model)
    except ValueError as e:
        raise runtime.ChildFailure("weight_mismatch", str(e)) from e
    try:
        saved = bundle.read_index(prefix)
        source = bundle.read_index(checkpoint)
        fast = not any(e.sliced for b in (saved, source) for e in b.entries.values())
    except (OSError, bundle.BundleFormatError):
        fast = False
    if fast and record is not None:
        names, unmatched = _unmatched_by_map(record, saved, source, saved_model)
    elif fast:
        names, unmatched = _unmatched_by_bytes(saved, source)
    else:
        names, unmatched = _unmatched_by_reader(saved_model, prefix, checkpoint)
    matched = len(names) - len(unmatched)
    if unmatched and (mode == "all" or matched == 0):
        shown = ", ".join(unmatched[:5]) + (
            f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        )
        raise runtime.ChildFailure(
            "weight_mismatch",
            f"{len(unmatched)} of {len(names)} variables in {saved_model} hold a value found "
            f"nowhere in checkpoint {checkpoint}: {shown}. The restore missed them (left at "
            "their initializer) or they were changed after it",
        )
    by: Literal["key", "value"] = "key" if fast and record is not None else "value"
    result: WeightParity = {
        "ok": True,
        "variables": len(names),
        "checkpoint": checkpoint,
        "matched_by": by,
        "matched": matched,
    }
    if unmatched:
        result["unmatched"] = unmatched[:5]
    return result


def _unmatched_by_map(
    record: dict[str, Any], saved: bundle.Bundle, source: bundle.Bundle, saved_model: str
) -> tuple[list[str], list[str]]:
    """``(variables, unmatched)``: each variable against the one tensor its weights map names.

    Stronger than matching by value (two layers of one shape cannot trade
    places), and it is what proves a linked export, which has no in-memory
    outputs to be compared with. The map must cover every variable and have
    been made for a checkpoint with this one's object graph.
    """
    names = sorted(k for k in saved.entries if k not in _NOT_VARIABLES)
    mapping: dict[str, str] = record["variables"]
    where = f"{saved_model}/{WEIGHTS_MAP_RELPATH}"
    if set(mapping) != set(names):
        missing = sorted(set(names) ^ set(mapping))[:3]
        raise runtime.ChildFailure(
            "weight_mismatch", f"{where} does not list exactly the saved variables ({missing})"
        )
    if record.get("object_graph") != incremental.object_graph_digest(source):
        raise runtime.ChildFailure(
            "weight_mismatch",
            f"{where} was made for a checkpoint whose object graph differs from this one's",
        )
    unmatched = []
    for key in names:
        e, ckpt_key = saved.entries[key], mapping[key]
        want = source.entries.get(ckpt_key)
        if want is None or (want.dtype, want.shape) != (e.dtype, e.shape):
            unmatched.append(f"{key} (its tensor {ckpt_key} is missing or of another shape)")
        elif saved.read(key) != source.read(ckpt_key):
            unmatched.append(f"{key} (differs from {ckpt_key})")
    return names, unmatched


def _unmatched_by_bytes(saved: bundle.Bundle, source: bundle.Bundle) -> tuple[list[str], list[str]]:
    """``(variables, unmatched)`` of :func:`weight_parity`, comparing stored bytes."""
    by_crc: dict[tuple[int, tuple[int, ...], int], list[str]] = {}
    by_sig: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for key, e in source.entries.items():
        if key not in _NOT_VARIABLES:
            by_crc.setdefault((e.dtype, e.shape, e.crc32c), []).append(key)
            by_sig.setdefault((e.dtype, e.shape), []).append(key)
    names = sorted(k for k in saved.entries if k not in _NOT_VARIABLES)
    digests: set[tuple[int, tuple[int, ...], str]] | None = None
    unmatched = []
    for key in names:
        e = saved.entries[key]
        data = saved.read(key)
        if any(source.read(c) == data for c in by_crc.get((e.dtype, e.shape, e.crc32c), ())):
            continue
        if digests is None:  # only on the way to a failure: digest every candidate once
            wanted = {(s.dtype, s.shape) for s in saved.entries.values()}
            digests = {
                (*sig, hashlib.sha256(source.read(c)).hexdigest())
                for sig, keys in by_sig.items()
                if sig in wanted
                for c in keys
            }
        if (e.dtype, e.shape, hashlib.sha256(data).hexdigest()) not in digests:
            unmatched.append(key)
    return names, unmatched


def _unmatched_by_reader(
    saved_model: str, prefix: str, checkpoint: str
) -> tuple[list[str], list[str]]:
    """``(variables, unmatched)`` of :func:`weight_parity`, through TensorFlow's reader."""
    import tensorflow as tf

    try:
        saved = tf.train.load_checkpoint(prefix)
    except Exception as e:
        raise runtime.ChildFailure(
            "no_variables",
            f"{saved_model} has no readable variables/ checkpoint ({e}); TF Serving would "
            "load it with no weights restored",
        ) from e
    source = tf.train.load_checkpoint(checkpoint)
    saved_sigs = _signatures(saved)
    names = sorted(saved_sigs)
    # Only a source tensor of a (dtype, shape) some saved variable has can match
    # one: optimizer slots of other shapes and step counters are not read.
    wanted = set(saved_sigs.values())
    known = {
        _digest(source.get_tensor(k)) for k, sig in _signatures(source).items() if sig in wanted
    }
    return names, [k for k in names if _digest(saved.get_tensor(k)) not in known]


class _Checks:
    """The report's ``checks`` list: one entry per check, timed, with its verdict."""

    def __init__(self, report: ValidationResult) -> None:
        self.items: list[CheckEntry] = report.setdefault("checks", [])

    @contextlib.contextmanager
    def run(self, name: str, **details: Unpack[CheckDetails]) -> Iterator[CheckEntry]:
        entry: CheckEntry = {"check": name, **details}
        self.items.append(entry)
        t0 = time.monotonic()
        try:
            yield entry
        except runtime.ChildFailure as e:
            entry.update({"ok": False, "reason": e.reason})
            raise
        finally:
            entry["seconds"] = round(time.monotonic() - t0, 3)
        entry.setdefault("ok", True)


@dataclass
class _Session:
    """A graph-mode session, and the Saver of the graph imported into it ahead of time."""

    graph: Any
    sess: Any
    saver: Any = None  # set by preload(): the graph of ``graph_of`` is in already


def _open(placement: Literal["full", "pruned"]) -> _Session:
    import tensorflow as tf

    graph = tf.Graph()
    config = tf.compat.v1.ConfigProto()
    # The session places every op of the graph at its first run, as TF
    # Serving's does, unless this exact graph already passed that: then only
    # what is run is placed (seconds less for a large model, same results).
    config.graph_options.place_pruned_graph = placement == "pruned"
    return _Session(graph, tf.compat.v1.Session(graph=graph, config=config))


def preload(graph_of: str) -> _Session | None:
    """Import ``graph_of``'s serving graph now, while the export is still being written.

    For an incremental export, whose ``saved_model.pb`` will be a copy of that
    published version's: the validator is started with the exporter and does
    this part of the load in the meantime. :func:`validate` uses it only if
    the export's graph turns out byte-identical (else it loads from scratch),
    so nothing is taken on trust. None if anything fails here.
    """
    from tensorflow.python.saved_model import loader_impl

    s = _open("pruned")
    try:
        s.saver, _ = loader_impl.SavedModelLoader(graph_of).load_graph(s.graph, ["serve"])
    except Exception:
        s.saver = None
    if s.saver is None:  # failed, or a graph without variables: nothing to gain
        s.sess.close()
        return None
    return s


@dataclass
class _Kept:
    """A reusable validator's session of the last graph it passed, for the next request.

    Kept only where nothing but the variables can differ between two loads of
    that graph (:func:`_keepable`); reused only for an export whose
    ``saved_model.pb`` has exactly the bytes of :attr:`graph`. Then
    :func:`_load` runs only the restore op, which assigns *every* variable of
    the graph from the new ``variables/`` (or fails), so nothing of the
    previous version remains: what the server would load from scratch is
    what the kept session holds.
    """

    session: _Session
    graph: bytes
    meta: Any


_kept: _Kept | None = None


def _graph_bytes(path: str) -> bytes | None:
    try:
        return Path(path, "saved_model.pb").read_bytes()
    except OSError:
        return None


def _take_kept(graph: bytes | None) -> _Kept | None:
    """The kept session, if ``graph`` (an export's ``saved_model.pb``) is byte for byte
    the one it holds; else None.

    A kept session that does not fit is closed: one graph in memory at a time.
    """
    global _kept
    kept, _kept = _kept, None
    if kept is None:
        return None
    if graph == kept.graph:
        return kept
    kept.session.sess.close()
    return None


def _keepable(s: _Session, meta: Any) -> bool:
    """Whether loading this graph again would do nothing but run its restore op.

    True when it has no asset files and no init op, or an init op that is a
    NoOp with no inputs (a TF2 export without lookup tables): then skipping
    the init ops on a reuse is exactly running them.
    """
    from tensorflow.python.saved_model import loader_impl

    if s.saver is None or meta.asset_file_def or loader_impl.get_asset_tensors("", meta):
        return False  # no restore op to rely on, or assets the init ops read
    with s.graph.as_default():
        op = loader_impl.get_init_op(meta)
    return op is None or (op.type == "NoOp" and not op.inputs and not op.control_inputs)


def _load(s: _Session, path: str) -> Any:
    """Load the SavedModel at ``path`` into ``s`` as TF Serving does; its MetaGraphDef.

    The steps of ``tf.compat.v1.saved_model.loader.load``, one by one, so
    that the Saver (the restore op) stays in ``s`` for a kept session: import
    the graph (unless :func:`preload` did), run the restore op, then the init
    ops, from ``path``.
    """
    from tensorflow.python.saved_model import loader_impl

    loader = loader_impl.SavedModelLoader(path)
    with s.graph.as_default():
        if s.saver is None:
            s.saver, _ = loader.load_graph(s.graph, ["serve"])
        loader.restore_variables(s.sess, s.saver)
        loader.run_init_ops(s.sess, ["serve"])
        return loader.get_meta_graph_def_from_tags(["serve"])


def validate(req: ValidateRequest, preloaded: _Session | None = None) -> ValidationResult:
    """Run every check of the module contract; the result is the validation report.

    The report lists the checks run (with their timings), each signature's
    inputs and verdict, weight parity and warmup; on failure ``reason``,
    ``error`` and ``permanent`` say what failed, and the checks up to it stay.
    ``preloaded`` is :func:`preload`'s session for ``req["graph_of"]``.
    """
    # ``checks`` and ``durations`` are filled in below.
    report: ValidationResult = {
        "ok": False,
        "saved_model": req["saved_model"],
        "signatures": {},
        "checks": [],
        "durations": {},
    }
    try:
        _validate(req, report, _Checks(report), preloaded)
    except runtime.ChildFailure as e:
        report.update({"ok": False, "reason": e.reason, "error": str(e), "permanent": e.permanent})
    report["durations"] = {
        f"{c['check']}_seconds": c["seconds"] for c in report.get("checks", []) if "seconds" in c
    }
    return report


def _validate(
    req: ValidateRequest, report: ValidationResult, checks: _Checks, preloaded: _Session | None
) -> None:
    global _kept
    path = req["saved_model"]
    samples_by_sig = samples.load_npz(req.get("sample_inputs"), "sample_inputs")
    ref = reference.load(req["reference"]) if req.get("reference") else reference.Reference()
    no_outputs = bool(req.get("reference")) and not ref.outputs
    if no_outputs:
        # A linked export (daemon.children.incremental.link) built no model, so there
        # are no outputs to compare with: its weights map must then be
        # checked tensor by tensor, or nothing proves the weights.
        report["reference"] = "none: linked weights, checked by their weights map"
        if not req.get("checkpoint") or not os.path.exists(
            os.path.join(path, str(WEIGHTS_MAP_RELPATH))
        ):
            raise runtime.ChildFailure(
                "no_reference",
                f"the exporter recorded no outputs for {path} and it has no weights map "
                "to check instead",
            )
    # Read once: it decides the placement, the kept session and what is kept.
    graph = _graph_bytes(path)
    placement = _placement(graph, req.get("graph_of"))
    kept = _take_kept(graph)
    s = preloaded
    if s is not None and (placement != "pruned" or kept is not None):
        s.sess.close()  # the export's graph is not the one imported ahead, or is kept
        s = None
    s = kept.session if kept is not None else s or _open(placement)
    try:
        meta = _validate_in(s, kept, req, report, checks, placement, ref, samples_by_sig)
        _weights(req, report, checks, no_outputs)
    except BaseException:
        s.sess.close()  # a failure keeps nothing (and ends the process)
        raise
    if runtime.reusable() and _keepable(s, meta):
        _kept = _Kept(s, graph or b"", meta)
    else:
        s.sess.close()
    report["ok"] = True


def _validate_in(
    s: _Session,
    kept: _Kept | None,
    req: ValidateRequest,
    report: ValidationResult,
    checks: _Checks,
    placement: Literal["full", "pruned"],
    ref: reference.Reference,
    samples_by_sig: dict[str, dict[str, Any]],
) -> Any:
    """Load into ``s`` (only the restore op where ``kept``), run the signatures, golden
    outputs and warmup; the MetaGraphDef."""
    path = req["saved_model"]
    where = req.get("sample_inputs") or ""
    golden = samples.load_npz(req.get("golden_outputs"), "golden_outputs")
    rtol, atol = float(req.get("rtol", 1e-4)), float(req.get("atol", 1e-5))
    with s.graph.as_default():
        sess = s.sess
        with checks.run(
            "serving_load",
            tags=["serve"],
            placement=placement,
            preloaded=s.saver is not None and kept is None,
            kept=kept is not None,
        ):
            if not os.path.isfile(os.path.join(path, "saved_model.pb")):
                raise runtime.ChildFailure("not_a_saved_model", f"{path} has no saved_model.pb")
            try:
                meta = _restore_kept(s, kept, path) if kept is not None else _load(s, path)
            except Exception as e:
                raise runtime.ChildFailure(
                    "load_failed", f"TF Serving's loader would fail on {path}: {e}"
                ) from e
            sigs = {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}
            if "serving_default" not in sigs:
                raise runtime.ChildFailure(
                    "no_serving_default",
                    f"{path} has no 'serving_default' signature (it has "
                    f"{sorted(sigs) or 'none'}); requests without a signature name would fail",
                )
        image_size = req.get("synthetic_image_size", samples.DEFAULT_IMAGE_SIZE)
        inputs = _Inputs(sess, sigs, ref, samples_by_sig, where, image_size)
        with checks.run("signatures", count=len(sigs)) as entry:
            outputs: dict[str, dict[str, Any]] = {}
            for name, sig in sorted(sigs.items()):
                report["signatures"][name], outputs[name] = _run_signature(
                    sess,
                    name,
                    sig,
                    inputs,
                    ref if name == "serving_default" else reference.Reference(),
                    rtol,
                    atol,
                )
            failed = [n for n, r in report["signatures"].items() if not r["ok"]]
            entry["failed"] = failed
            if failed:
                reasons = {report["signatures"][n]["reason"] for n in failed}
                # The most specific reason that covers them, for the metrics.
                reason = next(
                    (r for r in ("output_mismatch", "not_finite") if r in reasons),
                    "signature_failed",
                )
                raise runtime.ChildFailure(
                    reason,
                    "; ".join(f"{n}: {report['signatures'][n]['error']}" for n in failed),
                )
        if golden:
            with checks.run("golden_outputs", file=req.get("golden_outputs")) as entry:
                entry["compared"] = _compare_golden(golden, outputs, rtol, atol, req)
        warmup_file = os.path.exists(os.path.join(path, str(WARMUP_RELPATH)))
        if warmup_file or req.get("warmup_records"):
            with checks.run("warmup", file=str(WARMUP_RELPATH)) as entry:
                if not warmup_file:
                    raise runtime.ChildFailure(
                        "warmup_failed",
                        f"{path} has no {WARMUP_RELPATH} although warmup_records = "
                        f"{req.get('warmup_records')}",
                        permanent=False,
                    )
                replayed = warmup_records.replay(
                    path, sigs, lambda sig, feed: _run(sess, sig, feed)
                )
                report["warmup"] = replayed
                if replayed:
                    entry["records"] = replayed["records"]
                    entry["replayed"] = replayed["replayed"]
    return meta


def _restore_kept(s: _Session, kept: _Kept, path: str) -> Any:
    """The reuse of a kept session: only the restore op, from ``path``'s variables."""
    from tensorflow.python.saved_model import loader_impl

    loader_impl.SavedModelLoader(path).restore_variables(s.sess, s.saver)
    return kept.meta


def _weights(
    req: ValidateRequest, report: ValidationResult, checks: _Checks, no_outputs: bool
) -> None:
    """The ``weight_parity`` check (module docstring); raises ChildFailure when it fails."""
    path = req["saved_model"]
    checkpoint = req.get("checkpoint")
    mode = req.get("weight_parity", "all")
    if checkpoint and mode == "off" and not no_outputs:
        skipped = 'weight_parity = "off": the exporter may transform the weights'
        with checks.run("weight_parity", checkpoint=checkpoint, skipped=skipped):
            pass
    elif checkpoint:
        with checks.run("weight_parity", checkpoint=checkpoint):
            try:
                report["weights"] = weight_parity(
                    path, checkpoint, "partial" if mode == "partial" else "all"
                )
            except runtime.ChildFailure as e:
                if "weight_parity" not in req or e.reason != "weight_mismatch":
                    raise
                raise runtime.ChildFailure(
                    e.reason,
                    f"{e}. If the exporter adds or transforms variables on purpose, set "
                    'weight_parity = "partial" (or "off") in the source\'s options',
                    permanent=e.permanent,
                ) from e
        if no_outputs and report["weights"]["matched_by"] != "key":
            raise runtime.ChildFailure(
                "no_reference",
                f"{path} has no reference outputs and its weights map could not be checked",
            )


def _placement(graph: bytes | None, graph_of: str | None) -> Literal["full", "pruned"]:
    """``"pruned"`` when ``graph`` (the export's ``saved_model.pb``) is byte for byte that
    of ``graph_of``, else ``"full"``.

    ``graph_of`` is the published version an incremental export took its
    ``saved_model.pb`` from; that version was validated with every op of the
    graph placed, so placing it again proves nothing new. Checked here, not
    taken on trust: anything unreadable or different means a full placement.
    """
    if not graph_of or graph is None:
        return "full"
    return "pruned" if _graph_bytes(graph_of) == graph else "full"


def _run(sess: Any, sig: Any, feed: dict[str, Any]) -> dict[str, Any]:
    """Run ``sig`` through its tensor names, as TF Serving's Predict does."""
    fetch = {key: info.name for key, info in sig.outputs.items()}
    result: dict[str, Any] = sess.run(fetch, feed)
    return result


class _Inputs:
    """Chooses each signature input's value, and says where it came from.

    In order: the exporter's reference (``serving_default``: what the
    in-memory model answered, made from ``sample_inputs`` when given); the
    user's ``sample_inputs`` for that signature; the reference value of a
    ``serving_default`` input fed through the same tensor (an Estimator's
    ``classification`` signature and ``serving_default`` share one); else
    synthesised from the SignatureDef: numbers from a seeded generator (an
    image of unknown size at ``image_size``, see :func:`samples.image_shape`), and
    strings as a ``tf.Example`` built from the graph's ``ParseExample`` op,
    so that a classify or regress signature parses what it is given.
    """

    def __init__(
        self,
        sess: Any,
        sigs: dict[str, Any],
        ref: reference.Reference,
        samples_by_sig: dict[str, dict[str, Any]],
        where: str,
        image_size: int = samples.DEFAULT_IMAGE_SIZE,
    ) -> None:
        self.sess = sess
        self.samples = samples_by_sig
        self.where = where
        self.image_size = image_size
        self.by_tensor: dict[str, Any] = {}
        default = sigs["serving_default"]
        for key, info in default.inputs.items():
            if key in ref.inputs:
                self.by_tensor[info.name] = ref.inputs[key]
        self._example: bytes | None = None

    def values(
        self, name: str, sig: Any, ref: reference.Reference
    ) -> tuple[dict[str, Any], Literal["reference", "sample_inputs", "synthesised"]]:
        """The inputs of signature ``name`` by key, and where they came from."""
        import numpy as np
        import tensorflow as tf

        specs = {k: (tf.dtypes.as_dtype(i.dtype).name, _dims(i)) for k, i in sig.inputs.items()}
        if ref and all(k in ref.inputs for k in specs):
            return {k: ref.inputs[k] for k in specs}, "reference"
        given = samples.inputs_for(
            self.samples, name, specs, self.where, required=name == "serving_default"
        )
        if given is not None:
            return given, "sample_inputs"
        if all(i.name in self.by_tensor for i in sig.inputs.values()):
            return {k: self.by_tensor[i.name] for k, i in sig.inputs.items()}, "reference"
        out = {}
        for key, (dtype, dims) in specs.items():
            if dtype == "string" and self.example() is not None:
                shape = [1 if d is None or d < 0 else d for d in dims]
                out[key] = np.full(shape, self.example(), dtype=object)
            else:
                out[key] = samples.synthesise(key, dtype, dims, self.image_size)
        return out, "synthesised"

    def example(self) -> bytes | None:
        """A serialized ``tf.Example`` with every feature the graph parses, or None."""
        if self._example is None:
            self._example = _example_for_graph(self.sess) or b""
        return self._example or None


def _dims(info: Any) -> list[int | None]:
    if info.tensor_shape.unknown_rank:
        return []  # fed as a scalar, as the exporters synthesise it
    return [None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim]


#: ParseExample ops and the positions of their (sparse keys, dense keys) inputs.
_PARSE_OPS = ("ParseExampleV2", "ParseExample")


def _example_for_graph(sess: Any) -> bytes | None:
    """A deterministic ``tf.Example`` filling each feature of the graph's first parse op.

    The keys are graph constants (inputs of ``ParseExampleV2``/``ParseExample``)
    and the dtypes and dense shapes are the op's attributes, so the Example
    parses exactly as a client's would; None when the graph parses none.
    """
    import numpy as np
    import tensorflow as tf

    op = next((o for o in sess.graph.get_operations() if o.type in _PARSE_OPS), None)
    if op is None:
        return None
    try:
        if op.type == "ParseExampleV2":
            sparse_keys = [k.decode() for k in sess.run(op.inputs[2]).reshape(-1)]
            dense_keys = [k.decode() for k in sess.run(op.inputs[3]).reshape(-1)]
        else:
            ns, nd = op.get_attr("Nsparse"), op.get_attr("Ndense")
            keys = [k.decode() for k in sess.run(list(op.inputs[2 : 2 + ns + nd]))]
            sparse_keys, dense_keys = keys[:ns], keys[ns:]
        dense_types = op.get_attr("Tdense")
        dense_shapes = op.get_attr("dense_shapes")
        sparse_types = op.get_attr("sparse_types")
    except Exception:
        return None  # keys computed at run time: fall back to plain strings
    example = tf.train.Example()

    def fill(key: str, dtype: Any, count: int) -> None:
        value = runtime.synth_input(key, tf.dtypes.as_dtype(dtype).name, [count])
        feature = example.features.feature[key]
        flat = np.asarray(value).reshape(-1)
        if tf.dtypes.as_dtype(dtype).is_floating:
            feature.float_list.value.extend(flat.astype("float32").tolist())
        elif tf.dtypes.as_dtype(dtype) == tf.string:
            feature.bytes_list.value.extend(bytes(x) for x in flat)
        else:
            feature.int64_list.value.extend(flat.astype("int64").tolist())

    for key, dtype, shape in zip(dense_keys, dense_types, dense_shapes, strict=False):
        dims = tf.TensorShape(shape).as_list() if tf.TensorShape(shape).rank is not None else [1]
        fill(key, dtype, int(np.prod([d if d and d > 0 else 1 for d in dims])))
    for key, dtype in zip(sparse_keys, sparse_types, strict=False):
        fill(key, dtype, 1)
    data: bytes = example.SerializeToString()
    return data


def declared(sig: Any) -> DeclaredSignature:
    """A SignatureDef's inputs and outputs as it declares them (the signature contract's input)."""
    return {
        "inputs": {k: _declared_tensor(v) for k, v in sorted(sig.inputs.items())},
        "outputs": {k: _declared_tensor(v) for k, v in sorted(sig.outputs.items())},
    }


def _declared_tensor(info: Any) -> DeclaredTensor:
    """A TensorInfo's dtype name and shape (None: unknown rank; None in it: unknown size)."""
    import tensorflow as tf

    try:
        dtype = tf.dtypes.as_dtype(info.dtype).name
    except TypeError:
        dtype = "unknown"  # DT_INVALID: a composite tensor's info carries none
    encoding = info.WhichOneof("encoding") or "name"
    if encoding != "name":
        dtype = f"{encoding}:{dtype}"
    shape: list[int | None] | None = None
    if not info.tensor_shape.unknown_rank:
        shape = [None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim]
    return {"dtype": dtype, "shape": shape}


def _run_signature(
    sess: Any,
    name: str,
    sig: Any,
    inputs: _Inputs,
    ref: reference.Reference,
    rtol: float,
    atol: float,
) -> tuple[SignatureReport, dict[str, Any]]:
    """Run one signature; its report entry and its outputs (empty when it failed)."""
    import numpy as np

    entry: SignatureReport = {"method": sig.method_name, "declared": declared(sig)}
    problem = warmup_records.signature_rules(sig.method_name, sig)
    if problem:
        return _verdict(entry, ok=False, reason="signature_rules", error=problem), {}
    values, origin = inputs.values(name, sig, ref)
    entry["inputs"] = {k: [str(np.asarray(v).dtype), list(np.shape(v))] for k, v in values.items()}
    entry["inputs_from"] = origin
    try:
        out = _run(sess, sig, {sig.inputs[k].name: v for k, v in values.items()})
    except Exception as e:
        hint = " (synthesised inputs: give sample_inputs)" if origin == "synthesised" else ""
        return _verdict(
            entry,
            ok=False,
            reason="run_failed",
            error=f"run failed: {warmup_records.first_line(e)}{hint}",
        ), {}
    entry["outputs"] = {k: list(np.shape(v)) for k, v in out.items()}
    batch = len(next(iter(values.values()))) if values else 0
    problem = warmup_records.output_rules(sig.method_name, out, batch)
    if problem:
        return _verdict(entry, ok=False, reason="signature_rules", error=problem), out
    for k, v in out.items():
        arr = np.asarray(v)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return _verdict(
                entry, ok=False, reason="not_finite", error=f"output {k!r} is not finite"
            ), out
    if ref:
        mismatch, worst = _compare(out, ref.outputs, rtol, atol, "the exporter's")
        if mismatch:
            return _verdict(entry, ok=False, reason="output_mismatch", error=mismatch), out
        entry["max_abs_diff"] = worst
    return _verdict(entry, ok=True), out


def _verdict(
    entry: SignatureReport, *, ok: bool, reason: str | None = None, error: str | None = None
) -> SignatureReport:
    """A copy of ``entry`` with its verdict: ``ok``, and on failure ``reason`` and ``error``."""
    out: SignatureReport = {**entry, "ok": ok}
    if reason is not None:
        out["reason"] = reason
    if error is not None:
        out["error"] = error
    return out


def _compare(
    actual: dict[str, Any], expected: dict[str, Any], rtol: float, atol: float, whose: str
) -> tuple[str | None, float]:
    """(what differs or None, the largest absolute difference of floating outputs)."""
    import numpy as np

    if set(expected) != set(actual):
        return f"outputs {sorted(actual)} differ from {whose} {sorted(expected)}", 0.0
    worst = 0.0
    for k, v in sorted(actual.items()):
        arr, ref = np.asarray(v), np.asarray(expected[k])
        if arr.shape != ref.shape:
            return f"output {k!r} has shape {arr.shape}, {whose} {ref.shape}", worst
        if arr.dtype.kind in "fc":
            diff = float(np.max(np.abs(arr - ref))) if arr.size else 0.0
            worst = max(worst, diff)
            if not np.allclose(arr, ref, rtol=rtol, atol=atol):
                return (
                    f"output {k!r} differs from {whose} by up to {diff:.3g} "
                    f"(rtol={rtol}, atol={atol})",
                    worst,
                )
        elif not np.array_equal(arr, ref):
            return f"output {k!r} differs from {whose}", worst
    return None, worst


def _compare_golden(
    golden: dict[str, dict[str, Any]],
    outputs: dict[str, dict[str, Any]],
    rtol: float,
    atol: float,
    req: ValidateRequest,
) -> dict[str, float]:
    """Check each signature's outputs against ``golden_outputs``; max diff per signature."""
    where = req.get("golden_outputs")
    compared = {}
    for name, expected in sorted(golden.items()):
        if name not in outputs:
            raise runtime.ChildFailure(
                "sample_inputs", f"golden_outputs {where}: there is no signature {name!r}"
            )
        unknown = sorted(set(expected) - set(outputs[name]))
        if unknown:
            raise runtime.ChildFailure(
                "sample_inputs",
                f"golden_outputs {where}: signature {name!r} has no outputs {unknown} "
                f"(it has {sorted(outputs[name])})",
            )
        actual = {k: outputs[name][k] for k in expected}
        mismatch, worst = _compare(actual, expected, rtol, atol, "golden_outputs'")
        if mismatch:
            raise runtime.ChildFailure("golden_mismatch", f"signature {name!r}: {mismatch}")
        compared[name] = worst
    return compared


def main(argv: list[str]) -> int:
    # Validation never needs the GPU the trainer is using.
    req: ValidateRequest | None = runtime.begin(argv, validator=True)
    code = exitcodes.OK
    while req is not None:
        code, go_on = serve_one(req)
        if not go_on:
            break
        # A reusable validator (see daemon.supervisor.warm_pool) after a success.
        req = cast("ValidateRequest | None", runtime.next_request(code))
    return code


def _holds(graph_of: str) -> bool:
    """Whether the kept session already holds ``graph_of``'s graph (no preload needed)."""
    return _kept is not None and _graph_bytes(graph_of) == _kept.graph


def serve_one(req: ValidateRequest) -> tuple[int, bool]:
    """Validate one request and write its result: the exit code, and False to exit at once."""
    preloaded = None
    if req.get("wait_for_export"):
        # Started with the export (see preload): wait for the supervisor's go,
        # which comes once the export succeeded; EOF means it did not.
        graph_of = req.get("graph_of")
        preloaded = preload(graph_of) if graph_of and not _holds(graph_of) else None
        if not runtime.wait_for_go():
            return exitcodes.OK, False
    result: ValidationOutcome
    try:
        result = validate(req, preloaded)
    except runtime.ChildFailure as e:
        result = runtime.failure(e.reason, str(e), permanent=e.permanent)
    except MemoryError:
        result = runtime.failure("out_of_memory", "validation ran out of memory", permanent=False)
    except Exception as e:
        tb = traceback.format_exc(limit=8)
        result = runtime.environment_failure(e) or runtime.failure(
            "validate_error", f"{type(e).__name__}: {e}\n{tb}", permanent=True
        )
    result["warm"] = bool(req.get("warm"))
    return runtime.finish(Path(req["result"]), result), True


def run(argv: list[str]) -> NoReturn:
    """The process's entry point, cold or forked by :mod:`daemon.children.zygote`; exits."""
    runtime.exit_now(main(argv))


if __name__ == "__main__":
    run(sys.argv)
