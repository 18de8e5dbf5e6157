"""Checkpoint sources: one module per checkpoint format, behind :class:`Source`.

A source answers one question, level-triggered: *which complete checkpoints are
in this directory right now?* It never imports TensorFlow (it runs in the
supervisor) and never writes to the directory (the trainer owns it).
Adding a format is adding a module here and a line in :data:`SOURCES`.
"""

from __future__ import annotations

from daemon.sources.base import Checkpoint, ScanResult, Source
from daemon.sources.tf_checkpoint import TFCheckpointSource

#: ``source = "..."`` config value -> the class that scans that format.
SOURCES: dict[str, type[Source]] = {
    "tf_checkpoint": TFCheckpointSource,
}

__all__ = ["SOURCES", "Checkpoint", "ScanResult", "Source", "TFCheckpointSource"]
