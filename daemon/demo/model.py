"""The demo's model builder: what a user's ``builder = "module:function"`` looks like."""

from __future__ import annotations

from typing import Any


def build_model() -> Any:
    """A small regression MLP with a named input, built (variables exist) on return."""
    import keras

    inputs = keras.Input(shape=(4,), name="features")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(1, name="prediction")(hidden)
    return keras.Model(inputs, outputs, name="demo_regressor")
