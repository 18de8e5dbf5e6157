"""The export worker: restore a checkpoint into the user's model, write a SavedModel.

Runs as ``python -m daemon.worker REQUEST.json`` (see :mod:`daemon.child`); it is
one of the two places TensorFlow is imported. Contract:

1. import ``builder`` (with ``python_path`` on ``sys.path``) and call it; it
   returns a Keras model or a ``tf.Module`` whose variables already exist;
2. restore the pinned checkpoint's object ``checkpoint_key`` into it and fail
   (permanently) unless every variable of the model was restored;
3. export with a ``serving_default`` signature whose outputs are a dict (or,
   given a ``template`` version of the same model, write only the new weights
   into its graph: :mod:`daemon.incremental`; anything that does not fit falls
   back to the full export). Keras
   models go through Keras' ``ExportArchive`` (what ``model.export()`` uses),
   because a Keras 3 model written by ``tf.saved_model.save`` loads in TF2 yet
   fails in TF Serving's graph-mode loader ("Could not find variable");
   ``tf.Module`` objects go through ``tf.saved_model.save``;
4. run the serving function of the *in-memory* model on deterministic inputs
   and store inputs and outputs as the reference the validator must match.

A reusable exporter (see :mod:`daemon.warm`) serves several requests with the
same ``exporter_key``: :func:`model_for` builds the model for the first one
and hands the same object to the next, which restores its checkpoint into
it; the serving function traced by the first full export is kept too, so an
incremental export's reference costs one graph call instead of an eager
pass. Each result lists the source files the builder imported
(``code_files``), so the supervisor can retire this process when they change.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from daemon import child, incremental, samples, serving_inputs, warmup


def import_builder(spec: str, python_path: list[str]) -> Any:
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


def build(req: dict[str, Any]) -> Any:
    """Import the request's ``builder``, call it, and check what it returned."""
    builder = import_builder(req["builder"], req["python_path"])
    import keras
    import tensorflow as tf

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
    return obj


#: What a reusable exporter keeps between requests: ``key`` (the exporter key),
#: ``model``, ``endpoint`` (the traced serving function, once a full export
#: made one) and ``code_files`` (the only entry in a single-use process).
_kept: dict[str, Any] = {}

#: At most this many imported files are watched for changes (stat per reuse).
_MAX_CODE_FILES = 5000


def model_for(req: dict[str, Any]) -> tuple[Any, bool]:
    """The request's model: the one kept from the previous request with its key, or a new one.

    Returns ``(model, reused)``. Without an ``exporter_key`` nothing is kept.
    """
    key = req.get("exporter_key")
    if key is not None and _kept.get("key") == key:
        return _kept["model"], True
    _kept.clear()
    before = set(sys.modules)
    obj = build(req)
    # Recorded even when nothing is kept: an export's weights map names them.
    _kept["code_files"] = _code_files([sys.modules[n] for n in sys.modules.keys() - before])
    if key is not None:
        _kept.update(key=key, model=obj, endpoint=None)
    return obj, False


def kept_code_files() -> dict[str, list[int]]:
    """``path -> [st_mtime_ns, st_size]`` of the modules the current model's builder imported."""
    files: dict[str, list[int]] = _kept.get("code_files", {})
    return files


