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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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


def _call_builder(req: ExportRequest) -> Any:
    builder = import_builder(req["builder"], req["python_path"])
    try:
        return builder()
    except Exception as e:
        raise runtime.ChildFailure(
            "builder_error",
            f"builder {req['builder']!r} raised {type(e).__name__}: {e}",
        ) from e


def _is_model(obj: Any) -> bool:
    import keras
    import tensorflow as tf

    return isinstance(obj, (keras.Model, tf.Module))


def build(req: ExportRequest) -> Any:
    """Import the request's ``builder``, call it, and check that it returned one model."""
    obj = _call_builder(req)
    if not _is_model(obj):
        raise runtime.ChildFailure(
            "builder_error",
            f"builder {req['builder']!r} returned {type(obj).__name__}; it must return a "
            "keras.Model or a tf.Module",
        )
    return obj


@dataclass
class Built:
    """What a ``tf_checkpoint`` builder returned, taken apart.

    ``served`` is written as the SavedModel; ``target`` is where the
    checkpoint's object ``checkpoint_key`` is restored: ``served`` itself
    (the builder returned a model), or the object a serving module wraps
    (the builder returned ``(module, target)`` or ``(module, target,
    signatures)``). ``signatures`` (None for a plain model: the daemon traces
    ``serving_default`` itself) are the module's own serving functions by
    signature key, exported as they are; ``canonical`` caches them as
    TensorFlow's SavedModel writer wraps them (called by keyword, returning
    dicts named as the SignatureDefs' outputs).
    """

    served: Any
    target: Any
    signatures: dict[str, Any] | None = None
    canonical: dict[str, Any] | None = None
    #: What is saved for a serving module (:func:`_save_root`), made once.
    root: Any = None


#: Why a serving module's builder result was refused, and what to return instead.
_MODULE_HELP = (
    "a tf_checkpoint builder returns a model, or (module, restore_target) or "
    "(module, restore_target, signatures): module is the tf.Module exported (a Model "
    "Garden ExportModule, say), restore_target the object inside it that the checkpoint's "
    "checkpoint_key restores (module.model), signatures the module's serving functions by "
    'signature key (module.get_inference_signatures({"image_tensor": "serving_default"})); '
    "without signatures, its tf.functions with an input_signature are exported"
)


def build_served(req: ExportRequest) -> Built:
    """Call the request's ``builder``: a model, or a serving module and its restore target."""
    obj = _call_builder(req)
    if _is_model(obj):
        return Built(obj, obj)
    where = f"builder {req['builder']!r}"
    if not isinstance(obj, tuple) or len(obj) not in (2, 3):
        raise runtime.ChildFailure(
            "builder_error", f"{where} returned {type(obj).__name__}; {_MODULE_HELP}"
        )
    module, target = obj[0], obj[1]
    if not _is_model(module) or not _is_model(target):
        raise runtime.ChildFailure(
            "builder_error",
            f"{where} returned ({type(module).__name__}, {type(target).__name__}, ...); "
            f"{_MODULE_HELP}",
        )
    if req["signature"] or req.get("input_type", "default") != "default":
        raise runtime.ChildFailure(
            "no_signature",
            f"{where} returned a serving module, which brings its own signatures and input "
            "handling: remove input_type and [models.signature] from the model's config",
        )
    given = obj[2] if len(obj) == 3 else None
    built = Built(module, target, _module_signatures(module, given, where))
    outside = _variables_outside(built)
    if outside:
        raise runtime.ChildFailure(
            "builder_error",
            f"{where}: the serving module's signatures read variables its restore target "
            f"does not hold ({', '.join(outside)}); every variable exported must come from "
            "the checkpoint: make them constants, or return the object that holds them all "
            "as the target",
        )
    return built


def _tf_variable(v: Any) -> Any:
    """The tf.Variable behind ``v`` (a Keras 3 variable wraps one as ``value``)."""
    inner = getattr(v, "value", None)
    return v if inner is None or callable(inner) else inner


def _variables_outside(built: Built) -> list[str]:
    """The first few variables the signatures read that the restore target does not hold."""
    inside = {id(_tf_variable(v)) for v in built.target.variables}
    outside = [v for v in _save_root(built).variables if id(v) not in inside]
    return [variable_label(v) for v in outside[:3]] + (
        [f"{len(outside) - 3} more"] if len(outside) > 3 else []
    )


