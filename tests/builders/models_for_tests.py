"""Builders used by the end-to-end tests (imported by the worker via python_path)."""

from __future__ import annotations

import time
from typing import Any

from daemon.demo.model import build_model


def extra_layer() -> Any:
    """Same as the demo model plus a layer the checkpoint does not have."""
    import keras

    inputs = keras.Input(shape=(4,), name="features")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    hidden = keras.layers.Dense(16, activation="relu", name="unexpected")(hidden)
    outputs = keras.layers.Dense(1, name="prediction")(hidden)
    return keras.Model(inputs, outputs)


def wrong_shape() -> Any:
    """The demo model with a hidden layer of the wrong width."""
    import keras

    inputs = keras.Input(shape=(4,), name="features")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(1, name="prediction")(hidden)
    return keras.Model(inputs, outputs)


def slow() -> Any:
    """The demo model, after a long pause: an export that is still running when stopped."""
    time.sleep(120)
    return build_model()


def slowish() -> Any:
    """The demo model after a few seconds: an export still running when a signal comes."""
    time.sleep(6)
    return build_model()


def raises() -> Any:
    raise RuntimeError("builder failed on purpose")


def tiny_cnn() -> Any:
    """An image model: 8x8 RGB in, one score out."""
    import keras

    inputs = keras.Input(shape=(8, 8, 3), name="image")
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="score")(x))


#: The words ``vocabulary`` knows; any other word is out of vocabulary (index 0).
WORDS = ["red", "green", "blue"]


def vocabulary() -> Any:
    """Two words in, one score out, through a ``StringLookup`` (a lookup table resource)."""
    import keras

    inputs = keras.Input(shape=(2,), dtype="string", name="words")
    x = keras.layers.StringLookup(vocabulary=WORDS, name="lookup")(inputs)
    x = keras.layers.Embedding(len(WORDS) + 1, 3, name="embedding")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="score")(x))
