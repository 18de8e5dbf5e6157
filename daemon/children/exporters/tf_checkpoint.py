"""Export a TF2 object-based checkpoint: restore it into the builder's model, or link its weights.

Runs in the worker child (imports TensorFlow). The scanner of this format is
:mod:`daemon.sources.tf_checkpoint`. Given a ``template`` version, the
TensorFlow-free linked export (:func:`daemon.children.incremental.link`) is
tried first; otherwise, or when it does not apply, the checkpoint's object
``checkpoint_key`` is restored into the builder's model, which is exported.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from daemon.children import incremental, reference, runtime
from daemon.children.model import export_model, kept_code_files, model_for, variable_label
from daemon.formats import bundle
from daemon.protocol import ExporterResult, ExportRequest, Incremental


def export(req: ExportRequest) -> ExporterResult:
    """Restore the pinned checkpoint into the builder's model and export it.

    Fails unless every variable of the restore target (the model, or the
    object a serving module wraps) was restored from the object the trainer
    saved under ``checkpoint_key`` (see :func:`_restore` for whom it blames).
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
    built, reused = model_for(req)
    t_build = time.monotonic()
    # A template is a published version made with this model's export key
    # (the same builder, module bytes and settings): the builder is known to
    # fit this model's checkpoints, so a mismatch is this checkpoint's fault.
    n_vars, status = _restore(
        built.target, req["checkpoint_key"], req["checkpoint"], builder_proven=bool(template)
    )
    t_restore = time.monotonic()
    result = export_model(built, req)
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
    """Step counters saved in the checkpoint, if the trainer tracked any.

    Read from the bundle without TensorFlow: a linked export imports none.
    """
    checkpoint = bundle.read_index(prefix)
    out = {}
    for key in ("step", "global_step", "save_counter"):
        value = checkpoint.read_int(f"{key}/.ATTRIBUTES/VARIABLE_VALUE")
        if value is not None:
            out[key] = value
    return out


def _restore(obj: Any, key: str, prefix: str, *, builder_proven: bool) -> tuple[int, Any]:
    """Restore ``prefix``'s object ``key`` into ``obj``; the variable count and the load status.

    Who is blamed when they do not match (objects missing or unbound,
    shapes that differ, no object ``key``): the builder, ``builder_mismatch``
    (the model pauses, the checkpoint stays pending), unless
    ``builder_proven``, that is unless a version made with this model's
    export key (the same builder, the same bytes of its module, the same
    settings) has been published: then the builder is known to fit this
    model's checkpoints and this one is rejected, ``restore_mismatch``.
    """
    import tensorflow as tf

    variables = _variables(obj)
    if not variables:
        raise runtime.ChildFailure(
            "builder_mismatch",
            "the builder returned a model without variables; build it before returning "
            "(for Keras: start from keras.Input(...) or call model.build(input_shape))",
        )
    keys = _checkpoint_keys(prefix)
    if key not in keys:
        raise _mismatch(
            builder_proven,
            f"checkpoint {os.path.basename(prefix)} has no object {key!r} (it has "
            f"{', '.join(keys[:10]) or 'nothing'}); set checkpoint_key to the name the trainer "
            "gave tf.train.Checkpoint",
        )
    status = None
    try:
        # A shape mismatch raises in read(); a variable the checkpoint lacks, in the assert.
        status = tf.train.Checkpoint(**{key: obj}).read(prefix)
        status.assert_existing_objects_matched()
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
        raise _unreadable(prefix, e) from e  # checksum mismatch, short read
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        unrestored = _unrestored(variables, status, prefix)
        raise _mismatch(
            builder_proven,
            mismatch_message(os.path.basename(prefix), key, len(variables), unrestored, e),
        ) from e
    return len(variables), status


def _variables(obj: Any) -> list[Any]:
    """``obj``'s variables; for a ``tf.Module`` holding a Keras 3 model, found by walking it.

    ``tf.Module.variables`` collects tf.Variables only, so a module that
    wraps a Keras 3 model lists none of the model's.
    """
    import keras
    import tensorflow as tf

    variables = list(obj.variables)
    if variables:
        return variables
    try:
        found = tf.train.TrackableView(obj).descendants()
    except Exception:  # a trackable this TensorFlow cannot walk
        return []
    return [t for t in found if isinstance(t, (tf.Variable, keras.Variable))]


def _mismatch(builder_proven: bool, message: str) -> runtime.ChildFailure:
    """The failure for a model that does not fit the checkpoint (see :func:`_restore`)."""
    if builder_proven:
        return runtime.ChildFailure(
            "restore_mismatch",
            f"{message}. A version made with this builder was published, so this checkpoint "
            "is rejected: it is not shaped like the ones the builder fitted",
        )
    return runtime.ChildFailure(
        "builder_mismatch",
        f"{message}. No version has been published with this builder yet, so the builder "
        "(or checkpoint_key) is taken to be wrong: the model pauses and its checkpoints stay "
        "pending; fix the builder, then reload",
    )


#: Variables a restore-mismatch message names (then "and N more"), and its longest length.
MISMATCH_NAMED = 5
MISMATCH_MAX_CHARS = 1500
#: How much of TensorFlow's own message is kept.
_TF_MESSAGE_CHARS = 600
#: What is left of a value after the object reprs are cut (a repr without brackets).
_VALUES = re.compile(r"\b(numpy|value)=.*", re.S)


def mismatch_message(
    checkpoint: str, key: str, n_variables: int, unrestored: list[str], error: BaseException
) -> str:
    """A restore mismatch, short: a few unrestored variables with shapes, never their values.

    ``unrestored`` labels the variables the restore did not reach (dtype and
    shape each). TensorFlow's own message follows on one line, cut where it
    starts listing objects (``<tf.Variable ... numpy=array(...)>``, a Keras
    variable's ``value=[...]``: their values) and at
    :data:`_TF_MESSAGE_CHARS`; the whole is at most :data:`MISMATCH_MAX_CHARS`.
    """
    parts = [f"the builder's model does not match checkpoint {checkpoint} under {key!r}"]
    if unrestored:
        named = ", ".join(unrestored[:MISMATCH_NAMED])
        more = len(unrestored) - MISMATCH_NAMED
        parts.append(
            f"{len(unrestored)} of its {n_variables} variables were not restored: {named}"
            + (f" and {more} more" if more > 0 else "")
        )
    text = " ".join(str(error).split())  # one line
    text = _VALUES.sub("", text.split("<", 1)[0]).rstrip(" :[,(")
    if len(text) > _TF_MESSAGE_CHARS:
        text = text[: _TF_MESSAGE_CHARS - 3] + "..."
    if text:
        parts.append(f"{type(error).__name__}: {text}")
    message = "; ".join(parts)
    if len(message) > MISMATCH_MAX_CHARS:
        message = message[: MISMATCH_MAX_CHARS - 3] + "..."
    return message


def _unrestored(variables: list[Any], status: Any, prefix: str) -> list[str]:
    """Labels (name, dtype, shape) of ``variables`` that the restore did not reach.

    Known from the load status' matching when ``read`` returned one; after a
    shape mismatch (``read`` raised) nothing is known and TensorFlow's
    message names the variable.
    """
    if status is None:
        return []
    restored = set(incremental.restored_from(status, prefix))
    return [variable_label(v) for v in variables if incremental.variable_name(v) not in restored]
