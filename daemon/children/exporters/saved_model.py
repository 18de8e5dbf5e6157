"""Take a SavedModel the trainer wrote as it is, and record its reference outputs.

Runs in the worker child (imports TensorFlow). The scanner is
:mod:`daemon.sources.saved_model`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from daemon.basepath.layout import METADATA_RELPATH, REPORT_RELPATH
from daemon.children import reference, runtime, samples
from daemon.protocol import ExporterResult, ExportKind, ExportOptional, ExportRequest


class TF2Reference(ExportOptional):
    """What :func:`tf2_reference` returns: all of an export result but its ``durations``."""

    kind: ExportKind
    variables: int | None
    saved_counters: dict[str, int]


def export(req: ExportRequest) -> ExporterResult:
    """Copy the pinned SavedModel and record its TF2 outputs as the reference."""
    source, export_dir = req["checkpoint"], req["export_dir"]
    t0 = time.monotonic()
    shutil.copytree(source, export_dir, dirs_exist_ok=True)
    # A SavedModel republished from another base path carries that daemon's
    # metadata and report; this publication writes its own.
    for relpath in (METADATA_RELPATH, REPORT_RELPATH):
        (Path(export_dir) / relpath).unlink(missing_ok=True)
    t_copy = time.monotonic()
    result = tf2_reference(source, req)
    return {
        **result,
        "durations": {
            "copy_seconds": round(t_copy - t0, 3),
            "reference_seconds": round(time.monotonic() - t_copy, 3),
        },
    }


def tf2_reference(saved_model: str, req: ExportRequest) -> TF2Reference:
    """Run ``serving_default`` of ``saved_model`` with TF2 on the validator's inputs.

    The inputs are the request's ``sample_inputs`` or synthesised. Writes
    them and the outputs to ``req["reference"]`` (the ``.npz`` the validator
    compares with) and returns the export result's description fields. For
    SavedModels the daemon did not trace itself, TF2's own loader is the
    independent second opinion; the validator's graph-mode load is the first.
    """
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(saved_model)
    except Exception as e:
        raise runtime.ChildFailure(
            "load_failed", f"cannot load SavedModel {saved_model}: {e}"
        ) from e
    fn = getattr(loaded, "signatures", {}).get("serving_default")
    if fn is None:
        raise runtime.ChildFailure(
            "no_serving_default",
            f"{saved_model} has no 'serving_default' signature; TF Serving requests without a "
            "signature name would fail",
        )
    specs = fn.structured_input_signature[1]
    shapes = {
        k: (s.dtype.name, s.shape.as_list() if s.shape.rank is not None else [])
        for k, s in specs.items()
    }
    feeds = samples.reference_inputs(
        req, shapes, {k: runtime.synth_input(k, *shapes[k]) for k in shapes}
    )
    outputs = fn(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in feeds.items()})
    reference.save(req["reference"], feeds, outputs)
    return {
        "kind": "saved_model",
        "inputs": {k: [s.dtype.name, list(s.shape)] for k, s in specs.items()},
        "outputs": sorted(outputs),
        "variables": len(loaded.variables) if hasattr(loaded, "variables") else None,
        "saved_counters": {},
    }
