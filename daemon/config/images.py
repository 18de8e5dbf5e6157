"""``[models.image_preprocessing]``: what an image input's pixels become before the model.

The ``image_tensor`` and ``encoded_image`` serving inputs take uint8 pixels
(0 to 255). A model is trained on whatever its input pipeline made of them:
the same 0..255 values, 0..1, or normalised per channel (Model Garden's
vision models: ``(x - 255 * mean) / (255 * std)``). Nothing in a checkpoint
says which, and a wrong guess publishes a version that answers wrongly yet
passes validation (its reference outputs come from the same wrapper). So the
daemon does not guess: with those input types the table is required, and it
says either

- ``scale``, ``mean``, ``std``: ``(float(x) * scale - mean) / std`` per
  channel (``mean`` and ``std``: one number, or one per channel; ``scale = 1.0``
  alone says "the model takes 0..255"), or
- ``function = "module:function"``: called in the graph on the float32 batch
  ``[batch, height, width, channels]`` of 0..255 values, returning what the
  model takes (imported like the builder, with ``python_path``).

Pure: :func:`parse` checks a table and returns an :class:`ImagePreprocessing`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.config.schema import Schema, apply_schema
from daemon.protocol import ImagePreprocessingSpec

#: The input types whose pixels this table describes.
IMAGE_INPUT_TYPES = ("image_tensor", "encoded_image")
#: Shown when the table is missing: what to write for the usual cases.
EXAMPLES = (
    "scale = 1.0 (the model takes 0..255), scale = 0.00392156862745098 (0..1), "
    "mean = [123.675, 116.28, 103.53] with std = [58.395, 57.12, 57.375] "
    '(Model Garden\'s vision models), or function = "module:function"'
)


@dataclass(frozen=True, slots=True)
class ImagePreprocessing:
    """``(float(pixels) * scale - mean) / std``, or ``function`` instead."""

    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    function: str = ""

    def spec(self) -> ImagePreprocessingSpec:
        """As the export request carries it."""
        return {
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "function": self.function,
        }


def _numbers(v: Any) -> str | None:
    ok = all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    return None if v and ok else "must be a non-empty list of numbers (one, or one per channel)"


def _finite(v: Any) -> str | None:
    return None if math.isfinite(v) and v != 0 else "must be a finite number other than 0"


def _function(v: Any) -> str | None:
    from daemon.config.loading import BUILDER_RE

    return None if BUILDER_RE.fullmatch(v) else 'must be "module:function"'


SCHEMA: Schema = {
    "scale": ((int, float), 1.0, _finite),
    "mean": ((list,), [0.0], _numbers),
    "std": ((list,), [1.0], _numbers),
    "function": ((str,), "", _function),
}


def parse(
    table: Mapping[str, Any], input_type: str, where: str, problems: list[str]
) -> ImagePreprocessing | None:
    """The model's preprocessing (None where its input type has none); problems appended."""
    where = f"{where}.image_preprocessing"
    if input_type not in IMAGE_INPUT_TYPES:
        if table:
            problems.append(
                f"{where}: only for input_type = "
                f"{' or '.join(repr(t) for t in IMAGE_INPUT_TYPES)}; remove it"
            )
        return None
    if not table:
        problems.append(
            f"{where}: missing with input_type = {input_type!r}: say what the model takes "
            f"instead of the uint8 pixels, for example {EXAMPLES}"
        )
        return None
    n = len(problems)
    values = apply_schema(table, SCHEMA, where, problems)
    if len(problems) > n:
        return None
    if values["function"] and set(table) - {"function"}:
        problems.append(f"{where}.function: give either function or scale/mean/std, not both")
        return None
    if any(x == 0 for x in values["std"]):
        problems.append(f"{where}.std: must not contain 0 (the pixels are divided by it)")
        return None
    return ImagePreprocessing(
        scale=float(values["scale"]),
        mean=tuple(float(x) for x in values["mean"]),
        std=tuple(float(x) for x in values["std"]),
        function=values["function"],
    )
