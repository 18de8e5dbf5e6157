"""Incremental export: reuse a published version's traced graph, write only new weights.

Tracing and serialising the serving graph is most of a full export's time
(for ResNet-50, seconds of tracing against well under a second of writing the
weights). When a checkpoint comes from the same model as an already
published version, made by the same builder and config, the graph cannot
have changed: only the variable values did. Then the worker copies that
version's ``saved_model.pb`` (and ``assets/``) and writes the restored values
into ``variables/`` under exactly the keys the graph's restore op reads.

How a key finds its value: a TF2 SavedModel shares node ids between its
object graph (``saved_model.pb``: each variable node has its variable's name,
dtype and shape) and its variables checkpoint's object graph (each node's
``checkpoint_key``). So each key maps to a variable *name*, and each name to
the one variable of the restored model with that name. Anything that does not
line up exactly, a name used twice, a variable more or less, another dtype or
shape, a checkpoint entry that is not a variable (a lookup table), gives
:class:`Fallback` and the worker does a full export. The validator then
proves the result as it proves any export (weight parity against the
checkpoint, outputs against the in-memory model); if it still fails, the
supervisor retries the checkpoint once with a full export before blaming it.

``fingerprint.pb`` is not copied: it hashes the old variables. The server
reads it only for logging; TensorFlow writes it anew on a full export.

:func:`export_key` runs in the supervisor (no TensorFlow); the rest runs in
the worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The checkpoint entry holding the object graph (copied as it is).
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
#: What is not taken over from the template version.
_NOT_COPIED = frozenset({"variables", "assets.extra", "fingerprint.pb"})


class Fallback(Exception):
    """The incremental path does not apply; the message says why (logged, then a full export)."""


def export_key(identity: Mapping[str, Any], builder_file: Path | None) -> str:
    """A digest of everything that shapes the traced graph apart from the weights.

    ``identity`` holds the model's export settings (source, builder, inputs,
    tool version...); ``builder_file``'s bytes are added, so editing the
    builder's module makes the next export a full one. Two exports with the
    same key trace the same graph (code the builder imports from other
    modules is not hashed; the validator's output comparison and the full
    retry cover it).
    """
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    if builder_file is not None:
        try:
            h.update(builder_file.read_bytes())
        except OSError:
            h.update(b"unreadable")
    return "sha256:" + h.hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that trace the graph (read without importing them)."""
    from importlib import metadata

    out = {}
    for dist in ("tensorflow", "tensorflow-cpu", "keras"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def variable_keys(template: str) -> tuple[dict[str, tuple[str, Any, list[int]]], bytes]:
    """``checkpoint key -> (variable name, dtype, shape)`` of a SavedModel's variables.

    Also returns the variables checkpoint's object graph entry, which the new
    checkpoint carries unchanged.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2, trackable_object_graph_pb2

    try:
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString(Path(template, "saved_model.pb").read_bytes())
        reader = tf.train.load_checkpoint(os.path.join(template, "variables", "variables"))
        graph_bytes = reader.get_tensor(OBJECT_GRAPH_KEY)
        ckpt_graph = trackable_object_graph_pb2.TrackableObjectGraph()
        ckpt_graph.ParseFromString(graph_bytes)
    except Exception as e:
        raise Fallback(f"cannot read the template version {template}: {e}") from e
    if len(proto.meta_graphs) != 1:
        raise Fallback(f"{template} has {len(proto.meta_graphs)} MetaGraphs")
    nodes = proto.meta_graphs[0].object_graph_def.nodes
    if len(nodes) != len(ckpt_graph.nodes):
        raise Fallback(f"{template}: the object graph and the checkpoint's differ in size")
    keys: dict[str, tuple[str, Any, list[int]]] = {}
    for node, ckpt_node in zip(nodes, ckpt_graph.nodes, strict=True):
        attrs = [a.checkpoint_key for a in ckpt_node.attributes]
        if node.WhichOneof("kind") != "variable":
            if attrs:
                raise Fallback(f"{template} saves state that is not a variable ({attrs[0]})")
            continue
        var = node.variable
        if len(attrs) != 1:
            raise Fallback(f"{template}: variable {var.name} has {len(attrs)} checkpoint keys")
        shape = [d.size for d in var.shape.dim]
        keys[attrs[0]] = (var.name, tf.dtypes.as_dtype(var.dtype), shape)
    saved = set(reader.get_variable_to_shape_map()) - {OBJECT_GRAPH_KEY}
    if saved != set(keys):
        raise Fallback(f"{template}: checkpoint entries {sorted(saved ^ set(keys))[:3]} unmatched")
    return keys, graph_bytes


def write(obj: Any, template: str, export_dir: str) -> int:
    """Write ``export_dir`` as ``template``'s graph with ``obj``'s current variable values.

    Returns the number of variables written; raises :class:`Fallback` (with
    ``export_dir`` emptied again) when the template does not fit ``obj``.
    """
    import tensorflow as tf

    keys, graph_bytes = variable_keys(template)
    by_name: dict[str, Any] = {}
    for var in obj.variables:
        # A Keras 3 variable wraps the tf.Variable that the SavedModel names.
        v = var if isinstance(var, tf.Variable) else getattr(var, "value", var)
        name = v.name.split(":")[0]
        if name in by_name and by_name[name] is not v:
            raise Fallback(f"two variables of the model are named {name!r}")
        by_name[name] = v
    template_names = {name for name, _, _ in keys.values()}
    if template_names != set(by_name):
        diff = sorted(template_names ^ set(by_name))
        raise Fallback(f"the model's variables differ from the template's ({', '.join(diff[:3])})")
    names, tensors = [], []
    for key, (name, dtype, shape) in sorted(keys.items()):
        v = by_name[name]
        if v.dtype != dtype or v.shape.as_list() != shape:
            raise Fallback(
                f"variable {name} is {v.dtype.name} {v.shape.as_list()}, the template's "
                f"{dtype.name} {shape}"
            )
        names.append(key)
        tensors.append(tf.convert_to_tensor(v))
    names.append(OBJECT_GRAPH_KEY)
    tensors.append(tf.constant(graph_bytes))
    try:
        for entry in os.listdir(template):
            if entry in _NOT_COPIED:
                continue
            src, dst = os.path.join(template, entry), os.path.join(export_dir, entry)
            if os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        os.makedirs(os.path.join(export_dir, "variables"), exist_ok=True)
        # One SaveV2 writes variables.index and variables.data-00000-of-00001,
        # the layout a single-shard tf.saved_model.save writes and the graph's
        # restore op reads.
        tf.raw_ops.SaveV2(
            prefix=os.path.join(export_dir, "variables", "variables"),
            tensor_names=names,
            shape_and_slices=[""] * len(names),
            tensors=tensors,
        )
    except FileNotFoundError as e:
        # The template version was removed meanwhile (rollback, retention by hand).
        _empty(export_dir)
        raise Fallback(f"the template version went away: {e}") from e
    return len(names) - 1


def _empty(folder: str) -> None:
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
