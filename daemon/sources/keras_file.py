"""``source = "keras"``: files written by ``keras.callbacks.ModelCheckpoint`` or ``model.save``.

Three kinds of file, told apart by name:

- ``*.keras`` archives hold the whole model: no user code is needed (custom
  layers aside: ``custom_objects``), the file is loaded and exported;
- ``*.weights.h5`` hold weights only: the ``builder`` makes the model, the
  file's weights are loaded into it;
- other ``*.h5`` are legacy whole-model HDF5 files, loaded like archives.

Completeness, in the supervisor (no TensorFlow, no h5py): Keras writes these
files in place, with no state file and no rename, so a file counts once it
stopped changing for ``settle_seconds`` and its container looks whole: a zip
archive whose central directory reads and lists ``config.json`` for
``.keras``, the HDF5 signature for ``.h5``. A file still changing is waited
for; a settled file that fails that check is reported once and skipped.

The step is the first group of ``step_regex`` in the file name (default: the
first number, as in ``model-epoch-12.keras``); order is by write time. The
fingerprint is a hash of the whole file, cached by (size, mtime).

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
from daemon.objectstore.url import ObjectURL
from daemon.protocol import EXPORTERS_PACKAGE
from daemon.sources.base import Checkpoint, ScanResult, SourceKind

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
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
        self._fp_cache: dict[Path, tuple[int, int, str]] = {}

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
            settled_at = st.st_mtime_ns + int(self.settle_seconds * 1e9)
            if now_ns < settled_at:
                result.incomplete.append(path.name)
                at = settled_at / 1e9
                result.recheck_at = min(result.recheck_at or at, at)
                continue
            problem = _container_problem(path)
            if problem is not None:
                result.problems.append(f"{path}: {problem}; skipped")
                continue
            m = self.step_re.search(path.name)
            result.checkpoints.append(
                Checkpoint(
                    prefix=path,
                    step=int(m.group(1)) if m and m.group(1).isdigit() else None,
                    files=(path,),
                    written_ns=st.st_mtime_ns,
                    fingerprint=self._fingerprint(path, st),
                )
            )
        for path in set(self._fp_cache) - seen:
            if path.parent == directory:
                del self._fp_cache[path]
        result.checkpoints.sort(key=lambda c: c.order_key)
        return result

    def _fingerprint(self, path: Path, st: os.stat_result) -> str:
        cached = self._fp_cache.get(path)
        if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        fp = "sha256:" + h.hexdigest()
        self._fp_cache[path] = (st.st_size, st.st_mtime_ns, fp)
        return fp


def _container_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole .keras/.h5 container (cheap checks), or None."""
    try:
        if path.name.endswith(".h5"):
            with path.open("rb") as f:
                ok = f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
            return None if ok else "not an HDF5 file"
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
)
