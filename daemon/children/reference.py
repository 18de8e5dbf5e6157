"""The reference file of an export: the inputs it was run on and what the in-memory model answered.

The exporter writes it (an ``.npz`` in the job's staging folder, path in the
request's ``reference``); the validator must get the same outputs from the
SavedModel along TF Serving's path, and the worker turns its inputs into
warmup records. Inputs are stored under ``in/NAME``, outputs under
``out/NAME``: this module is the only place that spells the two prefixes.
A linked export (:func:`daemon.children.incremental.link`) built no model and
writes an empty reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_INPUT = "in/"
_OUTPUT = "out/"


@dataclass(frozen=True)
class Reference:
    """``serving_default``'s reference inputs and outputs by name (empty: none recorded)."""

    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs)


def save(path: str, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
    """Write the reference file (both may be empty: a linked export's)."""
    import numpy as np

    arrays = {f"{_INPUT}{k}": v for k, v in inputs.items()}
    arrays.update({f"{_OUTPUT}{k}": np.asarray(v) for k, v in outputs.items()})
    np.savez(path, **arrays)


def load(path: str) -> Reference:
    """Read a reference file written by :func:`save`."""
    import numpy as np

    with np.load(path, allow_pickle=True) as z:
        inputs = {k[len(_INPUT) :]: z[k] for k in z.files if k.startswith(_INPUT)}
        outputs = {k[len(_OUTPUT) :]: z[k] for k in z.files if k.startswith(_OUTPUT)}
    return Reference(inputs, outputs)
