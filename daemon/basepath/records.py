"""The record of checkpoints that failed for good, kept in the base path's state folder.

``rejected.json`` maps a checkpoint fingerprint to why it was rejected, so a
restart does not retry a checkpoint that cannot succeed. It is bounded: the
oldest entries are forgotten past :data:`LIMIT`.
"""

from __future__ import annotations

from typing import Any

from daemon.basepath.layout import REJECTED_NAME
from daemon.basepath.storage import storage_for
from daemon.objectstore.url import Location

LIMIT = 1000


def read_rejected(base_path: Location) -> dict[str, dict[str, Any]]:
    """The rejected checkpoints of the model published in ``base_path`` ({} if none)."""
    try:
        data = storage_for(base_path).read_record(REJECTED_NAME)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_rejected(base_path: Location, rejected: dict[str, dict[str, Any]]) -> None:
    """Persist ``rejected`` atomically and durably, trimmed to the newest :data:`LIMIT` entries."""
    if len(rejected) > LIMIT:
        newest = sorted(rejected.items(), key=lambda kv: kv[1].get("at", 0))[-LIMIT:]
        rejected.clear()
        rejected.update(newest)
    storage_for(base_path).write_record(REJECTED_NAME, rejected)
