"""Real TensorFlow checkpoints for the remote-directory and fetch tests, written in a subprocess.

:func:`write_checkpoints` runs TensorFlow once (a few seconds) and writes
under ``root``:

- ``adam/``: three ``tf.train.CheckpointManager`` saves (``ckpt-1..3``) of a
  Keras model of two wide Dense layers trained with Adam, so each checkpoint
  holds the model's weights and twice as many bytes of optimizer slots;
- ``sharded/``: one save of the same objects split into several data shards
  (``MaxShardSizePolicy``), if this TensorFlow can;
- ``mixed/``: strings, int64, bool, float16 and an empty tensor;
- ``tf_index.json``: every entry of every index above as TensorFlow's own
  ``BundleEntryProto``/``BundleHeaderProto`` parse it;
- ``needed.json``: the checkpoint keys the model reads (its variables, as the
  worker's weights map records them, and the object graph; not the optimizer's);
- ``values.json``: the sha256 of each model variable's value in ``adam/ckpt-3``.

:func:`restored_digests` restores the same model from a (possibly sparse,
fetched) prefix in a subprocess and returns its variables' digests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import child_env

_MODEL = r"""
import hashlib, json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf
import keras

def build():
    inputs = keras.Input(shape=(256,), name="x")
    hidden = keras.layers.Dense(384, activation="relu", name="wide")(inputs)
    outputs = keras.layers.Dense(256, name="out")(hidden)
    return keras.Model(inputs, outputs)

def digests(model):
    return {v.path: hashlib.sha256(np.ascontiguousarray(v.numpy()).tobytes()).hexdigest()
            for v in model.variables}
"""

_WRITE = (
    _MODEL
    + r"""
from tensorflow.core.protobuf import tensor_bundle_pb2
from daemon.formats import bundle

root = sys.argv[1]
tf.random.set_seed(0)
model = build()
optimizer = keras.optimizers.Adam(1e-3)
step = tf.Variable(0, dtype=tf.int64)
ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
manager = tf.train.CheckpointManager(ckpt, os.path.join(root, "adam"), max_to_keep=5)
rng = np.random.default_rng(0)
for _ in range(3):
    x = rng.normal(size=(8, 256)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - x))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    step.assign_add(1)
    manager.save(checkpoint_number=int(step.numpy()))
json.dump(digests(model), open(os.path.join(root, "values.json"), "w"))
try:
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=400_000)
    options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    ckpt.write(os.path.join(root, "sharded", "ckpt-3"), options=options)
except (AttributeError, TypeError) as e:
    print("no sharding policy in this TensorFlow:", e)
tf.train.Checkpoint(
    text=tf.Variable([b"checkpoint", b"", b"\x00\xff bytes"]),
    step=tf.Variable(-1234, dtype=tf.int64),
    flags=tf.Variable([True, False, True]),
    half=tf.Variable([[1.5, -2.0]], dtype=tf.float16),
    empty=tf.Variable(tf.zeros([0, 3])),
).write(os.path.join(root, "mixed", "ckpt"))

dump = {}
for sub in ("adam", "sharded", "mixed"):
    folder = os.path.join(root, sub)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".index"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        items = {}
        for key, value in bundle.table_items(data):
            if key == b"":
                h = tensor_bundle_pb2.BundleHeaderProto()
                h.ParseFromString(value)
                items[""] = h.num_shards
                continue
            p = tensor_bundle_pb2.BundleEntryProto()
            p.ParseFromString(value)
            items[key.decode("utf-8", "replace")] = [
                int(p.dtype), [d.size for d in p.shape.dim], p.shard_id, p.offset, p.size,
                p.crc32c, len(p.slices) > 0,
            ]
        dump[f"{sub}/{name}"] = items
json.dump(dump, open(os.path.join(root, "tf_index.json"), "w"))
# What the model reads, as the worker's weights map records it (Keras 3 keeps
# the model's variables under the optimizer's keys when both are saved).
from daemon.children import incremental
prefix = os.path.join(root, "adam", "ckpt-3")
status = tf.train.Checkpoint(model=build()).read(prefix)
restored = incremental.restored_from(status, prefix)
assert len(restored) == 4, restored
needed = sorted(restored.values()) + ["_CHECKPOINTABLE_OBJECT_GRAPH"]
json.dump(needed, open(os.path.join(root, "needed.json"), "w"))
"""
)

_RESTORE = (
    _MODEL
    + r"""
model = build()
tf.train.Checkpoint(model=model).read(sys.argv[1]).expect_partial()
print("DIGESTS " + json.dumps(digests(model)))
"""
)


def _run(script: str, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def write_checkpoints(root: Path) -> Path:
    """Write the checkpoints described in the module docstring under ``root``; returns ``root``."""
    _run(_WRITE, str(root))
    return root


def restored_digests(prefix: Path) -> dict[str, Any]:
    """sha256 of each model variable after restoring the model from ``prefix`` with TensorFlow."""
    out = _run(_RESTORE, str(prefix))
    line = next(ln for ln in out.splitlines() if ln.startswith("DIGESTS "))
    digests: dict[str, Any] = json.loads(line[len("DIGESTS ") :])
    return digests
