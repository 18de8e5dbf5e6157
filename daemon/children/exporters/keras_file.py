"""Export a ``.keras``, ``.h5`` or ``.weights.h5`` file written by Keras.

Runs in the worker child (imports TensorFlow and Keras). The scanner, with the
completeness rules, is :mod:`daemon.sources.keras_file`.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import zipfile
from typing import Any

from daemon.children import runtime
from daemon.children.model import build, export_model
from daemon.protocol import ExporterResult, ExportRequest
from daemon.sources.keras_file import WEIGHTS_SUFFIX


def _custom_objects(specs: list[str], python_path: list[str]) -> dict[str, Any]:
    for p in reversed(python_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    out = {}
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        try:
            out[attr] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise runtime.ChildFailure(
                "builder_import", f"custom_objects: cannot import {spec!r}: {e}"
            ) from e
    return out


def export(req: ExportRequest) -> ExporterResult:
    """Load the pinned file (into the builder's model for weights) and export it."""
    import keras

    path = req["checkpoint"]
    options = req.get("options") or {}
    t0 = time.monotonic()
    custom = _custom_objects(list(options.get("custom_objects", [])), req["python_path"])
    try:
        if path.endswith(WEIGHTS_SUFFIX):
            model = build(req)
            t_build = time.monotonic()
            model.load_weights(path)
        else:
            t_build = time.monotonic()
            # compile=False: serving needs no optimizer or loss, and deserialising
            # a legacy .h5 file's training config fails in Keras 3 ("Could not
            # deserialize 'keras.metrics.mse'") although its model loads fine.
            model = keras.models.load_model(
                path,
                custom_objects=custom,
                compile=False,
                safe_mode=bool(options.get("safe_mode", True)),
            )
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise runtime.ChildFailure(
            "checkpoint_corrupt", f"cannot load {os.path.basename(path)}: {type(e).__name__}: {e}"
        ) from e
    t_load = time.monotonic()
    result = export_model(model, req)
    return {
        **result,
        "variables": len(model.weights),
        "saved_counters": {},
        "durations": {
            "import_seconds": round(t_build - t0, 3),
            "restore_seconds": round(t_load - t_build, 3),
            "save_seconds": result.pop("save_seconds"),
        },
    }