def variable_label(v: Any) -> str:
    """A variable as a message names it: its path (or name), dtype and shape; never its value."""
    name = str(getattr(v, "path", None) or getattr(v, "name", "?")).split(":")[0]
    dtype = getattr(getattr(v, "dtype", None), "name", None) or str(getattr(v, "dtype", "?"))
    try:
        shape = list(v.shape)
    except (AttributeError, TypeError, ValueError):
        shape = "?"  # type: ignore[assignment]
    return f"{name} {dtype} {shape}"


def _module_signatures(module: Any, given: Any, where: str) -> dict[str, Any]:
    """The serving module's signatures by key: ``given``, or its input-signature tf.functions.

    Without ``given``, each ``tf.function`` attribute of the module's class
    that has an ``input_signature`` is a signature named after it, except
    that a single one, or else ``serve`` or else ``__call__``, becomes
    ``serving_default``.
    """
    import tensorflow as tf

    if given is None:
        found: dict[str, Any] = {}
        for name in sorted(dir(type(module))):
            attr = getattr(type(module), name, None)
            if isinstance(attr, tf.types.experimental.PolymorphicFunction) and (
                attr.input_signature is not None
            ):
                found[name] = getattr(module, name)
        default = next(
            (n for n in ((*found,) if len(found) == 1 else ("serve", "__call__")) if n in found),
            None,
        )
        if default is None:
            raise runtime.ChildFailure(
                "no_signature",
                f"{where}: the serving module {type(module).__name__} has no tf.function with "
                f"an input_signature to serve ({sorted(found) or 'none'}; one alone, or one "
                f"named serve or __call__, becomes serving_default); {_MODULE_HELP}",
            )
        given = {("serving_default" if n == default else n): f for n, f in found.items()}
    if not isinstance(given, dict) or "serving_default" not in given:
        raise runtime.ChildFailure(
            "no_signature",
            f"{where}: the signatures returned must be a dict with a 'serving_default' key "
            f"(got {type(given).__name__}"
            f"{' with ' + str(sorted(map(str, given))) if isinstance(given, dict) else ''})",
        )
    return {str(k): v for k, v in given.items()}


def _canonical(built: Built) -> dict[str, Any]:
    """``built``'s signatures as ``tf.saved_model.save`` wraps them (cached on ``built``)."""
    if built.canonical is None:
        from tensorflow.python.saved_model import signature_serialization

        assert built.signatures is not None
        try:
            built.canonical = signature_serialization.canonicalize_signatures(built.signatures)[0]
        except (ValueError, TypeError) as e:
            raise runtime.ChildFailure(
                "no_signature", f"the serving module's signatures cannot be exported: {e}"
            ) from e
    return built.canonical


#: What a reusable exporter keeps between requests: ``key`` (the exporter key),
#: ``model``, ``endpoint`` (the traced serving function, once a full export
#: made one), ``root`` (what a Keras model's full export saves with it:
#: :func:`_keras_saved`) and ``code_files`` (the only entry in a single-use
#: process).
_kept: dict[str, Any] = {}

#: At most this many imported files are watched for changes (stat per reuse).
_MAX_CODE_FILES = 5000


def model_for(req: ExportRequest) -> tuple[Built, bool]:
    """The request's model: the one kept from the previous request with its key, or a new one.

    Returns ``(built, reused)`` (:func:`build_served`). Without an
    ``exporter_key`` nothing is kept.
    """
    key = req.get("exporter_key")
    if key is not None and _kept.get("key") == key:
        built: Built = _kept["model"]
        return built, True
    _kept.clear()
    before = set(sys.modules)
    built = build_served(req)
    # Recorded even when nothing is kept: an export's weights map names them.
    _kept["code_files"] = _code_files([sys.modules[n] for n in sys.modules.keys() - before])
    if key is not None:
        _kept.update(key=key, model=built, endpoint=None, root=None)
    return built, False


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

    kind: Literal["keras", "tf.Module", "serving_module"]


