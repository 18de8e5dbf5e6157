"""The publish step and what surrounds it, as functions of a base path.

The one rule: TF Serving must never see a version folder that is not complete.
Each function here obtains the base path's storage
(:func:`~daemon.basepath.storage.storage_for`) and delegates to it; how a
backend keeps the rule, and why every intermediate state of a crash is safe,
is written next to its code (:class:`~daemon.basepath.storage.PosixStorage`).

The life of one export, as the supervisor drives it::

    prepare_base_path(base)                  at start-up: clean up after a crash
    staging = staging_dir(base, job_id)      pin the checkpoint there
    export = new_temp_dir(base)              the worker writes the SavedModel there
    with BasePathLock(base) (if try_acquire):
        publish(export, base, choose, meta)  -> (version, path)
        remove_version(old_path)             retention
    or, on failure: move_aside(export, base, label, keep) / discard_export(export, base)
    discard_staging(staging, base)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from daemon.basepath.storage import prune_oldest as _prune_oldest
from daemon.basepath.storage import storage_for
from daemon.objectstore.url import Location


def prepare_base_path(base_path: Location) -> list[Path]:
    """Make ``base_path`` usable at start-up and clean up after a crash.

    Creates it if needed, removes the temporary export folders and staging
    folders of processes that are gone, and finishes deleting versions that
    retention had hidden but not yet deleted. Returns the export folders
    removed (to log). Raises ``OSError`` when the base path cannot be created
    or listed. Call it before this process creates any export folder there.
    """
    return storage_for(base_path).prepare()


def new_temp_dir(base_path: Location) -> Path:
    """Create an empty temporary folder for one export into ``base_path``.

    Its name never parses as a version and is tagged with our PID so a later
    start can tell a crashed export from a live one. On POSIX it lies inside
    the base path, so that publication is a rename within one filesystem.
    """
    return storage_for(base_path).new_export_dir()


def reset_export_dir(temp_dir: Path, base_path: Location) -> None:
    """Empty ``temp_dir`` (from :func:`new_temp_dir`) for a fresh export at the same path."""
    storage_for(base_path).reset_export_dir(temp_dir)


def discard_export(temp_dir: Path, base_path: Location) -> None:
    """Delete ``temp_dir`` (from :func:`new_temp_dir`), whatever state it is in; missing is fine."""
    storage_for(base_path).discard_export(temp_dir)


def staging_dir(base_path: Location, job_id: str) -> Path:
    """The folder (not created) where job ``job_id`` of this process pins its checkpoint.

    Tagged with our PID, so that :func:`remove_stale_staging` of a later start
    (or of a second daemon) keeps it while we are alive.
    """
    return storage_for(base_path).staging_dir(job_id)


def discard_staging(staging: Path, base_path: Location) -> None:
    """Delete ``staging`` (from :func:`staging_dir`), whatever state it is in; missing is fine."""
    storage_for(base_path).discard_staging(staging)


def remove_stale_temps(base_path: Location) -> list[Path]:
    """Remove temporary export folders left by a process that is gone.

    Folders of a live process (another daemon on the same base path) are
    kept. Our own PID counts as gone only for folders we did not create in
    this process's lifetime, which a fresh start guarantees.
    """
    return storage_for(base_path).remove_stale_exports()


def remove_stale_staging(base_path: Location) -> None:
    """Remove the staging folders (``staging/<pid>-<job>``) of processes that are gone.

    Same rule as :func:`remove_stale_temps`: a second daemon starting on this
    base path must not pull the pinned checkpoint from under a live export.
    """
    storage_for(base_path).remove_stale_staging()


class BasePathLock:
    """The exclusive lock of a base path (on POSIX a ``flock`` on ``.ckpt-exporter/lock``).

    Taken to publish, apply retention, roll back or pin. A crashed holder
    never leaves a stale lock; the holder's PID is recorded so a waiting
    process can say who holds it. Each object is its own would-be holder.
    """

    def __init__(self, base_path: Location) -> None:
        self._lock = storage_for(base_path).publish_lock()
        self.path = self._lock.path

    def try_acquire(self) -> bool:
        """Take the lock without waiting: True if this object holds it now."""
        return self._lock.try_acquire()

    def holder(self) -> str:
        """The PID of the holder (or the last one), or ``"unknown"``."""
        return self._lock.holder()

    def release(self) -> None:
        """Give the lock up (a no-op when not held)."""
        self._lock.release()

    def __enter__(self) -> BasePathLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def publish(
    temp_dir: Path,
    base_path: Location,
    choose_version: Callable[[list[int]], int],
    metadata: Mapping[str, Any],
) -> tuple[int, Location]:
    """Publish a complete export as the next version. Caller holds the lock.

    Writes the metadata (with the version added), makes the export durable,
    publishes it under the chosen version with no-replace semantics (on
    POSIX: fsync the tree, ``renameat2(RENAME_NOREPLACE)``, fsync
    ``base_path``) and returns the version and its path. ``choose_version``
    gets every version present (as TF Serving parses them) and may raise to
    refuse; a number taken meanwhile is chosen again. On failure no version
    appears and ``temp_dir`` stays in place with its files.
    """
    return storage_for(base_path).publish(temp_dir, choose_version, metadata)


def remove_version(path: Location) -> None:
    """Delete the version at ``path``: out of sight first, then its contents.

    After the first step TF Serving sees the version gone (it unloads it or
    falls back to the next one); deleting in place instead would let it see a
    half-deleted folder.
    """
    storage_for(path.parent).remove_version(path.name)


def move_aside(temp_dir: Path, base_path: Location, label: str, keep: int) -> Path | None:
    """Keep a failed export for inspection under ``.ckpt-exporter/failed/``.

    Only the newest ``keep`` are kept (0 keeps none) so a model that fails
    every time cannot fill the disk.
    """
    return storage_for(base_path).keep_failed(temp_dir, label, keep)


def prune_oldest(paths: Iterable[Path], keep: int) -> None:
    """Remove all but the ``keep`` most recently modified of ``paths``."""
    _prune_oldest(paths, keep)
