"""Write small real TF2 checkpoints for the source tests, in a subprocess.

``python write_checkpoints.py DIR`` writes, with real TensorFlow:

- ``DIR/managed``: three ``tf.train.CheckpointManager`` saves (``ckpt-1..3``)
  of a module with one variable, plus the ``checkpoint`` state file;
- ``DIR/restarted``: a second run whose ``ckpt-1`` holds different values;
- ``DIR/plain``: ``tf.train.Checkpoint.write("DIR/plain/model")``: no ``-N``
  suffix and no state file, with a ``step`` counter saved inside.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf


def main(root: str) -> None:
    for sub, start in (("managed", 1.0), ("restarted", 100.0)):
        module = tf.Module()
        module.w = tf.Variable(tf.fill([8], start))
        ckpt = tf.train.Checkpoint(model=module)
        manager = tf.train.CheckpointManager(ckpt, os.path.join(root, sub), max_to_keep=5)
        for _ in range(3 if sub == "managed" else 1):
            module.w.assign_add(tf.ones([8]))
            manager.save()
    module = tf.Module()
    module.w = tf.Variable(tf.zeros([8]))
    step = tf.Variable(1234, dtype=tf.int64)
    tf.train.Checkpoint(model=module, step=step).write(os.path.join(root, "plain", "model"))


if __name__ == "__main__":
    main(sys.argv[1])
