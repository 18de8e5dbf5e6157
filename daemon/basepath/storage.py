"""The one seam through which the daemon reads and writes a base path.

:class:`BasePathStorage` lists every operation the daemon makes on a base
path, phrased so that a backend without ``rename(2)`` or ``flock(2)`` (an
object store) can implement it too: children are listed as
``(name, is_folder)``; versions, records and the lock are addressed by *name*
(never by a path the caller joins itself); an export is written into a
**local** folder that the storage hands out (:meth:`~BasePathStorage.new_export_dir`)
and becomes a version in one call (:meth:`~BasePathStorage.publish`) that
never replaces anything.

:class:`PosixStorage` is the backend for a local or network filesystem; it is
the only code in :mod:`daemon.basepath` that touches the filesystem of a base
path. :func:`storage_for` picks the backend for a base path (always POSIX
today; the place where a URL scheme such as ``gs://`` is dispatched on).

Names used inside a base path come from :mod:`daemon.basepath.layout`.
Supervisor side: standard library only.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

from daemon.basepath.layout import (
    FAILED_DIRNAME,
    LOCK_NAME,
    METADATA_RELPATH,
    ROLLED_BACK_DIRNAME,
    STAGING_DIRNAME,
    STATE_DIRNAME,
    TEMP_PREFIX,
    TRASH_DIRNAME,
)
from daemon.durable import fsync_path, fsync_tree, rename_noreplace, write_json_atomic
from daemon.objectstore.url import Location
from daemon.rules.versions import list_versions

#: How many times :meth:`PosixStorage.publish` chooses a version again when the
#: chosen name was taken between the choice and the rename.
PUBLISH_ATTEMPTS = 3


@runtime_checkable
class PublishLock(Protocol):
    """The exclusive lock of one base path, taken to publish, apply retention, roll back or pin.

    One object is one would-be holder: two objects exclude each other even in
    the same process. A holder that dies loses the lock without help (no stale
    lock survives a crash).
    """

    @property
    def path(self) -> Location:
        """Where the lock lives, for messages."""
        ...

    def try_acquire(self) -> bool:
        """Take the lock without waiting: True if this object holds it now."""
        ...

    def holder(self) -> str:
        """The PID of the process that holds (or last held) the lock, or ``"unknown"``."""
        ...

    def release(self) -> None:
        """Give the lock up; a no-op when this object does not hold it."""
        ...


@runtime_checkable
class BasePathStorage(Protocol):
    """Every read and write the daemon makes on one base path.

    Names are relative to the base path: a version is named by its child name
    as listed (``"7"``, ``"0007"``), a record by its file name in the state
    folder (:data:`~daemon.basepath.layout.PINS_NAME`, ...). Folders returned
    by :meth:`new_export_dir` and :meth:`staging_dir` are local folders the
    caller writes into with ordinary file I/O. Failures are raised as
    ``OSError`` unless a method says otherwise.
    """

    @property
    def base_path(self) -> Location:
        """The base path this storage reads and writes."""
        ...

    # --- reading ------------------------------------------------------------

    def exists(self) -> bool:
        """True when the base path exists (a folder)."""
        ...

    def list_children(self) -> list[tuple[str, bool]]:
        """``(name, is_folder)`` of every child of the base path, in no order.

        A missing base path has no children (``[]``). A symbolic link is not a
        folder (TF Serving would follow it, but it is nobody's version of ours).
        """
        ...

    def read_version_metadata(self, name: str) -> dict[str, Any] | None:
        """The metadata object the daemon wrote into version ``name``.

        None when it is absent, unreadable, not JSON or not a JSON object: a
        version without it is not this daemon's.
        """
        ...

    def version_bytes(self, name: str) -> int:
        """Bytes of the regular files of version ``name`` (0 when it is gone)."""
        ...

    def local_copy(self, name: str) -> Path | None:
        """A local folder holding version ``name`` whole, or None when there is none.

        What an export reads a template graph from (the version itself on a
        filesystem; on an object store the copy kept of the last upload).
        """
        ...

    # --- records in the state folder -----------------------------------------

    def read_record(self, name: str) -> Any:
        """The JSON value of record ``name``.

        Raises ``FileNotFoundError`` when there is none, another ``OSError``
        when it cannot be read, ``ValueError`` when it is not JSON (UTF-8).
        """
        ...

    def write_record(self, name: str, data: Any) -> None:
        """Replace record ``name`` with ``data`` as JSON, atomically and durably.

        A reader sees the old record or the new one, never a mix; once this
        returns, the new record survives a crash or power loss.
        """
        ...

    def delete_record(self, name: str) -> None:
        """Remove record ``name``, durably; a missing record is no error."""
        ...

    # --- the lock -------------------------------------------------------------

    def publish_lock(self) -> PublishLock:
        """A new, not yet acquired, handle on the base path's exclusive lock."""
        ...

    # --- exports and publication ------------------------------------------------

    def new_export_dir(self) -> Path:
        """Create an empty local folder for one export and return it.

        Its name is never a version name and carries this process's PID, so
        that :meth:`remove_stale_exports` can tell a crashed export from a live
        one. Creates the base path if needed.
        """
        ...

    def reset_export_dir(self, export_dir: Path) -> None:
        """Empty ``export_dir`` (from :meth:`new_export_dir`) for a new export at the same path."""
        ...

    def discard_export(self, export_dir: Path) -> None:
        """Delete ``export_dir`` (from :meth:`new_export_dir`), whatever its state; gone is fine."""
        ...

    def publish(
        self,
        export_dir: Path,
        choose_version: Callable[[list[int]], int],
        metadata: Mapping[str, Any],
    ) -> tuple[int, Location]:
        """Make the complete export in ``export_dir`` the next version. Caller holds the lock.

        Writes ``metadata`` (plus ``version`` and ``published_at``) to
        :data:`~daemon.basepath.layout.METADATA_RELPATH` inside the export,
        then publishes it under ``choose_version(<every version present, as
        TF Serving parses names>)`` without ever replacing anything: when that
        number is taken meanwhile, it chooses again (a few times, then
        ``FileExistsError``). Whatever ``choose_version`` raises propagates.

        TF Serving never sees a partial version: on any failure no version
        appears and ``export_dir`` stays where it was with its files (the
        metadata file may have been added), for the caller to keep aside or
        discard. On success ``export_dir`` is gone. Returns the version and
        where it lives.
        """
        ...

    def keep_failed(self, export_dir: Path, label: str, keep: int) -> Path | None:
        """Keep a failed export for inspection under ``failed/`` in the state folder.

        Only the newest ``keep`` failed exports are kept (0 keeps none and
        deletes ``export_dir``); returns where it was kept, or None.
        """
        ...

    # --- staging ------------------------------------------------------------------

    def staging_dir(self, job_id: str) -> Path:
        """The local folder (not created) where job ``job_id`` of this process pins its checkpoint.

        Carries this process's PID, so that :meth:`remove_stale_staging` can
        tell a crashed job's staging from a live one's.
        """
        ...

    def discard_staging(self, staging: Path) -> None:
        """Delete ``staging`` (from :meth:`staging_dir`), whatever its state; missing is fine."""
        ...

    # --- versions leaving ---------------------------------------------------------

    def remove_version(self, name: str) -> None:
        """Delete version ``name``: out of TF Serving's sight first, then its contents.

        The server never sees a half-deleted version.
        """
        ...

    def move_to_rolled_back(self, name: str, label: str) -> Location:
        """Move version ``name`` whole into ``rolled-back/`` in the state folder; returns where.

        Kept there as ``label`` (``label-1``, ``label-2``, ... when that is
        taken: never over an existing folder). Returns only once the move is
        durable, so that moves made one after the other stay in that order
        after a power loss.
        """
        ...

    # --- after a crash ------------------------------------------------------------

    def prepare(self) -> list[Path]:
        """Make the base path usable at start-up and clean up after a crash.

        Creates the base path if needed, then runs
        :meth:`remove_stale_exports`, :meth:`remove_stale_staging` and
        :meth:`empty_trash`. Returns the export folders removed.
        """
        ...

    def remove_stale_exports(self) -> list[Path]:
        """Remove export folders whose process is gone; returns them.

        Folders of a live process (another daemon on the same base path) are
        kept. This process's own PID counts as gone: call it at start-up only.
        """
        ...

    def remove_stale_staging(self) -> None:
        """Remove the staging folders of processes that are gone (same rule as above)."""
        ...

    def empty_trash(self) -> None:
        """Finish deleting versions that :meth:`remove_version` hid but did not delete."""
        ...


# --- the POSIX backend ----------------------------------------------------------


class PosixStorage:
    """A base path on a filesystem with ``rename(2)``, ``fsync(2)`` and ``flock(2)``.

    The one rule: TF Serving must never see a version folder that is not
    complete. The server lists the base path and loads any integer-named child
    without checking it first, so a version comes into existence by exactly
    one ``rename(2)`` of a fully written, fsynced directory, and leaves by one
    rename out of sight before it is deleted. That is why an export folder
    lies *inside* the base path: publication is a rename within one filesystem.

    Crash analysis (why each intermediate state is safe):

    - crash while exporting: only ``.ckpt-exporter-tmp-*`` exists; its name does
      not parse as an integer, so the server ignores it; the next start removes
      it (:meth:`prepare`).
    - crash after fsyncing the tree, before the rename: same as above.
    - crash after the rename, before fsyncing the base path: after power loss the
      directory entry may be absent (back to the state above) or present; if
      present, its contents were fsynced before the rename, so it is complete.
    - crash during removal: the version was first renamed to a non-integer name
      (into ``.ckpt-exporter/trash/``), so the server only ever sees it whole
      or not at all; the next start empties the trash.
    """

    def __init__(self, base_path: Path) -> None:
        self.base_path = base_path

    def _state(self) -> Path:
        return self.base_path / STATE_DIRNAME

    # --- reading ------------------------------------------------------------

    def exists(self) -> bool:
        return self.base_path.is_dir()

    def list_children(self) -> list[tuple[str, bool]]:
        try:
            with os.scandir(self.base_path) as it:
                return [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except FileNotFoundError:
            return []

    def read_version_metadata(self, name: str) -> dict[str, Any] | None:
        try:
            text = (self.base_path / name / METADATA_RELPATH).read_text(encoding="utf-8")
            data = json.loads(text)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def version_bytes(self, name: str) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.base_path / name):
            for file in files:
                try:
                    total += os.lstat(os.path.join(dirpath, file)).st_size
                except OSError:
                    continue
        return total

    def local_copy(self, name: str) -> Path | None:
        path = self.base_path / name
        return path if _is_dir(path) else None

    # --- records --------------------------------------------------------------

    def read_record(self, name: str) -> Any:
        return json.loads((self._state() / name).read_text(encoding="utf-8"))

    def write_record(self, name: str, data: Any) -> None:
        path = self._state() / name
        # write_json_atomic fsyncs the file's contents before renaming it into
        # place, but the rename itself is only on disk once the directory is
        # fsynced: a rollback relies on its record being durable *before* the
        # first version moves. (json.dump writes any JSON value;
        # write_json_atomic's annotation says Mapping only because its other
        # callers pass objects.)
        write_json_atomic(path, cast(Mapping[str, Any], data))
        fsync_path(path.parent)

    def delete_record(self, name: str) -> None:
        path = self._state() / name
        try:
            path.unlink()
        except FileNotFoundError:
            return
        # Like a rename, an unlink is durable only once its directory is.
        fsync_path(path.parent)

    # --- the lock -------------------------------------------------------------

    def publish_lock(self) -> PosixLock:
        return PosixLock(self._state() / LOCK_NAME)

    # --- exports and publication ------------------------------------------------

    def new_export_dir(self) -> Path:
        # Inside the base path so that publication is a rename within one
        # filesystem.
        return new_export_dir_in(self.base_path)

    def reset_export_dir(self, export_dir: Path) -> None:
        shutil.rmtree(export_dir, ignore_errors=True)
        export_dir.mkdir()

    def discard_export(self, export_dir: Path) -> None:
        shutil.rmtree(export_dir, ignore_errors=True)

    def publish(
        self,
        export_dir: Path,
        choose_version: Callable[[list[int]], int],
        metadata: Mapping[str, Any],
    ) -> tuple[int, Location]:
        """Write the metadata, fsync the tree, rename (no-replace), fsync the base path.

        See :meth:`BasePathStorage.publish` for the contract and the class
        docstring for why each step is there.
        """
        for _attempt in range(PUBLISH_ATTEMPTS):
            existing = [e.version for e in list_versions(self.list_children())]
            version = choose_version(existing)
            meta = dict(metadata, version=version, published_at=time.time())
            write_json_atomic(export_dir / METADATA_RELPATH, meta)
            # The rename below makes only the *name* durable: every file and
            # folder of the export must be on disk before it.
            fsync_tree(export_dir)
            dst = self.base_path / str(version)
            try:
                # Plain rename(2) would silently replace an empty folder of that name.
                rename_noreplace(export_dir, dst)
            except FileExistsError:
                # Someone created that name without our lock (by hand?): choose again.
                continue
            # The new directory entry survives a power loss only once the
            # base path itself is fsynced.
            fsync_path(self.base_path)
            return version, dst
        raise FileExistsError(f"could not claim a free version number in {self.base_path}")

    def keep_failed(self, export_dir: Path, label: str, keep: int) -> Path | None:
        # In the state folder: within one filesystem, under a name TF Serving never parses.
        return keep_failed_in(self._state() / FAILED_DIRNAME, export_dir, label, keep)

    # --- staging ------------------------------------------------------------------

    def staging_dir(self, job_id: str) -> Path:
        # In the state folder, so on the base path's filesystem (hard links to
        # the checkpoint work where the two share one), and tagged with our PID
        # like an export folder.
        return self._state() / STAGING_DIRNAME / f"{os.getpid()}-{job_id}"

    def discard_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    # --- versions leaving ---------------------------------------------------------

    def remove_version(self, name: str) -> None:
        # After the first rename TF Serving sees the version gone (it unloads
        # it or falls back to the next one); deleting in place instead would
        # let it see a half-deleted folder.
        trash = self._state() / TRASH_DIRNAME
        trash.mkdir(parents=True, exist_ok=True)
        hidden = trash / f"{name}-{uuid.uuid4().hex[:8]}"
        os.rename(self.base_path / name, hidden)
        fsync_path(self.base_path)
        shutil.rmtree(hidden, ignore_errors=True)

    def move_to_rolled_back(self, name: str, label: str) -> Location:
        dest_dir = self._state() / ROLLED_BACK_DIRNAME
        dest_dir.mkdir(parents=True, exist_ok=True)
        fsync_path(dest_dir.parent)
        source = self.base_path / name
        for n in range(100):
            dest = dest_dir / (label + (f"-{n}" if n else ""))
            try:
                # One rename: the version leaves the server's sight whole.
                rename_noreplace(source, dest)
            except FileExistsError:
                continue  # the same version rolled back twice in one second
            # The rename is durable only once both folders are fsynced; the
            # caller moves versions in an order that must survive a power loss.
            fsync_path(self.base_path)
            fsync_path(dest_dir)
            return dest
        raise FileExistsError(f"no free name for version {name} ({label}) in {dest_dir}")

    # --- after a crash ------------------------------------------------------------

    def prepare(self) -> list[Path]:
        self.base_path.mkdir(parents=True, exist_ok=True)
        removed = self.remove_stale_exports()
        # Only staging of processes that are gone: another daemon or
        # `ckpt-exporter export` on this base path may be exporting now.
        self.remove_stale_staging()
        # Versions renamed out of sight by retention but not yet fully deleted
        # when the daemon was killed: invisible to the server, only wasting space.
        self.empty_trash()
        return removed

    def remove_stale_exports(self) -> list[Path]:
        return remove_stale_exports_in(self.base_path)

    def remove_stale_staging(self) -> None:
        # A second daemon starting on this base path must not pull the pinned
        # checkpoint from under a live export.
        remove_stale_staging_in(self._state() / STAGING_DIRNAME)

    def empty_trash(self) -> None:
        shutil.rmtree(self._state() / TRASH_DIRNAME, ignore_errors=True)


class PosixLock:
    """An exclusive ``flock`` on ``<base_path>/.ckpt-exporter/lock``.

    flock is released by the kernel when the process dies, so a crash never
    leaves a stale lock. The holder writes its PID into the file so a waiting
    daemon can say who holds it. Each object opens the file itself, and flock
    locks belong to an open file, so two objects exclude each other even in
    one process.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# --- local folders handed out by every backend -------------------------------------


def new_export_dir_in(root: Path) -> Path:
    """A new empty export folder in ``root`` (created if needed).

    Named so that ``parse_version`` rejects it, and tagged with our PID so a
    later start can tell a crashed export from a live one
    (:func:`remove_stale_exports_in`).
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def keep_failed_in(failed: Path, export_dir: Path, label: str, keep: int) -> Path | None:
    """Move ``export_dir`` into the folder ``failed``, keeping its newest ``keep`` entries.

    Only the newest ``keep`` are kept so that a model that fails every time
    cannot fill the disk; 0 keeps none (``export_dir`` is deleted).
    """
    if keep <= 0 or not export_dir.exists():
        shutil.rmtree(export_dir, ignore_errors=True)
        return None
    failed.mkdir(parents=True, exist_ok=True)
    dst = failed / f"{time.strftime('%Y%m%dT%H%M%S')}-{label}-{uuid.uuid4().hex[:6]}"
    os.rename(export_dir, dst)
    prune_oldest(failed.iterdir(), keep)
    return dst


def remove_stale_exports_in(root: Path) -> list[Path]:
    """Remove the export folders in ``root`` whose process is gone; returns them."""
    removed: list[Path] = []
    try:
        children = list(root.iterdir())
    except FileNotFoundError:
        return removed
    for p in children:
        if p.name.startswith(TEMP_PREFIX) and not owner_alive(p.name[len(TEMP_PREFIX) :]):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def remove_stale_staging_in(staging_root: Path) -> None:
    """Remove the staging folders (``<pid>-<job>``) in ``staging_root`` whose process is gone."""
    try:
        children = list(staging_root.iterdir())
    except FileNotFoundError:
        return
    for p in children:
        if not owner_alive(p.name):
            shutil.rmtree(p, ignore_errors=True)


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``, False where it cannot be told (``is_dir`` raises on EACCES)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def prune_oldest(paths: Iterable[Path], keep: int) -> None:
    """Remove all but the ``keep`` most recently modified of the local folders ``paths``."""
    entries = sorted(paths, key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for p in entries[keep:]:
        shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(name: str) -> bool:
    """For a name ``<pid>-...``: is that process alive (and not us)?

    Our own PID counts as gone only for folders we did not create in this
    process's lifetime, which a fresh start guarantees.
    """
    pid_text = name.split("-", 1)[0]
    pid = int(pid_text) if pid_text.isdigit() else 0
    return bool(pid and pid != os.getpid() and _pid_alive(pid))


def storage_for(base_path: Location) -> BasePathStorage:
    """The storage backend for ``base_path``: POSIX for a local path, else the object store's."""
    if isinstance(base_path, Path):
        return PosixStorage(base_path)
    from daemon.basepath.objects import ObjectStorage  # imports the store's client lazily

    return ObjectStorage(base_path)
