"""A one-variable ``tf.Module``: the builder of the burst test, and its checkpoint writer.

``python fault_models.py DIR N`` writes N real TF2 checkpoints ``DIR/ckpt-1`` ..
``DIR/ckpt-N`` with ``tf.train.Checkpoint.write`` in one process (a few
seconds for 1,000), each holding a different value, so each ``.index`` (which
records a checksum of every tensor) and therefore each fingerprint differs.
Their mtimes are set one second apart, oldest first, so write order is
defined; a ``checkpoint`` state file names the newest five, as
``CheckpointManager`` would.

As a builder (``builder = "fault_models:scale"``) it returns the same module,
whose ``__call__`` carries an ``input_signature``, for the daemon to export.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf


class Scale(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable([1.0], name="w")

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
    def __call__(self, x: Any) -> Any:
        return x * self.w


def scale() -> Scale:
    return Scale()


def write_burst(directory: str, n: int) -> None:
    module = Scale()
    ckpt = tf.train.Checkpoint(model=module)
    t0 = time.time_ns() - (n + 10) * 10**9
    for i in range(1, n + 1):
        module.w.assign([float(i)])
        prefix = os.path.join(directory, f"ckpt-{i}")
        ckpt.write(prefix)
        t = t0 + i * 10**9
        for suffix in (".index", ".data-00000-of-00001"):
            os.utime(prefix + suffix, ns=(t, t))
    names = [f"ckpt-{i}" for i in range(max(1, n - 4), n + 1)]
    state = f'model_checkpoint_path: "ckpt-{n}"\n' + "".join(
        f'all_model_checkpoint_paths: "{name}"\n' for name in names
    )
    with open(os.path.join(directory, "checkpoint"), "w", encoding="utf-8") as f:
        f.write(state)


if __name__ == "__main__":
    write_burst(sys.argv[1], int(sys.argv[2]))
