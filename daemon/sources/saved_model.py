"""``source = "saved_model"``: the trainer already writes SavedModels; publish them.

Estimator export folders named by timestamp, ``tf.saved_model.save`` or
``model.export()`` once per epoch, Orbax exports: each directory directly under
``checkpoint_dir`` holding a ``saved_model.pb`` is a candidate. The daemon
validates it along TF Serving's path and publishes a copy as the next version;
the trainer's folder is never modified.

Completeness, in the supervisor (no TensorFlow):

- with ``marker`` set (``"_SUCCESS"``, Orbax's ``"commit_success.txt"``): the
  marker file exists in the folder;
- without: ``saved_model.pb`` exists and no file of the tree changed for
  ``settle_seconds`` (the newest mtime is that old). A tree still settling is
  reported as incomplete and looked at again when it should have settled.

Names starting with ``.`` or ``temp-`` (TensorFlow's own exporters write
``temp-<timestamp>`` and rename it) are skipped. The step is the number at the
end of the folder's name (``export/1700000000``, ``epoch-12``), if any; order
is by write time. The fingerprint hashes ``saved_model.pb``, the variables
index (it holds a checksum of every tensor) and the size of every file, and is
cached by the files' (size, mtime), so an unchanged tree costs a listing.

Export, in the worker: copy the pinned tree into the export folder, then load
the original with TF2's ``tf.saved_model.load`` and run ``serving_default`` on
the validator's inputs, as the reference the validator compares with. The
validator loads the copy graph-mode, as TF Serving does: a SavedModel that only
works in TF2 (tensorflow/serving#2250) fails there.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.config.schema import non_negative
from daemon.protocol import EXPORTERS_PACKAGE
from daemon.sources.base import Checkpoint, ScanResult, SourceKind, list_directory

_STEP_RE = re.compile(r"(\d+)$")
_SKIP_PREFIXES = (".", "temp-", "tmp-")
#: Files whose bytes identify a SavedModel's contents; the rest count by size.
_HASHED = ("saved_model.pb", "saved_model.pbtxt", os.path.join("variables", "variables.index"))


class SavedModelSource:
    """Finds complete SavedModel folders in a directory; see the module docstring."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = options or {}
        self.marker: str = options.get("marker", "")
        self.settle_seconds: float = float(options.get("settle_seconds", 5.0))
        self._fp_cache: dict[Path, tuple[tuple[tuple[str, int, int], ...], str]] = {}

    def scan(self, directory: Path) -> ScanResult:
        result = ScanResult()
        found = list_directory(directory, result)
        if found is None:
            return result
        entries = sorted(n for n, e in found.items() if e.is_dir(follow_symlinks=False))
        now_ns = time.time_ns()
        for name in entries:
            if name.startswith(_SKIP_PREFIXES):
                continue
            folder = directory / name
            if not any((folder / f).is_file() for f in ("saved_model.pb", "saved_model.pbtxt")):
                continue  # not a SavedModel (yet): nothing to say
            try:
                listing = _listing(folder)
            except OSError as e:
                result.problems.append(f"cannot read {folder}: {e}")
                continue
            written_ns = max(mtime for _, _, mtime in listing)
            if self.marker:
                complete = (folder / self.marker).is_file()
            else:
                settled_at = written_ns + int(self.settle_seconds * 1e9)
                complete = now_ns >= settled_at
                if not complete:
                    at = settled_at / 1e9
                    result.recheck_at = min(result.recheck_at or at, at)
            if not complete:
                result.incomplete.append(name)
                continue
            try:
                fp = self._fingerprint(folder, tuple(listing))
            except OSError as e:
                result.problems.append(f"cannot read {folder}: {e}")
                continue
            m = _STEP_RE.search(name)
            result.checkpoints.append(
                Checkpoint(
                    prefix=folder,
                    step=int(m.group(1)) if m else None,
                    files=tuple(folder / rel for rel, _, _ in listing),
                    written_ns=written_ns,
                    fingerprint=fp,
                )
            )
        for path in list(self._fp_cache):
            if path.parent == directory and path.name not in entries:
                del self._fp_cache[path]
        result.checkpoints.sort(key=lambda c: c.order_key)
        return result

    def _fingerprint(self, folder: Path, listing: tuple[tuple[str, int, int], ...]) -> str:
        cached = self._fp_cache.get(folder)
        if cached and cached[0] == listing:
            return cached[1]
        h = hashlib.sha256()
        for rel, size, _mtime in listing:
            h.update(f"{rel}\0{size}\n".encode())
            if rel in _HASHED:
                h.update((folder / rel).read_bytes())
        fp = "sha256:" + h.hexdigest()
        self._fp_cache[folder] = (listing, fp)
        return fp


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under ``folder``, sorted."""
    out = []
    for root, _dirs, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            st = os.stat(path)
            out.append((os.path.relpath(path, folder), st.st_size, st.st_mtime_ns))
    return sorted(out)


KIND = SourceKind(
    name="saved_model",
    scanner=SavedModelSource,
    exporter=f"{EXPORTERS_PACKAGE}.saved_model",
    options={
        "marker": ((str,), "", None),
        "settle_seconds": ((int, float), 5.0, non_negative),
    },
    builder="unused",
)
