"""A CPU training loop that reports its step time: the job the daemon must not slow.

``python bench/train_loop.py SECONDS [STEPS.json]``: trains a 4-layer MLP
(batch 256, 1024 wide) with Adam for SECONDS after a warm-up, with
TensorFlow's default thread pools (all CPUs), and prints the median and mean
step time as JSON. With STEPS.json it also writes every step there as
``[wall-clock start, seconds]``, so that the bench can sort steps by what
else was running at the time.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def main() -> None:
    seconds = float(sys.argv[1])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    model = keras.Sequential(
        [keras.Input((256,))]
        + [keras.layers.Dense(1024, activation="relu") for _ in range(3)]
        + [keras.layers.Dense(10)]
    )
    optimizer = keras.optimizers.Adam()
    x = tf.random.normal((256, 256))
    y = tf.random.uniform((256,), maxval=10, dtype=tf.int32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    for _ in range(10):  # trace and warm up
        step()
    times, starts = [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        starts.append(time.time())
        t0 = time.monotonic()
        step().numpy()
        times.append(time.monotonic() - t0)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump([[s, t] for s, t in zip(starts, times, strict=True)], f)
    print(
        json.dumps(
            {
                "steps": len(times),
                "median_step_seconds": statistics.median(times),
                "mean_step_seconds": statistics.fmean(times),
            }
        )
    )


if __name__ == "__main__":
    main()
