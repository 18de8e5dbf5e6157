"""Durable local writes: fsync, the no-replace rename, atomic JSON files. Standard library only.

Both sides of the process boundary use these: the supervisor to publish a
version and write its records, the children to write their result files.
A rename makes only the *name* durable, so every helper here fsyncs the data
first and the directory entry after.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_RENAME_NOREPLACE = 1
_libc: Any = None


def fsync_path(path: Path) -> None:
    """fsync one file or directory. Directories are opened read-only, as POSIX allows."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory bottom-up, then ``root`` itself.

    A rename only makes the *name* durable; the data and the entries of the
    subdirectories must already be on disk, or a power loss right after the
    rename could leave a complete-looking version with empty files.
    """
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        d = Path(dirpath)
        for name in filenames:
            p = d / name
            if not p.is_symlink():
                fsync_path(p)
        fsync_path(d)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists.

    Plain ``rename(2)`` silently replaces an empty destination directory, so a
    version created by someone else in the meantime could be clobbered. Linux's
    ``renameat2(RENAME_NOREPLACE)`` makes the check and the rename one atomic
    step. Where it is unavailable (old kernel, some network filesystems), fall
    back to check-then-rename, which is safe against this daemon's own
    publishers because callers hold the base-path lock.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is not None:
        at_fdcwd = -100
        rc = fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` via a temp file, fsync and rename: readers see old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
