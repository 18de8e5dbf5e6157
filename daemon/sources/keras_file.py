"""``source = "keras"``: files written by ``keras.callbacks.ModelCheckpoint`` or ``model.save``.

Three kinds of file, told apart by name:

- ``*.keras`` archives hold the whole model: no user code is needed (custom
  layers aside: ``custom_objects``), the file is loaded and exported;
- ``*.weights.h5`` hold weights only: the ``builder`` makes the model, the
  file's weights are loaded into it;
- other ``*.h5`` are legacy whole-model HDF5 files, loaded like archives.

Completeness, in the supervisor (no TensorFlow, no h5py): Keras writes these
files in place, with no state file and no rename, so the scanner reads each
container's own end-of-write marks (standard-library codecs in
:mod:`daemon.formats`) and takes a complete file at once:

- ``.keras`` (a zip, :mod:`daemon.formats.zip_archive`): the end record at
  the very end, a central directory that agrees with it (ZIP64 too) and
  every member's local header where the directory says; and ``config.json``
  among the members;
- ``.h5`` (:mod:`daemon.formats.hdf5`): the superblock (at 0, 512, 1024,
  ...) is not marked open for writing, its checksum matches (versions 2
  and 3), and its end-of-file address equals the file's size.

A file in which these are missing or disagree is being written: it is
waited for (rescanned on the writer's events, at the latest once it has not
changed for ``settle_seconds``). ``settle_seconds`` is only a fallback: a
file that still fails the check after that long is reported once and
skipped (truncated or corrupt), and one the check cannot decide (another
HDF5 superblock version, an undefined end-of-file address, bytes beyond it,
a multi-disk zip) counts once it has not changed for ``settle_seconds`` and
its container reads (a zip listing ``config.json``, the HDF5 signature).

A file rewritten in place under the same name (``save_best_only``) is
truncated first, so it fails the check until the rewrite ends. The file is
checked and hashed through one descriptor between two ``stat`` calls; if its
inode, size, mtime or ctime moved in between, it counts as being written.

The step is the first group of ``step_regex`` in the file name (default: the
first number, as in ``model-epoch-12.keras``); order is by write time. The
fingerprint is a hash of the whole file, cached by (inode, size, mtime, ctime).

Keras' ``safe_mode`` (no arbitrary code from lambda layers in the file) stays
on unless ``safe_mode = false``.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.config.schema import non_negative, nonempty, string_list
from daemon.formats import hdf5, zip_archive
from daemon.formats.completeness import Completeness, ReadAt, Verdict, incomplete
from daemon.objectstore.url import ObjectURL
from daemon.protocol import EXPORTERS_PACKAGE
from daemon.sources.base import Checkpoint, ScanResult, SourceKind

WEIGHTS_SUFFIX = ".weights.h5"


def _regex(v: Any) -> str | None:
    try:
        compiled = re.compile(v)
    except re.error as e:
        return f"not a regular expression ({e})"
    return None if compiled.groups >= 1 else "needs a group capturing the step, like (\\d+)"


def _object_specs(v: Any) -> str | None:
    problem = string_list(v)
    if problem is None and any(":" not in s for s in v):
        return 'entries must be "module:attribute"'
    return problem


def _check(options: Mapping[str, Any], has_builder: bool) -> list[str]:
    if options["pattern"].endswith(WEIGHTS_SUFFIX) and not has_builder:
        return ["pattern: .weights.h5 files hold weights only; set builder to make the model"]
    return []


class KerasFileSource:
    """Finds complete Keras model files in a directory; see the module docstring."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = options or {}
        self.pattern: str = options.get("pattern", "*.keras")
        self.step_re = re.compile(options.get("step_regex", r"(\d+)"))
        self.settle_seconds: float = float(options.get("settle_seconds", 5.0))
        #: path -> (its identity when hashed, fingerprint).
        self._fp_cache: dict[Path, tuple[tuple[int, int, int, int, int], str]] = {}

    def scan(self, directory: Path | ObjectURL) -> ScanResult:
        """The complete files matching ``pattern`` in the local folder ``directory``.

        Local only (the kind's ``remote_dirs`` is False): an object-store URL
        is a ValueError, which config validation keeps from happening.
        """
        if not isinstance(directory, Path):
            raise ValueError(f"{directory}: the keras source reads local directories only")
        result = ScanResult()
        if not directory.exists():
            result.directory_exists = False
            return result
        if not directory.is_dir():
            result.problems.append(f"{directory} is not a directory")
            return result
        now_ns = time.time_ns()
        seen = set()
        for path in sorted(directory.glob(self.pattern)):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # deleted between the listing and the stat
            if not stat.S_ISREG(st.st_mode):
                continue
            seen.add(path)
            try:
                inspected = self._inspect(path)
            except FileNotFoundError:
                continue
            except OSError as e:
                result.problems.append(f"{path}: cannot be read ({e}); skipped")
                continue
            if inspected is None:
                continue  # no longer a regular file
            st, check, fingerprint = inspected
            if fingerprint is None:
                settled_at = st.st_mtime_ns + int(self.settle_seconds * 1e9)
                if now_ns < settled_at:
                    result.incomplete.append(path.name)
                    at = settled_at / 1e9
                    result.recheck_at = min(result.recheck_at or at, at)
                    continue
                # The fallback: unchanged for settle_seconds and still not complete.
                problem = _container_problem(path)
                if problem is None and check.verdict is Verdict.INCOMPLETE:
                    problem = f"not completely written ({check.reason})"
                if problem is not None:
                    result.problems.append(f"{path}: {problem}; skipped")
                    continue
                fingerprint = self._fingerprint_path(path, st)
            m = self.step_re.search(path.name)
            result.checkpoints.append(
                Checkpoint(
                    prefix=path,
                    step=int(m.group(1)) if m and m.group(1).isdigit() else None,
                    files=(path,),
                    written_ns=st.st_mtime_ns,
                    fingerprint=fingerprint,
                )
            )
        for path in set(self._fp_cache) - seen:
            if path.parent == directory:
                del self._fp_cache[path]
        result.checkpoints.sort(key=lambda c: c.order_key)
        return result

    def _inspect(self, path: Path) -> tuple[os.stat_result, Completeness, str | None] | None:
        """The file's stat, its completeness and, if complete, its fingerprint.

        One descriptor for the check and the hash; the file must keep its
        inode, size, mtime and ctime from before the check until after the
        hash (and its name must still lead to it), or it counts as being
        written. None when ``path`` is no longer a regular file.
        """
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            check = check_file(path.name, lambda offset, n: os.pread(fd, n, offset), st.st_size)
            if not check.complete:
                return st, check, None
            fingerprint = self._fingerprint(path, st, fd)
            if _identity(os.fstat(fd)) != _identity(st) or _identity(path.stat()) != _identity(st):
                self._fp_cache.pop(path, None)
                return st, incomplete("changed while it was read"), None
            return st, check, fingerprint
        finally:
            os.close(fd)

    def _fingerprint(self, path: Path, st: os.stat_result, fd: int) -> str:
        cached = self._fp_cache.get(path)
        if cached and cached[0] == _identity(st):
            return cached[1]
        h = hashlib.sha256()
        offset = 0
        while block := os.pread(fd, 1 << 20, offset):
            h.update(block)
            offset += len(block)
        fp = "sha256:" + h.hexdigest()
        self._fp_cache[path] = (_identity(st), fp)
        return fp

    def _fingerprint_path(self, path: Path, st: os.stat_result) -> str:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return self._fingerprint(path, st, fd)
        finally:
            os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file is written or replaced: (dev, inode, size, mtime, ctime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_file(name: str, read_at: ReadAt, size: int) -> Completeness:
    """Whether the Keras file ``name`` (its suffix says which container) is complete.

    ``.h5``: :func:`daemon.formats.hdf5.check_file`; otherwise a ``.keras``
    archive: :func:`daemon.formats.zip_archive.check_archive`, and complete
    only if it lists ``config.json``.
    """
    if name.endswith(".h5"):
        return hdf5.check_file(read_at, size)
    check, members = zip_archive.check_archive(read_at, size)
    if check.complete and "config.json" not in members:
        return incomplete("a zip without config.json, not a .keras archive")
    return check


def _container_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole .keras/.h5 container (the settle fallback's check), or None."""
    try:
        if path.name.endswith(".h5"):
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                found = hdf5.superblock_offset(lambda o, n: os.pread(f.fileno(), n, o), size)
            return None if found is not None else "not an HDF5 file"
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        return f"not a readable .keras archive ({e})"
    return None if "config.json" in names else "a zip without config.json, not a .keras archive"


KIND = SourceKind(
    name="keras",
    scanner=KerasFileSource,
    exporter=f"{EXPORTERS_PACKAGE}.keras_file",
    options={
        "pattern": ((str,), "*.keras", nonempty),
        "step_regex": ((str,), r"(\d+)", _regex),
        "settle_seconds": ((int, float), 5.0, non_negative),
        "safe_mode": ((bool,), True, None),
        "custom_objects": ((list,), [], _object_specs),
    },
    builder="optional",
    check=_check,
    rewrites_in_place=True,
)
