"""Write N checkpoints of a bench model with ``tf.train.CheckpointManager``.

``python bench/make_checkpoints.py small|resnet50 DIR N``: each checkpoint
holds different weights (one variable nudged per save), under the key
``model`` with a saved ``step``, as a trainer would write them.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    name, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import models
    import tensorflow as tf

    model = getattr(models, name)()
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, step=step)
    manager = tf.train.CheckpointManager(ckpt, out, max_to_keep=None)
    first = model.trainable_variables[0]
    for i in range(1, n + 1):
        first.assign_add(tf.random.normal(first.shape, stddev=0.01, seed=i))
        step.assign(i * 100)
        manager.save(checkpoint_number=i * 100)


if __name__ == "__main__":
    main()
