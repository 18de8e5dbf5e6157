"""``source = "command"``: an external exporter turns each checkpoint into a SavedModel.

For tools that already know how to export a model, such as the TensorFlow
Model Garden's ``research/object_detection/exporter_main_v2.py`` or
``official/vision/serving/export_saved_model.py``. Checkpoints are found as
for ``tf_checkpoint`` (same completeness and step rules); for each one the
worker runs ``argv`` with these placeholders filled in:

- ``{checkpoint}``: the checkpoint's prefix (pinned: a private hard-linked copy);
- ``{checkpoint_dir}``: a private folder holding only this checkpoint and a
  ``checkpoint`` state file naming it, for tools that take a folder and pick
  its latest checkpoint;
- ``{output_dir}``: an empty folder for the tool's output.

The SavedModel is then expected at ``{output_dir}/<saved_model_subdir>``; it
is moved into the export folder, run once with TF2 as the reference, and
validated and published like any other. The command's stdout and stderr go
to the job's log; a non-zero exit is an export failure with the tail of that
output in the daemon's log. It pauses the model (like a builder that raises,
the command or its config is most likely at fault, not the checkpoint) until
a reload. A command that runs past ``export_timeout_seconds`` is killed with
the worker's whole process group and retried. Literal braces in an argument
are written ``{{`` and ``}}``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon import child
from daemon.schema import REQUIRED, command_line
from daemon.sources.base import SourceKind
from daemon.sources.saved_model import tf2_reference
from daemon.sources.tf_checkpoint import TFCheckpointSource

PLACEHOLDERS = ("checkpoint", "checkpoint_dir", "output_dir")


def _subdir(v: Any) -> str | None:
    if os.path.isabs(v) or ".." in Path(v).parts:
        return "must be a path inside {output_dir}, like saved_model"
    return None


KIND = SourceKind(
    name="command",
    scanner=TFCheckpointSource,
    exporter=__name__,
    options={
        "argv": ((list,), REQUIRED, command_line(*PLACEHOLDERS)),
        "saved_model_subdir": ((str,), "", _subdir),
    },
    builder="unused",
)


# --- export (runs in the worker child) ----------------------------------------


def _private_checkpoint_dir(prefix: Path, folder: Path) -> Path:
    """``folder`` holding links to ``prefix``'s files and a state file naming it."""
    folder.mkdir()
    for f in prefix.parent.iterdir():
        if f.name.startswith(prefix.name + "."):
            os.link(f, folder / f.name)
    state = folder / "checkpoint"
    state.write_text(
        f'model_checkpoint_path: "{prefix.name}"\nall_model_checkpoint_paths: "{prefix.name}"\n'
    )
    return folder


def export(req: dict[str, Any]) -> dict[str, Any]:
    """Run the command on the pinned checkpoint and take its SavedModel."""
    options: Mapping[str, Any] = req.get("options") or {}
    prefix = Path(req["checkpoint"])
    work = prefix.parent  # the job's private staging folder
    output_dir = work / "command-output"
    output_dir.mkdir()
    values = {
        "checkpoint": str(prefix),
        "checkpoint_dir": str(_private_checkpoint_dir(prefix, work / "command-checkpoint")),
        "output_dir": str(output_dir),
    }
    argv = [arg.format_map(values) for arg in options["argv"]]
    t0 = time.monotonic()
    print(f"ckpt-exporter: running {argv}", flush=True)
    try:
        # Its output goes where this child's does (fds 1 and 2): the job's log.
        code = subprocess.call(argv, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise child.ChildFailure("command_failed", f"cannot run {argv[0]!r}: {e}") from e
    t_run = time.monotonic()
    if code != 0:
        raise child.ChildFailure("command_failed", f"{argv[0]} exited with status {code}")
    produced = output_dir / options.get("saved_model_subdir", "")
    if not (produced / "saved_model.pb").is_file():
        found = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("saved_model.pb"))
        raise child.ChildFailure(
            "command_failed",
            f"{argv[0]} exited 0 but left no saved_model.pb in {produced}"
            + (f"; found {found}: set saved_model_subdir" if found else ""),
        )
    export_dir = Path(req["export_dir"])
    for entry in produced.iterdir():
        # Same filesystem (staging lives in the base path): renames, no copying.
        os.rename(entry, export_dir / entry.name)
    result = tf2_reference(str(export_dir), req)
    result["kind"] = "command"
    result["durations"] = {
        "command_seconds": round(t_run - t0, 3),
        "reference_seconds": round(time.monotonic() - t_run, 3),
    }
    return result
