"""TF Serving's warmup file: write it from the validation inputs, replay it as the server will.

The model server reads ``assets.extra/tf_serving_warmup_requests`` when it
loads a version: a TFRecord file of ``tensorflow.serving.PredictionLog``
records, at most :data:`MAX_WARMUP_RECORDS` of them, each run against the freshly
loaded session before the version is marked available. One record that
fails makes the whole load fail, so the daemon replays the file during
validation, and a bad record rejects the export instead of the server's load.

The protos come from ``tensorflow-serving-api``, imported only here and only
when a warmup file is written or found. Runs in the children (imports
TensorFlow).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from daemon.basepath.layout import MAX_WARMUP_RECORDS, WARMUP_RELPATH
from daemon.children import runtime
from daemon.protocol import WarmupReplay

PREDICT = "tensorflow/serving/predict"
CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"


def _apis() -> Any:
    try:
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError as e:
        raise runtime.ChildFailure(
            "warmup_unavailable",
            "warmup records need the tensorflow-serving-api protos: pip install "
            f"tensorflow-serving-api ({e})",
        ) from e
    return prediction_log_pb2


def write_warmup(export_dir: str, inputs: Mapping[str, Any], records: int, model: str) -> int:
    """Write ``records`` Predict requests for ``serving_default`` carrying ``inputs``.

    The inputs are the validation inputs (the reference or ``sample_inputs``):
    requests the model is known to answer. Returns the number written.
    """
    import tensorflow as tf

    pb = _apis()
    log = pb.PredictionLog()
    request = log.predict_log.request
    request.model_spec.name = model
    request.model_spec.signature_name = "serving_default"
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    data = log.SerializeToString()
    path = Path(export_dir) / WARMUP_RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    n = min(records, MAX_WARMUP_RECORDS)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for _ in range(n):
            writer.write(data)
    return n


# --- replay (the validator) ---------------------------------------------------


def signature_rules(method: str, sig: Any) -> str | None:
    """What TF Serving's Classify or Regress API would refuse in ``sig``, or None.

    These APIs address tensors by fixed keys: one input ``inputs`` (a batch
    of serialized ``tf.Example``), and ``classes`` and/or ``scores``, or
    ``outputs``. A Predict signature takes any keys.
    """
    if method == CLASSIFY:
        if list(sig.inputs) != ["inputs"]:
            return f"a classify signature takes one input named 'inputs', not {sorted(sig.inputs)}"
        if not {"classes", "scores"} & set(sig.outputs) or len(sig.outputs) > 2:
            return (
                f"a classify signature gives 'classes' and/or 'scores', not {sorted(sig.outputs)}"
            )
    elif method == REGRESS:
        if list(sig.inputs) != ["inputs"]:
            return f"a regress signature takes one input named 'inputs', not {sorted(sig.inputs)}"
        if list(sig.outputs) != ["outputs"]:
            return (
                f"a regress signature gives one output named 'outputs', not {sorted(sig.outputs)}"
            )
    return None


def output_rules(method: str, outputs: Mapping[str, Any], batch: int) -> str | None:
    """What TF Serving's Classify or Regress API would refuse in these outputs, or None."""
    import numpy as np

    if method == CLASSIFY:
        for key, kind in (("classes", "S"), ("scores", "f")):
            if key not in outputs:
                continue
            arr = np.asarray(outputs[key])
            dtype_ok = arr.dtype == np.float32 if kind == "f" else arr.dtype.kind in "SO"
            if arr.ndim != 2 or arr.shape[0] != batch or not dtype_ok:
                want = "float32" if kind == "f" else "string"
                return (
                    f"classify output {key!r} must be {want} [batch={batch}, classes], "
                    f"got {arr.dtype} {list(arr.shape)}"
                )
    elif method == REGRESS:
        arr = np.asarray(outputs["outputs"])
        if arr.dtype != np.float32 or arr.shape not in ((batch,), (batch, 1)):
            return (
                f"regress output 'outputs' must be float32 [batch={batch}] or [batch, 1], "
                f"got {arr.dtype} {list(arr.shape)}"
            )
    return None


def _serialized_examples(request_input: Any) -> list[bytes]:
    """The examples of a Classify/Regress request's ``Input``, context merged in."""
    which = request_input.WhichOneof("kind")
    if which == "example_list":
        return [e.SerializeToString() for e in request_input.example_list.examples]
    if which == "example_list_with_context":
        lst = request_input.example_list_with_context
        out = []
        for e in lst.examples:
            merged = type(lst.context)()
            merged.CopyFrom(lst.context)
            merged.MergeFrom(e)
            out.append(merged.SerializeToString())
        return out
    return []


