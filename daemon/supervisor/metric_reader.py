"""Reading a gate's metric for a checkpoint: from a JSON (Lines) file or TensorBoard event files.

The gate's decision itself is pure (:mod:`daemon.rules.gate`); this is the
I/O that feeds it, on the supervisor side (TensorBoard files are decoded by
:mod:`daemon.formats.tensorboard`, without TensorFlow).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from daemon.formats.tensorboard import EventFileReader
from daemon.rules.gate import JSON_FILE_PLACEHOLDERS, Gate


def _records(text: str) -> list[Any]:
    """The records of a metrics file: one JSON value (object or list), or JSON Lines."""
    try:
        data = json.loads(text)
    except ValueError:
        records = []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line being written (or torn); the others still count
        return records
    return data if isinstance(data, list) else [data]


def read_json_metric(
    path: Path, metric: str, step: int | None, per_checkpoint: bool
) -> float | None:
    """The value of ``metric`` for ``step`` in a JSON metrics file, or None if not there yet.

    Records are objects; the one whose ``step`` equals the checkpoint's counts
    (the last such one). A file named per checkpoint (``json_file`` with
    ``{name}`` or ``{step}``) may hold a record without ``step``. A file that
    does not parse is treated as not written yet (the trainer may be writing
    it); a value that is not a number raises ValueError naming the file.
    """
    try:
        text = path.read_text(encoding="utf-8")
        records = _records(text)
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    found = None
    for rec in records:
        if not isinstance(rec, dict) or metric not in rec:
            continue
        rec_step = rec.get("step")
        if rec_step == step or (rec_step is None and per_checkpoint):
            found = rec[metric]
    if found is None:
        return None
    if isinstance(found, bool) or not isinstance(found, int | float):
        raise ValueError(f"{path}: {metric!r} is {found!r}, not a number")
    return float(found)


class MetricReader:
    """Reads a gate's metric for a checkpoint; keeps the TensorBoard parse state between calls."""

    def __init__(self) -> None:
        self._events = EventFileReader()

    def read(self, gate: Gate, name: str, step: int | None) -> float | None:
        """The metric's value for the checkpoint ``name`` at ``step``; None if not (yet) there."""
        if gate.json_file:
            fields = {f for _, f, _, _ in string.Formatter().parse(gate.json_file) if f}
            per_checkpoint = bool(fields & set(JSON_FILE_PLACEHOLDERS))
            path = Path(gate.json_file.format(name=name, step="" if step is None else step))
            return read_json_metric(path, gate.metric, step, per_checkpoint)
        if step is None:
            return None  # TensorBoard values are per step; this checkpoint has none
        values = self._events.scalars(Path(gate.tensorboard_dir), gate.tag or gate.metric)
        return values.get(step)
