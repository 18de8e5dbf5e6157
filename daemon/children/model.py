"""The user's model in the worker: build it, keep it between requests, export it as a SavedModel.

The exporters (:mod:`daemon.children.exporters`) call these; the model a
reusable exporter keeps between requests lives here, in one module that
:mod:`daemon.children.worker` (run as ``__main__``) never needs to import
under a second name.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Any, Literal

from daemon.children import incremental, reference, runtime, samples, serving_inputs
from daemon.protocol import ExportOptional, ExportRequest, Incremental, SignatureInput


def import_builder(spec: str, python_path: list[str]) -> Any:
    for p in reversed(python_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise runtime.ChildFailure(
            "builder_import",
            f"cannot import builder module {module_name!r} (python_path={python_path}): "
            f"{type(e).__name__}: {e}",
        ) from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise runtime.ChildFailure(
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


def _input_specs(obj: Any, signature: list[SignatureInput]) -> list[Any]:
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
    raise runtime.ChildFailure(
        "no_signature",
        "cannot tell the model's inputs: add a [models.signature] table "
        '(inputs = { x = { dtype = "float32", shape = [-1, 4] } }) or give the model '
        "keras.Input layers",
    )


def build(req: ExportRequest) -> Any:
    """Import the request's ``builder``, call it, and check what it returned."""
    builder = import_builder(req["builder"], req["python_path"])
    import keras
    import tensorflow as tf

    try:
        obj = builder()
    except Exception as e:
        raise runtime.ChildFailure(
            "builder_error",
            f"builder {req['builder']!r} raised {type(e).__name__}: {e}",
        ) from e
    if not isinstance(obj, (keras.Model, tf.Module)):
        raise runtime.ChildFailure(
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


def model_for(req: ExportRequest) -> tuple[Any, bool]:
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


class ModelExport(ExportOptional):
    """What :func:`export_model` returns: the export result's fields it knows.

    Always with ``inputs``, ``outputs``, ``incremental`` and ``save_seconds``;
    the exporter adds the rest of an :class:`~daemon.protocol.ExporterResult`.
    """

    kind: Literal["keras", "tf.Module"]


def export_model(obj: Any, req: ExportRequest) -> ModelExport:
    """Write ``obj`` (restored already) as a SavedModel to ``req["export_dir"]``.

    Steps 3 and 4 of the module contract; returns the result fields that
    describe the export (inputs, outputs, kind, ``save_seconds``).
    """
    import keras
    import tensorflow as tf

    t0 = time.monotonic()
    model_specs = _input_specs(obj, req["signature"])
    is_keras = isinstance(obj, keras.Model)
    several = len(model_specs) > 1

    def call(*args: Any) -> dict[str, Any]:
        if is_keras:
            return _as_dict(obj(list(args) if several else args[0], training=False))
        return _as_dict(obj(*args))

    specs, serve, feeds = serving_inputs.serving_signature(
        req.get("input_type", "default"), model_specs, call
    )
    feeds = samples.reference_inputs(
        req, {s.name: (s.dtype.name, serving_inputs.dims(s)) for s in specs}, feeds
    )
    export_dir = req["export_dir"]
    incremental_result: Incremental = {}
    # Incremental: the reference comes from the in-memory model, through the
    # serving function a full export of this model traced in this process if
    # there is one (the same computation, without Python's per-layer cost).
    kept = _kept.get("model") is obj
    endpoint: Any = (_kept.get("endpoint") if kept else None) or serve
    template = req.get("template")
    if template:
        try:
            written = incremental.write(obj, template, export_dir)
            incremental_result = {"template": template, "variables": written}
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
    reference.save(req["reference"], feeds, outputs)
    return {
        "inputs": {s.name: [s.dtype.name, [d for d in s.shape]] for s in specs},
        "outputs": sorted(outputs),
        "kind": "keras" if is_keras else "tf.Module",
        "incremental": incremental_result,
        "save_seconds": round(t_export - t0, 3),
    }
