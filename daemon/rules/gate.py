"""Publication gates: publish a checkpoint only when a condition holds.

Two kinds, either or both per model (``[models.gate]``):

- a **metric gate**, decided in the supervisor *before* the export (no
  TensorFlow, no export spent on a checkpoint that will not ship): the value
  of ``metric`` at the checkpoint's step, read from a JSON file or from the
  trainer's TensorBoard event files, must be better (``mode`` ``min`` or
  ``max``) than ``better_than``: a number, or ``"last_published"``, the value
  recorded in the newest published version's metadata (Estimator's
  ``BestExporter`` rule). The first publication, or one after versions made
  without the gate, has nothing to beat and passes;
- a **command gate**, run by the supervisor *after* validation, given the
  export folder: exit status 0 allows publication.

A metric that is not there yet is waited for (evaluations usually land after
the checkpoint) up to ``wait_seconds``; then the checkpoint is gated out as
``metric_missing``. A gated-out checkpoint is recorded like a rejected one and
never retried.

This module is pure: reading the metric files is
:mod:`daemon.supervisor.metric_reader`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config.schema import Schema, command_line, non_negative, one_of, template_problem
from daemon.objectstore.url import Location

MODES = ("min", "max")
LAST_PUBLISHED = "last_published"
#: Placeholders of ``json_file`` and of ``command``'s words.
JSON_FILE_PLACEHOLDERS = ("name", "step")
COMMAND_PLACEHOLDERS = ("export_dir", "checkpoint", "model", "step")


def _better_than(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v == LAST_PUBLISHED else f'must be a number or "{LAST_PUBLISHED}"'
    return None if math.isfinite(v) else "must be a finite number"


def _command(v: Any) -> str | None:
    return command_line(*COMMAND_PLACEHOLDERS)(v) if v else None


GATE_SCHEMA: Schema = {
    "metric": ((str,), "", None),
    "mode": ((str,), "min", one_of(*MODES)),
    "better_than": ((str, int, float), LAST_PUBLISHED, _better_than),
    "json_file": ((str,), "", lambda v: template_problem(v, JSON_FILE_PLACEHOLDERS)),
    "tensorboard_dir": ((str,), "", None),
    "tag": ((str,), "", None),
    "wait_seconds": ((int, float), 600.0, non_negative),
    "command": ((list,), [], _command),
}


@dataclass(frozen=True, slots=True)
class Gate:
    """A model's validated ``[models.gate]`` table (paths absolute)."""

    metric: str = ""
    mode: str = "min"
    better_than: str | float = LAST_PUBLISHED
    json_file: str = ""
    tensorboard_dir: str = ""
    tag: str = ""
    wait_seconds: float = 600.0
    command: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.metric or self.command)


def parse_gate(
    values: Mapping[str, Any], given: Collection[str], where: str, checkpoint_dir: Location
) -> tuple[Gate, list[str]]:
    """A :class:`Gate` from schema-checked ``values``, and the problems of their combination.

    ``given`` are the keys the config spelled out (``values`` has defaults too).
    Relative ``json_file`` and ``tensorboard_dir`` are resolved against the
    checkpoint folder: the trainer writes its metrics next to its checkpoints.
    When that folder is not local (an object-store URL), the metric files
    must be given as absolute local paths: the gate reads them from disk.
    """
    problems: list[str] = []
    if not isinstance(checkpoint_dir, Path):
        for k in ("json_file", "tensorboard_dir"):
            if values[k] and not Path(values[k]).expanduser().is_absolute():
                problems.append(
                    f"{where}.{k}: {values[k]!r} is relative to checkpoint_dir, which is not a "
                    f"local folder ({checkpoint_dir}); give an absolute local path"
                )
        if problems:
            return Gate(), problems
        checkpoint_dir = Path("/")  # every path left is absolute
    metric = values["metric"]
    sources = [k for k in ("json_file", "tensorboard_dir") if values[k]]
    if metric and len(sources) != 1:
        problems.append(
            f"{where}.metric: give exactly one of json_file or tensorboard_dir to read "
            f"{metric!r} from (got {', '.join(sources) or 'neither'})"
        )
    if not metric:
        problems.extend(
            f'{where}.{k}: only used with metric; add metric = "..." or remove it'
            for k in ("json_file", "tensorboard_dir", "tag")
            if values[k]
        )
    command = tuple(values["command"])
    if given and not metric and not command:
        problems.append(f"{where}: a gate needs metric or command (or remove the table)")

    def resolve(p: str, template: bool = False) -> str:
        path = Path(p).expanduser()
        if path.is_absolute():
            return str(path)
        if template:  # the folder is a path, not a template: its braces stay literal
            return str(Path(str(checkpoint_dir).replace("{", "{{").replace("}", "}}")) / path)
        return str(checkpoint_dir / path)

    better = values["better_than"]
    gate = Gate(
        metric=metric,
        mode=values["mode"],
        better_than=better if isinstance(better, str) else float(better),
        json_file=resolve(values["json_file"], template=True) if values["json_file"] else "",
        tensorboard_dir=resolve(values["tensorboard_dir"]) if values["tensorboard_dir"] else "",
        tag=values["tag"],
        wait_seconds=float(values["wait_seconds"]),
        command=command,
    )
    return gate, problems


# --- the metric --------------------------------------------------------------


def threshold(gate: Gate, published: Sequence[Mapping[str, Any]]) -> float | None:
    """The value to beat: ``better_than``, or the newest published version's metric.

    ``published`` holds the metadata of the published versions, oldest
    first. None means there is nothing to beat (the gate passes), also when
    the newest version was gated on another metric or mode.
    """
    if not isinstance(gate.better_than, str):
        return gate.better_than
    if not published:
        return None
    recorded = published[-1].get("gate")
    if not isinstance(recorded, dict):
        return None  # the newest version was made without this gate
    if (recorded.get("metric"), recorded.get("mode")) != (gate.metric, gate.mode):
        return None
    value = recorded.get("value")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def decide(value: float, mode: str, best: float | None) -> bool:
    """Whether ``value`` passes: strictly better than ``best`` (None: always).

    NaN and infinities never pass: a diverged evaluation must not ship.
    """
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def command_argv(
    gate: Gate, export_dir: Path, checkpoint: Location, model: str, step: int | None
) -> list[str]:
    """The gate command with its placeholders filled in (a remote checkpoint as its URL)."""
    fill = {
        "export_dir": str(export_dir),
        "checkpoint": str(checkpoint),
        "model": model,
        "step": "" if step is None else str(step),
    }
    return [word.format_map(fill) for word in gate.command]
