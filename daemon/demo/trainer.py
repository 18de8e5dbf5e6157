"""A tiny training job that writes checkpoints with ``tf.train.CheckpointManager``.

``python -m daemon.demo.trainer CHECKPOINT_DIR --checkpoints N --interval S``
trains :func:`daemon.demo.model.build_model` on generated data (y = w.x + b
plus noise) and saves a checkpoint every ``--steps-per-checkpoint`` steps,
keeping the last 3 (``max_to_keep``), exactly as a real trainer would. The
model is stored under the checkpoint key ``model``.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint_dir")
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--steps-per-checkpoint", type=int, default=50)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between checkpoints")
    p.add_argument("--max-to-keep", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from daemon.demo.model import build_model

    rng = np.random.default_rng(args.seed)
    tf.random.set_seed(args.seed)
    w = rng.normal(size=(4, 1)).astype("float32")
    model = build_model()
    optimizer = tf.keras.optimizers.Adam(learning_rate=0.01)
    step = tf.Variable(0, dtype=tf.int64, name="step")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    manager = tf.train.CheckpointManager(ckpt, args.checkpoint_dir, max_to_keep=args.max_to_keep)

    for _ in range(args.checkpoints):
        for _ in range(args.steps_per_checkpoint):
            x = rng.normal(size=(32, 4)).astype("float32")
            y = x @ w + 0.5 + rng.normal(scale=0.1, size=(32, 1)).astype("float32")
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            step.assign_add(1)
        path = manager.save(checkpoint_number=int(step.numpy()))
        print(f"trainer: step {int(step.numpy())} loss {float(loss):.4f} saved {path}", flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
