"""Export a TF1 ``Saver`` checkpoint: import its ``.meta`` graph, restore, and save it for serving.

Runs in the worker child (imports TensorFlow). The scanner is
:mod:`daemon.sources.tf1_checkpoint`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from daemon.children import reference, runtime, samples
from daemon.protocol import ExporterResult, ExportRequest


def export(req: ExportRequest) -> ExporterResult:
    """Import the pinned ``.meta``, restore, and write a ``serve`` SavedModel."""
    import tensorflow as tf

    v1 = tf.compat.v1
    options: Mapping[str, Any] = req["options"]
    prefix = req["checkpoint"]
    t0 = time.monotonic()
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as sess:
        try:
            saver = v1.train.import_meta_graph(prefix + ".meta", clear_devices=True)
        except Exception as e:
            raise runtime.ChildFailure(
                "checkpoint_corrupt", f"cannot import the graph {prefix}.meta: {e}"
            ) from e
        if saver is None:
            raise runtime.ChildFailure("no_variables", f"the graph {prefix}.meta has no variables")
        try:
            saver.restore(sess, prefix)
        except Exception as e:
            raise runtime.ChildFailure("restore_mismatch", f"cannot restore {prefix}: {e}") from e
        # Lookup tables are not in the checkpoint: fill them as the server will.
        init_tables = v1.tables_initializer()
        sess.run(init_tables)
        t_restore = time.monotonic()

        def tensors(kind: str) -> dict[str, Any]:
            out = {}
            for key, name in options[kind].items():
                try:
                    out[key] = graph.get_tensor_by_name(name)
                except (KeyError, ValueError) as e:
                    raise runtime.ChildFailure(
                        "no_signature",
                        f"{kind} {key} = {name!r}: no such tensor in {prefix}.meta ({e})",
                    ) from e
            return out

        inputs, outputs = tensors("inputs"), tensors("outputs")
        sig = v1.saved_model.signature_def_utils.build_signature_def(
            inputs={k: v1.saved_model.utils.build_tensor_info(t) for k, t in inputs.items()},
            outputs={k: v1.saved_model.utils.build_tensor_info(t) for k, t in outputs.items()},
            method_name=options["method_name"],
        )
        # Requests without a signature name use serving_default: always offer it.
        signatures = {"serving_default": sig, options["signature_name"]: sig}
        shapes = {
            key: (t.dtype.name, t.shape.as_list() if t.shape.rank is not None else [])
            for key, t in inputs.items()
        }
        feeds = samples.reference_inputs(
            req, shapes, {k: runtime.synth_input(k, *shapes[k]) for k in shapes}
        )
        values = sess.run(outputs, {inputs[k]: v for k, v in feeds.items()})
        # SavedModelBuilder refuses an existing folder; the export folder exists
        # (the supervisor made it), so build inside it and move the result up.
        inner = os.path.join(req["export_dir"], "saved_model")
        builder = v1.saved_model.Builder(inner)
        builder.add_meta_graph_and_variables(
            sess,
            [v1.saved_model.tag_constants.SERVING],
            signature_def_map=signatures,
            main_op=init_tables,
            strip_default_attrs=True,
        )
        builder.save()
    for entry in os.listdir(inner):
        os.rename(os.path.join(inner, entry), os.path.join(req["export_dir"], entry))
    os.rmdir(inner)
    reference.save(req["reference"], feeds, values)
    return {
        "kind": "tf1_checkpoint",
        "inputs": {k: [t.dtype.name, t.shape.as_list()] for k, t in inputs.items()},
        "outputs": sorted(outputs),
        "variables": len(graph.get_collection(v1.GraphKeys.GLOBAL_VARIABLES)),
        "saved_counters": {},
        "durations": {
            "restore_seconds": round(t_restore - t0, 3),
            "save_seconds": round(time.monotonic() - t_restore, 3),
        },
    }
