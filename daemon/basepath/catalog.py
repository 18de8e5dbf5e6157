"""The versions of a base path, read back: what TF Serving sees and what this daemon published.

Ownership of a version is proven by its metadata file; a version without it
(made by hand or by another tool) is never returned by
:func:`published_versions`, so retention never deletes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.basepath.storage import storage_for
from daemon.objectstore.url import Location
from daemon.rules.planner import History
from daemon.rules.versions import VersionEntry, list_versions


def scan_base_path(base_path: Location) -> list[VersionEntry]:
    """List the versions present in ``base_path`` (empty if it does not exist).

    Raises ``OSError`` when it exists but cannot be listed.
    """
    return list_versions(storage_for(base_path).list_children())


def read_metadata(version_dir: Path) -> dict[str, Any] | None:
    """The metadata this daemon wrote into a version, or None if absent or unreadable."""
    return storage_for(version_dir.parent).read_version_metadata(version_dir.name)


@dataclass(frozen=True, slots=True)
class Published:
    """A version published by this daemon for one model, read back from disk."""

    version: int
    path: Location
    metadata: Mapping[str, Any]

    @property
    def _checkpoint(self) -> Mapping[str, Any]:
        # Tolerate a hand-edited file: anything but a table reads as empty.
        ckpt = self.metadata.get("checkpoint")
        return ckpt if isinstance(ckpt, dict) else {}

    @property
    def fingerprint(self) -> str:
        return str(self._checkpoint.get("fingerprint", ""))

    @property
    def written_ns(self) -> int:
        return _as_int(self._checkpoint.get("written_ns")) or 0

    @property
    def step(self) -> int | None:
        return _as_int(self._checkpoint.get("step"))


def _as_int(value: Any) -> int | None:
    """An integer from metadata JSON, or None for anything else (a hand edit)."""
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def published_versions(base_path: Location, model: str) -> list[Published]:
    """The versions in ``base_path`` that this daemon published for ``model``.

    Ownership is proven by the metadata file; a version without it (made by
    hand or by another tool) is never returned, so it is never deleted.
    """
    storage = storage_for(base_path)
    out = []
    for entry in list_versions(storage.list_children()):
        if not entry.is_dir:
            continue
        meta = storage.read_version_metadata(entry.name)
        if meta and meta.get("tool") == "ckpt-exporter" and meta.get("model") == model:
            out.append(Published(version=entry.version, path=base_path / entry.name, metadata=meta))
    return out


def planning_history(
    published: Iterable[Published],
    rejected: Iterable[str],
    *,
    retry_at: Mapping[str, float] | None = None,
    last_publish_time: float | None = None,
) -> History:
    """What the planner must know of a model's past, from its published versions and records.

    The daemon adds its retry timers and last publication; ``ckpt-exporter
    status``, which reads the disk only, passes neither. Fold in the rollback
    record with :meth:`daemon.basepath.operations.RolledBack.apply`.
    """
    published = list(published)
    return History(
        published_fingerprints=frozenset(p.fingerprint for p in published),
        watermark_ns=max((p.written_ns for p in published), default=0),
        rejected=frozenset(rejected),
        retry_at=dict(retry_at or {}),
        last_publish_time=last_publish_time,
    )
