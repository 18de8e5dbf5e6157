"""Staging: a private, stable copy of a checkpoint for the length of one export.

(The job's first phase is still called ``pin`` in metrics and logs, as it
always was; "pinned" *versions* are another thing: ``ckpt-exporter pin``,
:mod:`daemon.basepath.operations`.)

The trainer's ``max_to_keep`` may delete a checkpoint while it is being
exported. A hard link keeps the file's data alive after the trainer unlinks its
name, costs no space and no copying, and needs no write access to the
checkpoint directory. Where linking fails (another filesystem, a filesystem
without links, ``fs.protected_hardlinks`` refusing a file we do not own) the
file is copied instead.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from daemon.sources.base import Checkpoint


class CheckpointVanished(Exception):
    """A checkpoint file disappeared before it could be pinned."""


def stage_checkpoint(ckpt: Checkpoint, staging: Path) -> tuple[Path, str]:
    """Link (or copy) every file of ``ckpt`` into ``staging``.

    Files keep their path relative to the folder holding ``ckpt.prefix``, so
    a checkpoint that is a directory tree (a SavedModel) is pinned as one.
    Returns the pinned prefix (same basename, inside ``staging``) and the
    method used (``"link"``, ``"copy"`` or ``"mixed"``). Raises
    :class:`CheckpointVanished` if the trainer deleted a file first.
    """
    staging.mkdir(parents=True, exist_ok=True)
    methods = set()
    for src in ckpt.files:
        dst = staging / src.relative_to(ckpt.prefix.parent)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
            methods.add("link")
        except FileNotFoundError as e:
            raise CheckpointVanished(f"{src} was deleted before it could be pinned") from e
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP):
                raise
            try:
                shutil.copy2(src, dst)
            except FileNotFoundError as e2:
                raise CheckpointVanished(f"{src} was deleted before it could be pinned") from e2
            methods.add("copy")
    method = methods.pop() if len(methods) == 1 else "mixed"
    return staging / ckpt.prefix.name, method