def export_model(obj: Any, req: ExportRequest) -> ModelExport:
    """Write ``obj`` (restored already) as a SavedModel to ``req["export_dir"]``.

    ``obj`` is a model, or a :class:`Built` (a serving module's signatures
    are exported as they are). Steps 3 and 4 of the module contract; returns
    the result fields that describe the export (inputs, outputs, kind,
    ``save_seconds``).
    """
    import keras
    import tensorflow as tf

    t0 = time.monotonic()
    # The reference comes from the in-memory model, through the serving
    # function a full export of this model traced in this process if there
    # is one (the same computation, without Python's per-layer cost).
    kept = _kept.get("model") is obj
    if isinstance(obj, Built):
        if obj.signatures is not None:
            return _export_module(obj, req, t0)
        obj = obj.served
    model_specs = _input_specs(obj, req["signature"])
    is_keras = isinstance(obj, keras.Model)
    several = len(model_specs) > 1

    def call(*args: Any) -> dict[str, Any]:
        if is_keras:
            return _as_dict(obj(list(args) if several else args[0], training=False))
        return _as_dict(obj(*args))

    preprocessing = req.get("image_preprocessing")
    function = None
    if preprocessing is not None and preprocessing["function"]:
        function = import_builder(preprocessing["function"], req["python_path"])
    specs, serve, feeds = serving_inputs.serving_signature(
        req.get("input_type", "default"), model_specs, call, preprocessing, function
    )
    feeds = samples.reference_inputs(
        req, {s.name: (s.dtype.name, serving_inputs.dims(s)) for s in specs}, feeds
    )
    export_dir = req["export_dir"]
    endpoint: Any = (_kept.get("endpoint") if kept else None) or serve
    inputs = [tf.constant(feeds[s.name], dtype=s.dtype) for s in specs]
    incremental_result = _incremental(obj, req)
    if "template" not in incremental_result:
        if is_keras:
            endpoint, root = _keras_saved(obj, serve, specs, kept)
        else:
            endpoint, root = tf.function(serve, input_signature=specs), obj
        signatures = {"serving_default": endpoint.get_concrete_function()}
        if kept:
            _kept["endpoint"] = endpoint
        outputs = _save_beside(
            lambda: tf.saved_model.save(root, export_dir, signatures=signatures),
            lambda: endpoint(*inputs),
        )
    else:
        outputs = endpoint(*inputs)
    reference.save(req["reference"], feeds, outputs)
    t_export = time.monotonic()
    return {
        "inputs": {s.name: [s.dtype.name, [d for d in s.shape]] for s in specs},
        "outputs": sorted(outputs),
        "kind": "keras" if is_keras else "tf.Module",
        "incremental": incremental_result,
        "save_seconds": round(t_export - t0, 3),
    }


