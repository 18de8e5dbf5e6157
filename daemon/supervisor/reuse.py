"""What an export may reuse: a published version's graph, a kept export worker.

Two keys, two questions. The *graph key* (stored in a version's metadata as
``export_key``) says whether a later export would trace the same graph, so
that version can be its template (:mod:`daemon.children.incremental`). The
*worker key* says whether a kept export worker built the same model from the
same settings, so it may serve the next export (:mod:`daemon.supervisor.warm_pool`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def export_key(identity: Mapping[str, Any], builder_file: Path | None) -> str:
    """A digest of everything that shapes the traced graph apart from the weights.

    ``identity`` holds the model's export settings (source, builder, inputs,
    tool version...); ``builder_file``'s bytes are added, so editing the
    builder's module makes the next export a full one. Two exports with the
    same key trace the same graph (code the builder imports from other
    modules is not hashed; the validator's output comparison and the full
    retry cover it).
    """
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    if builder_file is not None:
        try:
            h.update(builder_file.read_bytes())
        except OSError:
            h.update(b"unreadable")
    return "sha256:" + h.hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that trace the graph (read without importing them)."""
    from importlib import metadata

    out = {}
    for dist in ("tensorflow", "tensorflow-cpu", "keras"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