def replay(
    export_dir: str,
    signatures: Mapping[str, Any],
    run: Callable[[Any, dict[str, Any]], dict[str, Any]],
) -> WarmupReplay | None:
    """Run every record of the export's warmup file; None when it has none.

    ``run(signature_def, {tensor_name: value})`` runs a signature in the
    loaded session. Returns ``{"records": n, "replayed": {kind: count}}``;
    the first record that TF Serving would fail on raises ChildFailure
    ``warmup_failed`` naming the record and why.
    """
    import numpy as np
    import tensorflow as tf

    path = os.path.join(export_dir, str(WARMUP_RELPATH))
    if not os.path.exists(path):
        return None
    pb = _apis()
    try:
        # The plain iterator: replay runs inside the validator's graph-mode
        # session, where tf.data datasets cannot be iterated.
        raw = list(tf.compat.v1.io.tf_record_iterator(path))
    except Exception as e:
        raise runtime.ChildFailure("warmup_failed", f"{path} is not a TFRecord file: {e}") from e
    if len(raw) > MAX_WARMUP_RECORDS:
        raise runtime.ChildFailure(
            "warmup_failed",
            f"{path} holds {len(raw)} records; TF Serving refuses to load more than "
            f"{MAX_WARMUP_RECORDS}",
        )
    replayed: dict[str, int] = {}
    for i, data in enumerate(raw):

        def fail(why: str, i: int = i) -> runtime.ChildFailure:
            return runtime.ChildFailure("warmup_failed", f"{path} record {i}: {why}")

        try:
            log = pb.PredictionLog.FromString(data)
        except Exception as e:
            raise fail(f"not a tensorflow.serving.PredictionLog ({e})") from e
        kind = log.WhichOneof("log_type")
        if kind == "predict_log":
            request = log.predict_log.request
        elif kind in ("classify_log", "regress_log"):
            request = getattr(log, kind).request
        else:
            # MultiInference and SessionRun records: the server runs them,
            # this validator does not (yet); say so in the report.
            replayed[f"{kind}_not_replayed"] = replayed.get(f"{kind}_not_replayed", 0) + 1
            continue
        name = request.model_spec.signature_name or "serving_default"
        sig = signatures.get(name)
        if sig is None:
            raise fail(f"signature {name!r} does not exist (there are {sorted(signatures)})")
        if kind == "predict_log":
            if set(request.inputs) != set(sig.inputs):
                raise fail(
                    f"inputs {sorted(request.inputs)} do not match signature {name!r}'s "
                    f"{sorted(sig.inputs)}"
                )
            unknown = set(request.output_filter) - set(sig.outputs)
            if unknown:
                raise fail(f"output_filter names {sorted(unknown)}, not outputs of {name!r}")
            feed = {}
            for key, proto in request.inputs.items():
                want = tf.dtypes.as_dtype(sig.inputs[key].dtype)
                got = tf.dtypes.as_dtype(proto.dtype)
                if got != want:
                    raise fail(f"input {key!r} is {got.name}, signature {name!r} takes {want.name}")
                feed[sig.inputs[key].name] = tf.make_ndarray(proto)
            batch = None
        else:
            method = CLASSIFY if kind == "classify_log" else REGRESS
            if sig.method_name != method:
                raise fail(
                    f"a {kind[:-4]} request on signature {name!r} of method {sig.method_name}"
                )
            problem = signature_rules(method, sig)
            if problem:
                raise fail(problem)
            examples = _serialized_examples(request.input)
            if not examples:
                raise fail("the request's input holds no examples")
            feed = {sig.inputs["inputs"].name: np.array(examples, dtype=object)}
            batch = len(examples)
        try:
            outputs = run(sig, feed)
        except Exception as e:
            raise fail(f"signature {name!r} failed: {first_line(e)}") from e
        if batch is not None:
            problem = output_rules(sig.method_name, outputs, batch)
            if problem:
                raise fail(problem)
        replayed[kind] = replayed.get(kind, 0) + 1
    return {"records": len(raw), "replayed": replayed}


def first_line(e: BaseException) -> str:
    """The cause in a TensorFlow error, without its generic first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Graph execution error")] or lines
    return lines[0] if lines else type(e).__name__
