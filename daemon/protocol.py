"""How the supervisor and its children talk: module names, argv, request and result files.

The supervisor writes a JSON request file and starts a child (cold:
``python -m MODULE REQUEST.json``; warm: forked by the zygote and handed the
request path on stdin). The child writes a JSON result file (its path is in
the request) atomically, then exits with a code from :mod:`daemon.exitcodes`.
A child that dies without a result (killed, segfault, out of memory) is a
transient failure by definition.

This module is the only place the children's module names are spelled, so
the supervisor can start them without importing them. Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: The export worker: one checkpoint in, one SavedModel out.
WORKER = "daemon.children.worker"
#: The validator: loads an export the way TF Serving does and proves it.
VALIDATOR = "daemon.children.validator"
#: The process that imports TensorFlow once and forks workers and validators.
ZYGOTE = "daemon.children.zygote"
#: The package of the per-format exporters (``SourceKind.exporter`` names one).
EXPORTERS_PACKAGE = "daemon.children.exporters"
#: The children a zygote may fork, with the name each gives itself (``ps``, ``top``).
CHILD_NAMES = {WORKER: "ckpt-worker", VALIDATOR: "ckpt-validate"}
#: Written on a reusable exporter's done pipe after each request it finished.
DONE = b"done\n"


def child_command(module: str, request: Path) -> list[str]:
    """The argv that runs a child module cold, with the supervisor's interpreter."""
    return [sys.executable, "-m", module, str(request)]


def read_result(path: Path) -> dict[str, Any] | None:
    """The child's result, or None if it died before writing one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
