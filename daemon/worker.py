"""The export worker: restore a checkpoint into the user's model, write a SavedModel.

Runs as ``python -m daemon.worker REQUEST.json`` (see :mod:`daemon.child`); it is
one of the two places TensorFlow is imported. Contract:

1. import ``builder`` (with ``python_path`` on ``sys.path``) and call it; it
   returns a Keras model or a ``tf.Module`` whose variables already exist;
2. restore the pinned checkpoint's object ``checkpoint_key`` into it and fail
   (permanently) unless every variable of the model was restored;
3. export with a ``serving_default`` signature whose outputs are a dict. Keras
   models go through Keras' ``ExportArchive`` (what ``model.export()`` uses),
   because a Keras 3 model written by ``tf.saved_model.save`` loads in TF2 yet
   fails in TF Serving's graph-mode loader ("Could not find variable");
   ``tf.Module`` objects go through ``tf.saved_model.save``;
4. run the serving function of the *in-memory* model on deterministic inputs
   and store inputs and outputs as the reference the validator must match.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from daemon import child


def _import_builder(spec: str, python_path: list[str]) -> Any:
    for p in reversed(python_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise child.ChildFailure(
            "builder_import",
            f"cannot import builder module {module_name!r} (python_path={python_path}): "
            f"{type(e).__name__}: {e}",
        ) from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise child.ChildFailure(
            "builder_import",
            f"builder {spec!r}: module {module_name!r} has no function {func_name!r}",
        )
    return fn


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


def _unreadable(prefix: str, e: Exception) -> child.ChildFailure:
    """The failure for a checkpoint whose files cannot be read back.

    The index is written last, so a checkpoint that passed the completeness
    check and still cannot be read is truncated or corrupt: permanent. Pinned
    files that are gone were removed by someone else: transient.
    """
    name = os.path.basename(prefix)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
    if not os.path.exists(prefix + ".index"):
        return child.ChildFailure(
            "checkpoint_vanished",
            f"the pinned files of checkpoint {name} disappeared ({first})",
            permanent=False,
        )
    return child.ChildFailure(
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


def _restore(obj: Any, key: str, prefix: str) -> int:
    import tensorflow as tf

    variables = list(obj.variables)
    if not variables:
        raise child.ChildFailure(
            "no_variables",
            "the builder returned a model without variables; build it before returning "
            "(for Keras: start from keras.Input(...) or call model.build(input_shape))",
        )
    keys = _checkpoint_keys(prefix)
    if key not in keys:
        raise child.ChildFailure(
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
        raise child.ChildFailure(
            "restore_mismatch",
            f"the builder's model does not match checkpoint {prefix} under {key!r}: "
            f"{str(e)[:2000]}",
        ) from e
    return len(variables)


def _as_dict(outputs: Any) -> dict[str, Any]:
    """Name outputs the way they will appear in the SignatureDef."""
    if isinstance(outputs, dict):
        return {str(k): v for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return {f"output_{i}": v for i, v in enumerate(outputs)}
    return {"output_0": outputs}


def _input_specs(obj: Any, signature: list[dict[str, Any]]) -> list[Any]:
    import tensorflow as tf

    if signature:
        return [
            tf.TensorSpec(s["shape"], tf.dtypes.as_dtype(s["dtype"]), name=s["name"])
            for s in signature
        ]
    inputs = getattr(obj, "inputs", None)
    if inputs:
        specs = []
        for i, t in enumerate(inputs):
            name = getattr(t, "name", None) or f"input_{i}"
            name = name.split(":")[0].replace("/", "_")
            specs.append(tf.TensorSpec(tuple(t.shape), tf.dtypes.as_dtype(t.dtype), name=name))
        return specs
    # A tf.Module whose __call__ is a tf.function with an input_signature.
    sig = getattr(type(obj).__dict__.get("__call__"), "input_signature", None)
    if sig:
        return list(sig)
    raise child.ChildFailure(
        "no_signature",
        "cannot tell the model's inputs: add a [models.signature] table "
        '(inputs = { x = { dtype = "float32", shape = [-1, 4] } }) or give the model '
        "keras.Input layers",
    )


def export(req: dict[str, Any]) -> dict[str, Any]:
    """Do steps 1-4 of the module contract; returns the result dict."""
    t0 = time.monotonic()
    builder = _import_builder(req["builder"], req["python_path"])
    import keras
    import numpy as np
    import tensorflow as tf

    t_import = time.monotonic()
    try:
        obj = builder()
    except Exception as e:
        raise child.ChildFailure(
            "builder_error",
            f"builder {req['builder']!r} raised {type(e).__name__}: {e}",
        ) from e
    if not isinstance(obj, (keras.Model, tf.Module)):
        raise child.ChildFailure(
            "builder_error",
            f"builder {req['builder']!r} returned {type(obj).__name__}; it must return a "
            "keras.Model or a tf.Module",
        )
    n_vars = _restore(obj, req["checkpoint_key"], req["checkpoint"])
    t_restore = time.monotonic()

    specs = _input_specs(obj, req["signature"])
    is_keras = isinstance(obj, keras.Model)
    n = len(specs)

    def serve(*args: Any) -> dict[str, Any]:
        if is_keras:
            return _as_dict(obj(list(args) if n > 1 else args[0], training=False))
        return _as_dict(obj(*args))

    export_dir = req["export_dir"]
    if is_keras:
        archive = keras.export.ExportArchive()
        archive.track(obj)
        endpoint = archive.add_endpoint("serving_default", serve, input_signature=specs)
        archive.write_out(export_dir, verbose=False)
    else:
        endpoint = tf.function(serve, input_signature=specs)
        tf.saved_model.save(
            obj, export_dir, signatures={"serving_default": endpoint.get_concrete_function()}
        )
    t_export = time.monotonic()

    feeds = {}
    for s in specs:
        shape = [None if d is None else int(d) for d in s.shape]
        feeds[s.name] = child.synth_input(s.name, s.dtype.name, shape)
    outputs = endpoint(*[tf.constant(feeds[s.name], dtype=s.dtype) for s in specs])
    arrays = {f"in/{k}": v for k, v in feeds.items()}
    arrays.update({f"out/{k}": np.asarray(v) for k, v in outputs.items()})
    np.savez(req["reference"], **arrays)
    return {
        "ok": True,
        "variables": n_vars,
        "inputs": {s.name: [s.dtype.name, [d for d in s.shape]] for s in specs},
        "outputs": sorted(outputs),
        "saved_counters": _saved_counters(req["checkpoint"]),
        "kind": "keras" if is_keras else "tf.Module",
        "durations": {
            "import_seconds": round(t_import - t0, 3),
            "restore_seconds": round(t_restore - t_import, 3),
            "save_seconds": round(t_export - t_restore, 3),
        },
    }


def main(argv: list[str]) -> int:
    req = child.load_request(argv)
    if req.get("parent_pid"):
        child.die_with_parent(req["parent_pid"])
    child.prepare_tensorflow_env(req["allow_gpu"])
    try:
        result = export(req)
    except child.ChildFailure as e:
        result = child.failure(e.reason, str(e), permanent=e.permanent)
    except MemoryError:
        result = child.failure("out_of_memory", "the export ran out of memory", permanent=False)
    except OSError as e:
        # Disk full, permissions: the environment, not the checkpoint.
        result = child.environment_failure(e) or child.failure(
            "os_error", f"{type(e).__name__}: {e}", permanent=False
        )
    except Exception as e:
        tb = traceback.format_exc(limit=8)
        result = child.environment_failure(e) or child.failure(
            "export_error", f"{type(e).__name__}: {e}\n{tb}", permanent=True
        )
    return child.finish(Path(req["result"]), result)


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main(sys.argv))
