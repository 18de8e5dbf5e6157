"""Builders the benchmarks export: the demo's tiny model and ResNet-50."""

from __future__ import annotations

from typing import Any

from daemon.demo.model import build_model


def small() -> Any:
    """The demo model: 4 inputs, one hidden layer of 16, one output (97 weights)."""
    return build_model()


def resnet50() -> Any:
    """``keras.applications.ResNet50`` with random weights (25.6 M parameters, 98 MiB)."""
    import keras

    return keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))


BUILDERS = {"small": "models:small", "resnet50": "models:resnet50"}