def _code_files(modules: list[Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for module in modules:
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or len(out) >= _MAX_CODE_FILES:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        out[path] = [st.st_mtime_ns, st.st_size]
    return out


def export_model(obj: Any, req: dict[str, Any]) -> dict[str, Any]:
    """Write ``obj`` (restored already) as a SavedModel to ``req["export_dir"]``.

    Steps 3 and 4 of the module contract; returns the result fields that
    describe the export (inputs, outputs, kind, ``save_seconds``).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    t0 = time.monotonic()
    model_specs = _input_specs(obj, req["signature"])
    is_keras = isinstance(obj, keras.Model)
    n = len(model_specs)

    def call(*args: Any) -> dict[str, Any]:
        if is_keras:
            return _as_dict(obj(list(args) if n > 1 else args[0], training=False))
        return _as_dict(obj(*args))

    specs, serve, feeds = serving_inputs.serving_signature(
        req.get("input_type", "default"), model_specs, call
    )
    feeds = samples.reference_inputs(
        req, {s.name: (s.dtype.name, serving_inputs.dims(s)) for s in specs}, feeds
    )
    export_dir = req["export_dir"]
    incremental_result: dict[str, Any] = {}
    # Incremental: the reference comes from the in-memory model, through the
    # serving function a full export of this model traced in this process if
    # there is one (the same computation, without Python's per-layer cost).
    kept = _kept.get("model") is obj
    endpoint: Any = (_kept.get("endpoint") if kept else None) or serve
    if req.get("template"):
        try:
            n = incremental.write(obj, req["template"], export_dir)
            incremental_result = {"template": req["template"], "variables": n}
        except incremental.Fallback as e:
            incremental_result = {"fallback": str(e)}
    if "template" not in incremental_result:
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
        if kept:
            _kept["endpoint"] = endpoint
    t_export = time.monotonic()

    outputs = endpoint(*[tf.constant(feeds[s.name], dtype=s.dtype) for s in specs])
    arrays = {f"in/{k}": v for k, v in feeds.items()}
    arrays.update({f"out/{k}": np.asarray(v) for k, v in outputs.items()})
    np.savez(req["reference"], **arrays)
    return {
        "inputs": {s.name: [s.dtype.name, [d for d in s.shape]] for s in specs},
        "outputs": sorted(outputs),
        "kind": "keras" if is_keras else "tf.Module",
        "incremental": incremental_result,
        "save_seconds": round(t_export - t0, 3),
    }


def export(req: dict[str, Any]) -> dict[str, Any]:
    """Run the export of the request's source (see :class:`daemon.sources.SourceKind`)."""
    from daemon.sources import SOURCES

    kind = SOURCES.get(req.get("source", "tf_checkpoint"))
    if kind is None:
        raise child.ChildFailure("bad_request", f"unknown source {req.get('source')!r}")
    result: dict[str, Any] = importlib.import_module(kind.exporter).export(req)
    if req.get("warmup_records"):
        result["warmup"] = write_warmup(req)
    return {"ok": True, **result}


def write_warmup(req: dict[str, Any]) -> dict[str, Any]:
    """Write the export's warmup file from the reference inputs (``warmup_records``).

    A SavedModel that brings its own warmup file (the ``saved_model`` and
    ``command`` sources) keeps it: the validator replays whatever is there.
    """
    import numpy as np

    path = os.path.join(req["export_dir"], str(warmup.WARMUP_RELPATH))
    if os.path.exists(path):
        return {"records": None, "kept": str(warmup.WARMUP_RELPATH)}
    with np.load(req["reference"], allow_pickle=True) as z:
        inputs = {k[3:]: z[k] for k in z.files if k.startswith("in/")}
    n = warmup.write_warmup(req["export_dir"], inputs, int(req["warmup_records"]), req["model"])
    return {"records": n}


def main(argv: list[str]) -> int:
    req: dict[str, Any] | None = child.begin(argv, validator=False)
    code = 0
    while req is not None:
        code = serve_one(req)
        req = child.next_request(code)
    return code


def serve_one(req: dict[str, Any]) -> int:
    """Run one export request; write its result; return the exit code that goes with it."""
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
    result["warm"] = bool(req.get("warm"))
    result["reused"] = int(req.get("reused", 0))
    if req.get("exporter_key"):
        result["code_files"] = kept_code_files()
    return child.finish(Path(req["result"]), result)


def run(argv: list[str]) -> NoReturn:
    """The process's entry point, cold or forked by :mod:`daemon.zygote`; exits."""
    os.umask(0o022)
    child.exit_now(main(argv))


if __name__ == "__main__":
    # Run as daemon.worker, not as __main__: the sources import daemon.worker,
    # and the model it keeps between requests must live in one module.
    from daemon import worker

    worker.run(sys.argv)
