"""Serving modules as builders, shaped like Model Garden's vision ``ClassificationModule``.

Model Garden is not installed: :class:`ClassificationModule` mimics its
export module (a ``tf.Module`` holding the Keras model as ``model``, uint8
images in, cast, mean/std normalisation and resize in the graph, ``logits``
and ``probs`` out, and ``get_inference_signatures(function_keys)``). The
trainer (:func:`train`) saves the plain Keras model under the key ``model``
with ``tf.train.CheckpointManager``, as Model Garden's trainer does.

Run as ``python serving_modules.py CKPT_DIR N`` to write N checkpoints.
"""

from __future__ import annotations

import sys
from typing import Any

#: The image the module takes, and the smaller one the model takes after resizing.
IMAGE_SIZE = 32
MODEL_SIZE = 24
CLASSES = 5
#: Model Garden's ImageNet mean and std (in 0..255), per channel.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def classifier() -> Any:
    """The Keras model the trainer trains: normalised 24x24 RGB in, class logits out."""
    import keras

    inputs = keras.Input(shape=(MODEL_SIZE, MODEL_SIZE, 3), name="image")
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # Wide enough that the weights, not the object graph, fill most of a checkpoint.
    x = keras.layers.Dense(128, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(x), name="classifier")


def _module_class() -> Any:
    import tensorflow as tf

    class ClassificationModule(tf.Module):  # type: ignore[misc]
        """Like Model Garden's: preprocessing and output names around ``self.model``."""

        def __init__(self, model: Any) -> None:
            super().__init__(name="classification_module")
            self.model = model

        def _preprocess(self, images: Any) -> Any:
            x = tf.cast(images, tf.float32)
            x = (x - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)
            return tf.image.resize(x, [MODEL_SIZE, MODEL_SIZE])

        def _outputs(self, images: Any) -> dict[str, Any]:
            logits = self.model(self._preprocess(images), training=False)
            return {"logits": logits, "probs": tf.nn.softmax(logits)}

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8, name="inputs")
            ]
        )
        def serve(self, images: Any) -> dict[str, Any]:
            return self._outputs(images)

        @tf.function
        def inference_from_image_tensors(self, inputs: Any) -> dict[str, Any]:
            return self._outputs(inputs)

        def get_inference_signatures(self, function_keys: dict[str, str]) -> dict[str, Any]:
            """Model Garden's API: concrete functions by signature key."""
            signatures = {}
            for key, def_name in function_keys.items():
                if key != "image_tensor":
                    raise ValueError(f"unsupported function key {key!r}")
                spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8, name="inputs")
                signatures[def_name] = self.inference_from_image_tensors.get_concrete_function(spec)
            return signatures

    return ClassificationModule


def module() -> Any:
    """A :class:`ClassificationModule` around a fresh :func:`classifier`."""
    return _module_class()(classifier())


def model_garden_style() -> Any:
    """The builder as for Model Garden: module, restore target, the module's own signatures."""
    m = module()
    return m, m.model, m.get_inference_signatures({"image_tensor": "serving_default"})


def module_and_model() -> Any:
    """The builder as a pair: the module's input-signature tf.function becomes serving_default."""
    m = module()
    return m, m.model


def module_alone() -> Any:
    """The wrong builder: the module, so the checkpoint's model is restored into the module."""
    return module()


def train(ckpt_dir: str, checkpoints: int, steps: int = 2) -> None:
    """Train :func:`classifier` on random normalised images; a checkpoint every ``steps``.

    Plain SGD (no optimizer slots), so the checkpoint is mostly the model's
    weights and a linked export links its shards.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = classifier()
    optimizer = keras.optimizers.SGD(0.05)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    manager = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, MODEL_SIZE, MODEL_SIZE, 3)).astype("float32")
    y = rng.integers(0, CLASSES, 8)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for _ in range(checkpoints):
        for _ in range(steps):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            step.assign_add(1)
        manager.save(checkpoint_number=int(step.numpy()))


if __name__ == "__main__":
    train(sys.argv[1], int(sys.argv[2]))
