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

The checkpoint is a TensorFlow checkpoint, so the validator proves the
export's weights against it (weight parity, ``weights_in_checkpoint``):
with ``weight_parity = "all"`` (the default) every variable the SavedModel
saves must hold the value of a tensor of the checkpoint, as for
``tf_checkpoint``; ``"partial"`` is for exporters that add variables of their
own (preprocessing constants): at least one variable must match, and the
report counts and names the others; ``"off"`` is for exporters that
transform the weights (quantise, fold batch norms): the report records the
check as skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from daemon.config.schema import REQUIRED, command_line, one_of
from daemon.protocol import EXPORTERS_PACKAGE
from daemon.sources.base import SourceKind
from daemon.sources.tf_checkpoint import TFCheckpointSource

PLACEHOLDERS = ("checkpoint", "checkpoint_dir", "output_dir")
WEIGHT_PARITY = ("all", "partial", "off")


def _subdir(v: Any) -> str | None:
    if os.path.isabs(v) or ".." in Path(v).parts:
        return "must be a path inside {output_dir}, like saved_model"
    return None


KIND = SourceKind(
    name="command",
    scanner=TFCheckpointSource,
    exporter=f"{EXPORTERS_PACKAGE}.command",
    options={
        "argv": ((list,), REQUIRED, command_line(*PLACEHOLDERS)),
        "saved_model_subdir": ((str,), "", _subdir),
        "weight_parity": ((str,), "all", one_of(*WEIGHT_PARITY)),
    },
    builder="unused",
    weights_in_checkpoint=True,
)
