"""Checkpoint sources: one module per checkpoint format, behind :class:`SourceKind`.

A source answers two questions. In the supervisor, level-triggered: *which
complete checkpoints are in this directory right now?* (its scanner never
imports TensorFlow and never writes to the directory: the trainer owns it).
In the worker child: *how does one pinned checkpoint become a SavedModel?*
(its ``export(request)``, which imports TensorFlow lazily).
Adding a format is adding a module here and a line in :data:`SOURCES`.
"""

from __future__ import annotations

from daemon.sources import command, keras_file, saved_model, tf1_checkpoint, tf_checkpoint
from daemon.sources.base import Checkpoint, ScanResult, Source, SourceKind
from daemon.sources.tf_checkpoint import TFCheckpointSource

#: ``source = "..."`` config value -> what the daemon knows about that format.
SOURCES: dict[str, SourceKind] = {
    kind.name: kind
    for kind in (
        tf_checkpoint.KIND,
        tf1_checkpoint.KIND,
        saved_model.KIND,
        keras_file.KIND,
        command.KIND,
    )
}

__all__ = ["SOURCES", "Checkpoint", "ScanResult", "Source", "SourceKind", "TFCheckpointSource"]
