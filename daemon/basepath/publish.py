"""Writing to a base path: temp dirs, fsync, the no-replace rename, locks, removal.

The one rule: TF Serving must never see a version folder that is not complete.
The server lists the base path and loads any integer-named child without
checking it first, so a version comes into existence by exactly one
``rename(2)`` of a fully written, fsynced directory, and leaves by one rename
out of sight before it is deleted.

Crash analysis (why each intermediate state is safe):

- crash while exporting: only ``.ckpt-exporter-tmp-*`` exists; its name does
  not parse as an integer, so the server ignores it; the next start removes it.
- crash after fsyncing the tree, before the rename: same as above.
- crash after the rename, before fsyncing the base path: after power loss the
  directory entry may be absent (back to the state above) or present; if
  present, its contents were fsynced before the rename, so it is complete.
- crash during removal: the version was first renamed to a non-integer name,
  so the server only ever sees it whole or not at all.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from daemon.basepath.catalog import scan_base_path
from daemon.basepath.layout import METADATA_RELPATH, TEMP_PREFIX, state_dir
from daemon.durable import fsync_path, fsync_tree, rename_noreplace, write_json_atomic


def new_temp_dir(base_path: Path) -> Path:
    """Create an empty temporary folder inside ``base_path`` for one export.

    Inside the base path so that publication is a rename within one
    filesystem; named so that ``parse_version`` rejects it; tagged with our PID
    so a later start can tell a crashed export from a live one.
    """
    base_path.mkdir(parents=True, exist_ok=True)
    path = base_path / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(base_path: Path) -> list[Path]:
    """Remove temporary export folders left by a process that is gone.

    Folders of a live process (another daemon on the same base path) are
    kept. Our own PID counts as gone only for folders we did not create in
    this process's lifetime, which a fresh start guarantees.
    """
    removed: list[Path] = []
    try:
        children = list(base_path.iterdir())
    except FileNotFoundError:
        return removed
    for p in children:
        if not p.name.startswith(TEMP_PREFIX):
            continue
        if _owner_alive(p.name[len(TEMP_PREFIX) :]):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _owner_alive(name: str) -> bool:
    """For a name ``<pid>-...``: is that process alive (and not us)?"""
    pid_text = name.split("-", 1)[0]
    pid = int(pid_text) if pid_text.isdigit() else 0
    return bool(pid and pid != os.getpid() and _pid_alive(pid))


def remove_stale_staging(base_path: Path) -> None:
    """Remove the staging folders (``staging/<pid>-<job>``) of processes that are gone.

    Same rule as :func:`remove_stale_temps`: a second daemon starting on this
    base path must not pull the pinned checkpoint from under a live export.
    """
    try:
        children = list((state_dir(base_path) / "staging").iterdir())
    except FileNotFoundError:
        return
    for p in children:
        if not _owner_alive(p.name):
            shutil.rmtree(p, ignore_errors=True)


class BasePathLock:
    """An exclusive ``flock`` on ``<base_path>/.ckpt-exporter/lock``.

    flock is released by the kernel when the process dies, so a crash never
    leaves a stale lock. The holder writes its PID into the file so a waiting
    daemon can say who holds it.
    """

    def __init__(self, base_path: Path) -> None:
        self.path = state_dir(base_path) / "lock"
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

    def __enter__(self) -> BasePathLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def publish(
    temp_dir: Path,
    base_path: Path,
    choose_version: Callable[[list[int]], int],
    metadata: Mapping[str, Any],
) -> tuple[int, Path]:
    """Publish a complete export as the next version. Caller holds the lock.

    Writes the metadata (with the version added), fsyncs the whole tree,
    renames ``temp_dir`` to the chosen version with no-replace semantics and
    fsyncs ``base_path`` so the new entry survives a power loss. Returns the
    version and its path. ``choose_version`` gets every version present (as TF
    Serving parses them) and may raise to refuse.
    """
    for _attempt in range(3):
        existing = [e.version for e in scan_base_path(base_path)]
        version = choose_version(existing)
        meta = dict(metadata, version=version, published_at=time.time())
        write_json_atomic(temp_dir / METADATA_RELPATH, meta)
        fsync_tree(temp_dir)
        dst = base_path / str(version)
        try:
            rename_noreplace(temp_dir, dst)
        except FileExistsError:
            # Someone created that name without our lock (by hand?): choose again.
            continue
        fsync_path(base_path)
        return version, dst
    raise FileExistsError(f"could not claim a free version number in {base_path}")


def remove_version(path: Path) -> None:
    """Delete a version: rename it out of sight first, then remove the tree.

    After the first rename TF Serving sees the version gone (it unloads it or
    falls back to the next one); deleting in place instead would let it see a
    half-deleted folder.
    """
    trash = state_dir(path.parent) / "trash"
    trash.mkdir(parents=True, exist_ok=True)
    hidden = trash / f"{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, hidden)
    fsync_path(path.parent)
    shutil.rmtree(hidden, ignore_errors=True)


def move_aside(temp_dir: Path, base_path: Path, label: str, keep: int) -> Path | None:
    """Keep a failed export for inspection under ``.ckpt-exporter/failed/``.

    Only the newest ``keep`` are kept (0 keeps none) so a model that fails
    every time cannot fill the disk.
    """
    failed = state_dir(base_path) / "failed"
    if keep <= 0 or not temp_dir.exists():
        shutil.rmtree(temp_dir, ignore_errors=True)
        return None
    failed.mkdir(parents=True, exist_ok=True)
    dst = failed / f"{time.strftime('%Y%m%dT%H%M%S')}-{label}-{uuid.uuid4().hex[:6]}"
    os.rename(temp_dir, dst)
    prune_oldest(failed.iterdir(), keep)
    return dst


def prune_oldest(paths: Iterable[Path], keep: int) -> None:
    """Remove all but the ``keep`` most recently modified of ``paths``."""
    entries = sorted(paths, key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for p in entries[keep:]:
        shutil.rmtree(p, ignore_errors=True)
