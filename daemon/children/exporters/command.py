"""Run the user's export command on a pinned checkpoint, then record reference outputs.

Runs in the worker child. The scanner is :mod:`daemon.sources.command`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.children import runtime
from daemon.children.exporters.saved_model import tf2_reference
from daemon.protocol import ExporterResult, ExportRequest


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


def export(req: ExportRequest) -> ExporterResult:
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
        raise runtime.ChildFailure("command_failed", f"cannot run {argv[0]!r}: {e}") from e
    t_run = time.monotonic()
    if code != 0:
        raise runtime.ChildFailure("command_failed", f"{argv[0]} exited with status {code}")
    produced = output_dir / options.get("saved_model_subdir", "")
    if not (produced / "saved_model.pb").is_file():
        found = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("saved_model.pb"))
        raise runtime.ChildFailure(
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
    return {
        **result,
        "durations": {
            "command_seconds": round(t_run - t0, 3),
            "reference_seconds": round(time.monotonic() - t_run, 3),
        },
    }