def _save_beside(save: Callable[[], object], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``save()`` here and ``run()`` (the reference pass) on a thread beside it; run's outputs.

    The save is mostly Python (serialising the graph, tracing the saver's
    save and restore functions) and the reference pass mostly TensorFlow
    kernels, which run without the GIL: side by side they take about the
    longer of the two (ResNet-50 here at one TensorFlow thread and niceness
    19: 4.3 to 4.8 s against 5.9 to 6.7 s one after the other). Both only
    read the variables. An exception of either is raised once both ended,
    the save's first.
    """
    box: dict[str, Any] = {}

    def reference_pass() -> None:
        try:
            box["outputs"] = run()
        except BaseException as e:  # raised in the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=reference_pass, name="reference-pass", daemon=True)
    thread.start()
    try:
        save()
    finally:
        thread.join()
    if "error" in box:
        raise box["error"]
    outputs: dict[str, Any] = box["outputs"]
    return outputs


def _incremental(obj: Any, req: ExportRequest) -> Incremental:
    """With a template version: write ``obj``'s weights under its graph; what happened."""
    template = req.get("template")
    if not template:
        return {}
    try:
        written = incremental.write(obj, template, req["export_dir"])
    except incremental.Fallback as e:
        return {"fallback": str(e)}
    return {"template": template, "variables": written}


def _export_module(built: Built, req: ExportRequest, t0: float) -> ModelExport:
    """Write a serving module with its own signatures; the reference through ``serving_default``.

    The signatures are saved as the builder gave them; the reference outputs
    come from the same functions as ``tf.saved_model.save`` wraps them
    (inputs by signature key, outputs named as in the SignatureDef), run on
    the restored module in memory.
    """
    import tensorflow as tf

    serving = _canonical(built)["serving_default"]
    specs: dict[str, Any] = dict(serving.structured_input_signature[1])
    feeds = {
        k: runtime.synth_input(k, s.dtype.name, serving_inputs.dims(s)) for k, s in specs.items()
    }
    feeds = samples.reference_inputs(
        req, {k: (s.dtype.name, serving_inputs.dims(s)) for k, s in specs.items()}, feeds
    )
    root = _save_root(built)
    inputs = {k: tf.constant(feeds[k], dtype=s.dtype) for k, s in specs.items()}
    incremental_result = _incremental(root, req)
    if "template" not in incremental_result:
        outputs = _save_beside(
            lambda: tf.saved_model.save(root, req["export_dir"], signatures=built.signatures),
            lambda: serving(**inputs),
        )
    else:
        outputs = serving(**inputs)
    reference.save(req["reference"], feeds, outputs)
    t_export = time.monotonic()
    return {
        "inputs": {k: [s.dtype.name, serving_inputs.dims(s)] for k, s in specs.items()},
        "outputs": sorted(outputs),
        "kind": "serving_module",
        "incremental": incremental_result,
        "save_seconds": round(t_export - t0, 3),
    }


def _keras_saved(model: Any, serve: Any, specs: list[Any], kept: bool) -> tuple[Any, Any]:
    """A Keras model's serving function, traced, and the object saved with it.

    Traced once: ``tf.saved_model.save(root, signatures=...)`` wraps the
    concrete function without tracing the model again. Keras' own
    ``ExportArchive`` (what ``model.export()`` uses) traces it a second time
    to find the resources it captures, and writes every variable twice
    (``variables`` and ``_all_variables``): for ResNet-50 here 14.3 s and
    196 MiB against 5.5 s and 98 MiB, and TF Serving's load restores half
    the bytes. Kept with a kept model: its next full export reuses both.
    """
    import tensorflow as tf

    if kept and _kept.get("root") is not None:
        # export_model kept the endpoint with the root of the last full export.
        return _kept["endpoint"], _kept["root"]
    endpoint = tf.function(serve, input_signature=specs)
    root = _stand_in([endpoint.get_concrete_function()], model)
    if kept:
        _kept["root"] = root
    return endpoint, root


def _save_root(built: Built) -> Any:
    """What ``tf.saved_model.save`` writes for a serving module (made once, kept on ``built``)."""
    if built.root is None:
        assert built.signatures is not None
        functions = [
            fn if hasattr(fn, "graph") else fn.get_concrete_function()
            for fn in built.signatures.values()
        ]
        built.root = _stand_in(functions, built.served)
    return built.root


def _stand_in(functions: list[Any], owner: Any) -> Any:
    """A ``tf.Module`` that tracks what the concrete ``functions`` need to be served.

    Not ``owner`` itself: a Keras 3 model's variables are not tf.Variables
    (nor are those of a ``tf.Module`` holding one), and a SavedModel that
    tracks the model loads in TF2 yet fails in TF Serving's graph-mode
    loader ("Could not find variable": the signatures read variables that
    were never restored). As Keras' ``ExportArchive`` does, the stand-in
    tracks the tf.Variables the functions read, so the SavedModel's
    variables are exactly those, and ``owner``'s lookup tables and assets,
    found by a checkpoint walk (which, unlike a SavedModel walk, traces no
    tf.function).
    """
    import tensorflow as tf

    used: dict[int, Any] = {}
    for concrete in functions:
        for v in concrete.variables:
            used.setdefault(id(v), v)
    root = tf.Module(name="serving")
    root.variables_used = list(used.values())
    kinds = (tf.saved_model.experimental.TrackableResource, tf.saved_model.Asset)
    try:
        root.resources = [
            t for t in tf.train.TrackableView(owner).descendants() if isinstance(t, kinds)
        ]
    except Exception:  # a trackable this TensorFlow cannot walk: tables, if any, stay untracked
        root.resources = []
    return root
