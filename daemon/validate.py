"""The validator: load a SavedModel the way TF Serving does and run every signature.

Runs as ``python -m daemon.validate REQUEST.json`` in a fresh process that never
imported the user's builder, so an export that only works because user code
was in memory is caught. Contract:

- load the MetaGraph tagged ``serve`` into a graph-mode session, which runs the
  restore op and then the init ops, as the model server's C++ loader does (a
  TF2 ``tf.saved_model.load`` would accept exports the server rejects);
- require a ``serving_default`` signature;
- run every SignatureDef through its tensor names; inputs come from the
  exporter's reference for ``serving_default`` and are synthesised from the
  SignatureDef otherwise (unknown dimensions = 1);
- require every floating output to be finite, and ``serving_default``'s
  outputs to equal the exporter's within ``rtol``/``atol``;
- given the source ``checkpoint`` (the pinned copy), require every variable
  saved in the SavedModel to hold exactly the value of a tensor in that
  checkpoint (:func:`weight_parity`). Output parity alone cannot see a
  restore that matched nothing: the exporter's reference outputs come from
  the same unrestored model.

The result lists each signature with its verdict; ``ok`` is their conjunction.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from daemon import child

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


def weight_parity(saved_model: str, checkpoint: str) -> dict[str, Any]:
    """Check that every variable of ``saved_model`` came from ``checkpoint``.

    Matching is by exact value (dtype, shape and bytes), not by name: the
    SavedModel names variables by its own object graph (``variables/0``...)
    and a trainer's checkpoint by another (``model/...``, or
    ``optimizer/_trainable_variables/0`` when Keras tracks them there). A
    variable left at its initializer, one the restore did not reach, or one
    altered on the way matches no tensor of the checkpoint and fails with its
    name. Reads one tensor at a time, so memory stays at the largest tensor.
    """
    import tensorflow as tf

    prefix = os.path.join(saved_model, "variables", "variables")
    try:
        saved = tf.train.load_checkpoint(prefix)
    except Exception as e:
        raise child.ChildFailure(
            "no_variables",
            f"{saved_model} has no readable variables/ checkpoint ({e}); TF Serving would "
            "load it with no weights restored",
        ) from e
    source = tf.train.load_checkpoint(checkpoint)
    known = {
        _digest(source.get_tensor(k))
        for k in source.get_variable_to_shape_map()
        if k not in _NOT_VARIABLES
    }
    names = sorted(k for k in saved.get_variable_to_shape_map() if k not in _NOT_VARIABLES)
    unmatched = [k for k in names if _digest(saved.get_tensor(k)) not in known]
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (
            f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        )
        raise child.ChildFailure(
            "weight_mismatch",
            f"{len(unmatched)} of {len(names)} variables in {saved_model} hold a value found "
            f"nowhere in checkpoint {checkpoint}: {shown}. The restore missed them (left at "
            "their initializer) or they were changed after it",
        )
    return {"ok": True, "variables": len(names), "checkpoint": checkpoint}


def validate(req: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    path = req["saved_model"]
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise child.ChildFailure("not_a_saved_model", f"{path} has no saved_model.pb")
    reference: dict[str, Any] = {}
    if req.get("reference"):
        with np.load(req["reference"], allow_pickle=True) as z:
            reference = {k: z[k] for k in z.files}
    rtol, atol = float(req.get("rtol", 1e-4)), float(req.get("atol", 1e-5))

    t0 = time.monotonic()
    graph = tf.Graph()
    report: dict[str, Any] = {}
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        try:
            meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        except Exception as e:
            raise child.ChildFailure(
                "load_failed", f"TF Serving's loader would fail on {path}: {e}"
            ) from e
        t_load = time.monotonic()
        sigs = {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}
        if "serving_default" not in sigs:
            raise child.ChildFailure(
                "no_serving_default",
                f"{path} has no 'serving_default' signature (it has {sorted(sigs) or 'none'}); "
                "requests without a signature name would fail",
            )
        for name, sig in sorted(sigs.items()):
            report[name] = _run_signature(
                sess, name, sig, reference if name == "serving_default" else {}, rtol, atol
            )
    t_run = time.monotonic()
    weights = weight_parity(path, req["checkpoint"]) if req.get("checkpoint") else None
    t_weights = time.monotonic()
    failed = [n for n, r in report.items() if not r["ok"]]
    result: dict[str, Any] = {
        "ok": not failed,
        "signatures": report,
        "durations": {
            "load_seconds": round(t_load - t0, 3),
            "run_seconds": round(t_run - t_load, 3),
            "weights_seconds": round(t_weights - t_run, 3),
        },
    }
    if weights is not None:
        result["weights"] = weights
    if failed:
        result.update(
            reason="output_mismatch"
            if any(report[n].get("reason") == "output_mismatch" for n in failed)
            else "signature_failed",
            error="; ".join(f"{n}: {report[n]['error']}" for n in failed),
            permanent=True,
        )
    return result


def _run_signature(
    sess: Any, name: str, sig: Any, reference: dict[str, Any], rtol: float, atol: float
) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    feed = {}
    shapes = {}
    for key, info in sig.inputs.items():
        dtype = tf.dtypes.as_dtype(info.dtype)
        if f"in/{key}" in reference:
            value = reference[f"in/{key}"]
        else:
            dims = [d.size for d in info.tensor_shape.dim]
            value = child.synth_input(f"{key}", dtype.name, dims)
        feed[info.name] = value
        shapes[key] = list(np.shape(value))
    fetch = {key: info.name for key, info in sig.outputs.items()}
    entry: dict[str, Any] = {"method": sig.method_name, "inputs": shapes}
    try:
        out = sess.run(fetch, feed)
    except Exception as e:
        # TensorFlow puts a generic "Graph execution error:" first; keep the cause.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith("Graph execution error")] or lines
        msg = lines[0] if lines else type(e).__name__
        return dict(entry, ok=False, reason="run_failed", error=f"run failed: {msg}")
    entry["outputs"] = {k: list(np.shape(v)) for k, v in out.items()}
    for k, v in out.items():
        arr = np.asarray(v)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return dict(entry, ok=False, reason="not_finite", error=f"output {k!r} is not finite")
    if reference:
        expected = {k[4:] for k in reference if k.startswith("out/")}
        if expected != set(out):
            return dict(
                entry,
                ok=False,
                reason="output_mismatch",
                error=f"outputs {sorted(out)} differ from the exporter's {sorted(expected)}",
            )
        worst = 0.0
        for k, v in out.items():
            ref = reference[f"out/{k}"]
            arr = np.asarray(v)
            if arr.shape != ref.shape:
                return dict(
                    entry,
                    ok=False,
                    reason="output_mismatch",
                    error=f"output {k!r} has shape {arr.shape}, the exporter's {ref.shape}",
                )
            if arr.dtype.kind in "fc":
                diff = float(np.max(np.abs(arr - ref))) if arr.size else 0.0
                worst = max(worst, diff)
                if not np.allclose(arr, ref, rtol=rtol, atol=atol):
                    return dict(
                        entry,
                        ok=False,
                        reason="output_mismatch",
                        max_abs_diff=diff,
                        error=f"output {k!r} differs from the exporter's by up to {diff:.3g} "
                        f"(rtol={rtol}, atol={atol})",
                    )
            elif not np.array_equal(arr, ref):
                return dict(
                    entry,
                    ok=False,
                    reason="output_mismatch",
                    error=f"output {k!r} differs from the exporter's",
                )
        entry["max_abs_diff"] = worst
    return dict(entry, ok=True)


def main(argv: list[str]) -> int:
    # Validation never needs the GPU the trainer is using.
    req = child.begin(argv, validator=True)
    try:
        result = validate(req)
    except child.ChildFailure as e:
        result = child.failure(e.reason, str(e), permanent=e.permanent)
    except MemoryError:
        result = child.failure("out_of_memory", "validation ran out of memory", permanent=False)
    except Exception as e:
        tb = traceback.format_exc(limit=8)
        result = child.environment_failure(e) or child.failure(
            "validate_error", f"{type(e).__name__}: {e}\n{tb}", permanent=True
        )
    result["warm"] = bool(req.get("warm"))
    return child.finish(Path(req["result"]), result)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
