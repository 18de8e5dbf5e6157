"""Export a TF2 object-based checkpoint: restore it into the builder's model, or link its weights.

Runs in the worker child (imports TensorFlow). The scanner of this format is
:mod:`daemon.sources.tf_checkpoint`. Given a ``template`` version, the
TensorFlow-free linked export (:func:`daemon.children.incremental.link`) is
tried first; otherwise, or when it does not apply, the checkpoint's object
``checkpoint_key`` is restored into the builder's model, which is exported.
"""

from __future__ import annotations

import os
import time
from typing import Any

from daemon.children import incremental, reference, runtime
from daemon.children.model import export_model, kept_code_files, model_for
from daemon.protocol import ExporterResult, ExportRequest, Incremental


def export(req: ExportRequest) -> ExporterResult:
    """Restore the pinned checkpoint into the builder's model and export it.

    Fails permanently unless every variable of the model was restored from
    the object the trainer saved under ``checkpoint_key``.
    """
    t0 = time.monotonic()
    link_fallback = None
    template = req.get("template")
    if template:
        try:
            linked = incremental.link(
                template,
                req["checkpoint"],
                req["checkpoint_key"],
                req["export_dir"],
                need_warmup=bool(req.get("warmup_records")),
            )
        except incremental.Fallback as e:
            link_fallback = str(e)  # then the TensorFlow path, incremental or full
        else:
            return _linked_result(req, template, linked, time.monotonic() - t0)
    obj, reused = model_for(req)
    t_build = time.monotonic()
    n_vars, status = _restore(obj, req["checkpoint_key"], req["checkpoint"])
    t_restore = time.monotonic()
    result = export_model(obj, req)
    if link_fallback is not None:
        result["incremental"]["link_fallback"] = link_fallback
    why_not = incremental.record_weights_map(
        req["export_dir"],
        incremental.restored_from(status, req["checkpoint"]),
        req["checkpoint"],
        req["checkpoint_key"],
        kept_code_files(),
    )
    result["weights_map"] = "written" if why_not is None else f"not written: {why_not}"
    return {
        **result,
        "variables": n_vars,
        "model_reused": reused,
        "saved_counters": _saved_counters(req["checkpoint"]),
        "durations": {
            "import_seconds": round(t_build - t0, 3),
            "restore_seconds": round(t_restore - t_build, 3),
            "save_seconds": result.pop("save_seconds"),
        },
    }


def _linked_result(
    req: ExportRequest, template: str, linked: Incremental, seconds: float
) -> ExporterResult:
    """A linked export's result (:func:`daemon.children.incremental.link`): no model, no reference.

    ``template`` is the request's, which ``linked`` was made from.

    The reference file is written empty: the validator then has no outputs
    to compare with and checks the weights map tensor by tensor instead.
    """
    reference.save(req["reference"], {}, {})
    return {
        "kind": "linked",
        "incremental": {"template": template, **linked},
        "variables": linked["variables"],
        "model_reused": False,
        "saved_counters": _saved_counters(req["checkpoint"]),
        "durations": {"link_seconds": round(seconds, 3)},
    }


def _checkpoint_keys(prefix: str) -> list[str]:
    """Names of the root object's children (the keyword arguments of tf.train.Checkpoint).

    Read from the object graph, not from variable names: a variable is stored
    under its first path in the graph, which is often through the optimizer.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    try:
        reader = tf.train.load_checkpoint(prefix)
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    except Exception as e:
        raise _unreadable(prefix, e) from e
    return sorted(child.local_name for child in graph.nodes[0].children)


def _unreadable(prefix: str, e: Exception) -> runtime.ChildFailure:
    """The failure for a checkpoint whose files cannot be read back.

    The index is written last, so a checkpoint that passed the completeness
    check and still cannot be read is truncated or corrupt: permanent. Pinned
    files that are gone were removed by someone else: transient.
    """
    name = os.path.basename(prefix)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
    if not os.path.exists(prefix + ".index"):
        return runtime.ChildFailure(
            "checkpoint_vanished",
            f"the pinned files of checkpoint {name} disappeared ({first})",
            permanent=False,
        )
    return runtime.ChildFailure(
        "checkpoint_corrupt",
        f"checkpoint {name} cannot be read: {type(e).__name__}: {first}; "
        "its files are truncated or corrupt (the .index is written last, so this is "
        "not a checkpoint still being written)",
    )


def _saved_counters(prefix: str) -> dict[str, int]:
    """Step counters saved in the checkpoint, if the trainer tracked any."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    out = {}
    for key in ("step", "global_step", "save_counter"):
        name = f"{key}/.ATTRIBUTES/VARIABLE_VALUE"
        if reader.has_tensor(name):
            value = reader.get_tensor(name)
            if getattr(value, "shape", None) == ():
                out[key] = int(value)
    return out


def _restore(obj: Any, key: str, prefix: str) -> tuple[int, Any]:
    """Restore ``prefix``'s object ``key`` into ``obj``; the variable count and the load status."""
    import tensorflow as tf

    variables = list(obj.variables)
    if not variables:
        raise runtime.ChildFailure(
            "no_variables",
            "the builder returned a model without variables; build it before returning "
            "(for Keras: start from keras.Input(...) or call model.build(input_shape))",
        )
    keys = _checkpoint_keys(prefix)
    if key not in keys:
        raise runtime.ChildFailure(
            "restore_mismatch",
            f"checkpoint {prefix} has no object {key!r} (it has {', '.join(keys) or 'nothing'});"
            " set checkpoint_key to the name the trainer gave tf.train.Checkpoint",
        )
    try:
        # A shape mismatch raises in read(); a variable the checkpoint lacks, in the assert.
        status = tf.train.Checkpoint(**{key: obj}).read(prefix)
        status.assert_existing_objects_matched()
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
        raise _unreadable(prefix, e) from e  # checksum mismatch, short read
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise runtime.ChildFailure(
            "restore_mismatch",
            f"the builder's model does not match checkpoint {prefix} under {key!r}: "
            f"{str(e)[:2000]}",
        ) from e
    return len(variables), status
