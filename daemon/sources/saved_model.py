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

On an object store (``gs://``, ``s3://``) the same rules hold, read from one
listing of every object below the directory per poll (see
:mod:`daemon.sources.directory`); a tree is many objects uploaded one by one,
so without a marker it still has to settle, measured by the store's
last-modified times (a clock skew between the store and this host shifts
the wait by as much).

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
from daemon.objectstore.url import ObjectURL
from daemon.protocol import EXPORTERS_PACKAGE
from daemon.sources.base import Checkpoint, ScanResult, SourceKind, list_directory
from daemon.sources.directory import CheckpointDirectory, open_directory

_STEP_RE = re.compile(r"(\d+)$")
_SKIP_PREFIXES = (".", "temp-", "tmp-")
_GRAPH_FILES = ("saved_model.pb", "saved_model.pbtxt")
#: Files whose bytes identify a SavedModel's contents; the rest count by size.
_HASHED = ("saved_model.pb", "saved_model.pbtxt", os.path.join("variables", "variables.index"))


class SavedModelSource:
    """Finds complete SavedModel folders in a directory; see the module docstring."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = options or {}
        self.marker: str = options.get("marker", "")
        self.settle_seconds: float = float(options.get("settle_seconds", 5.0))
        self._fp_cache: dict[Path | ObjectURL, tuple[tuple[tuple[str, int, int], ...], str]] = {}

    def scan(self, directory: Path | ObjectURL | CheckpointDirectory) -> ScanResult:
        """The complete SavedModel folders in ``directory`` now (or a caller's view of it)."""
        view = open_directory(directory)
        location = view.location
        result = ScanResult()
        # Recursive: a remote directory answers every folder's walk from one listing.
        found = list_directory(view, result, recursive=True)
        if found is None:
            return result
        entries = sorted(n for n, e in found.items() if e.is_dir)
        now_ns = time.time_ns()
        for name in entries:
            if name.startswith(_SKIP_PREFIXES):
                continue
            folder = view.path(name)
            if not any(view.is_file(f"{name}/{f}") for f in _GRAPH_FILES):
                continue  # not a SavedModel (yet): nothing to say
            try:
                walked = view.walk(name)
            except OSError as e:
                result.problems.append(f"cannot read {folder}: {e}")
                continue
            if not walked:
                continue  # deleted since the listing
            listing = tuple((e.name, e.size, e.mtime_ns) for e in walked)
            written_ns = max(mtime for _, _, mtime in listing)
            if self.marker:
                complete = view.is_file(f"{name}/{self.marker}")
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
                fp = self._fingerprint(view, name, listing)
            except OSError as e:
                result.problems.append(f"cannot read {folder}: {e}")
                continue
            m = _STEP_RE.search(name)
            result.checkpoints.append(
                Checkpoint(
                    prefix=folder,
                    step=int(m.group(1)) if m else None,
                    files=tuple(view.path(f"{name}/{rel}") for rel, _, _ in listing),
                    written_ns=written_ns,
                    fingerprint=fp,
                    sizes=tuple(size for _, size, _ in listing),
                )
            )
        for path in list(self._fp_cache):
            if path.parent == location and path.name not in entries:
                del self._fp_cache[path]
        result.checkpoints.sort(key=lambda c: c.order_key)
        return result

    def _fingerprint(
        self, view: CheckpointDirectory, name: str, listing: tuple[tuple[str, int, int], ...]
    ) -> str:
        folder = view.path(name)
        cached = self._fp_cache.get(folder)
        if cached and cached[0] == listing:
            return cached[1]
        h = hashlib.sha256()
        for rel, size, _mtime in listing:
            h.update(f"{rel}\0{size}\n".encode())
            if rel in _HASHED:
                h.update(view.read_bytes(f"{name}/{rel}"))
        fp = "sha256:" + h.hexdigest()
        self._fp_cache[folder] = (listing, fp)
        return fp


KIND = SourceKind(
    name="saved_model",
    scanner=SavedModelSource,
    exporter=f"{EXPORTERS_PACKAGE}.saved_model",
    options={
        "marker": ((str,), "", None),
        "settle_seconds": ((int, float), 5.0, non_negative),
    },
    builder="unused",
    remote_dirs=True,
)
