"""TF2 object-based checkpoints (``tf.train.Checkpoint`` / ``CheckpointManager``).

Layout: ``<prefix>.index`` plus shards ``<prefix>.data-00000-of-0000N``, and
optionally a ``checkpoint`` state file (text protobuf) naming recent prefixes.

Completeness rule: TensorFlow writes every data shard first and merges the
shard indexes into ``<prefix>.index`` last (``MergeV2Checkpoints``), so a
checkpoint is complete when its ``.index`` exists, ends with the table footer's
magic number (the index is an SSTable written front to back in place, so a
half-written one has no footer yet: seen when a restarted trainer rewrites
``ckpt-5.index``), and all N shards named by the ``-of-N`` suffix exist.
The state file is only a hint: it is rewritten by rename after the files are
in place, and may still list a prefix that
``max_to_keep`` is about to delete, so every prefix is checked on disk.

The same rules hold for a directory on an object store (``gs://``, ``s3://``;
see :mod:`daemon.sources.directory`), where an object appears whole once its
upload completed: a poll is one listing, and an index or state file is read
again only when its (size, mtime, token) changed, so the cost of a poll does
not grow with the number of old checkpoints beyond the listing itself.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.formats.bundle import TABLE_MAGIC
from daemon.objectstore.url import ObjectURL, parse_url, url_scheme
from daemon.protocol import EXPORTERS_PACKAGE
from daemon.sources.base import Checkpoint, ScanResult, SourceKind, list_directory
from daemon.sources.directory import CheckpointDirectory, Entry, open_directory

STATE_FILE = "checkpoint"
_STEP_RE = re.compile(r"-(\d+)$")
_SHARD_RE = re.compile(r"^(?P<prefix>.+)\.data-(?P<i>\d{5})-of-(?P<n>\d{5})$")
_STATE_LINE_RE = re.compile(
    r'^\s*(model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"((?:[^"\\]|\\.)*)"\s*$'
)


def step_from_prefix(name: str) -> int | None:
    """The ``-N`` suffix of a checkpoint prefix (``ckpt-1200`` -> 1200), else None."""
    m = _STEP_RE.search(name)
    return int(m.group(1)) if m else None


def parse_state_file(text: str) -> list[str]:
    """Prefixes named by a ``checkpoint`` state file, in file order, without duplicates.

    The file is a text-format ``CheckpointState`` proto; strings use C escapes.
    """
    out: list[str] = []
    for line in text.splitlines():
        m = _STATE_LINE_RE.match(line)
        if not m:
            continue
        raw = m.group(2).encode("latin-1", "backslashreplace")
        value = codecs.escape_decode(raw)[0]
        assert isinstance(value, bytes)
        path = value.decode("utf-8", "replace")
        if path not in out:
            out.append(path)
    return out


def _state_entry_name(entry: str, location: Path | ObjectURL) -> str | None:
    """The name in ``location`` of a prefix the state file names, or None if it is elsewhere.

    TensorFlow writes relative paths (``ckpt-3``), or absolute ones: a local
    path, or a URL when the trainer saved to a bucket itself.
    """
    if isinstance(location, Path):
        pp = Path(entry)
        # Absolute entries pointing elsewhere are not ours to export.
        if pp.is_absolute() and pp.parent != location:
            return None
        return pp.name
    if url_scheme(entry) is not None:
        try:
            url = parse_url(entry)
        except ValueError:
            return None
        same = (url.scheme, url.bucket, url.parent.prefix)
        return url.name if same == (location.scheme, location.bucket, location.prefix) else None
    if entry.startswith("/"):
        return None  # a path on the machine that wrote it, not in this bucket
    return entry.rpartition("/")[2]


class TFCheckpointSource:
    """Scans a directory (local or on an object store) for complete TF2 checkpoints.

    Fingerprints hash the ``.index`` file (which holds a CRC32C of every
    tensor, so it identifies the contents) plus the shard sizes; they are
    cached by (location, size, mtime, token) so a rescan of an unchanged
    directory reads no checkpoint data (on an object store: no GET). A
    remote ``checkpoint`` state file is cached the same way; a local one is
    read every scan (a rename within the mtime's granularity could leave its
    size and mtime unchanged).
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self._fp_cache: dict[Path | ObjectURL, tuple[int, int, str, str]] = {}
        self._state_cache: dict[Path | ObjectURL, tuple[int, int, str, list[str]]] = {}

    def scan(self, directory: Path | ObjectURL | CheckpointDirectory) -> ScanResult:
        """The complete checkpoints in ``directory`` now; see the module docstring.

        ``directory`` may also be a :class:`~daemon.sources.directory.CheckpointDirectory`
        made by the caller (tests count a remote one's requests that way).
        """
        view = open_directory(directory)
        location = view.location
        result = ScanResult()
        entries = list_directory(view, result)
        if entries is None:
            return result

        prefixes: set[str] = set()
        for name in entries:
            if name.endswith(".index"):
                prefixes.add(name[: -len(".index")])
        state = entries.get(STATE_FILE)
        if state is not None:
            try:
                named = self._state_prefixes(view, state)
            except OSError as e:
                result.problems.append(f"cannot read {view.path(STATE_FILE)}: {e}")
            else:
                for p in named:
                    entry_name = _state_entry_name(p, location)
                    if entry_name is not None:
                        prefixes.add(entry_name)

        shards: dict[str, list[tuple[int, int, str]]] = {}
        for name in entries:
            m = _SHARD_RE.match(name)
            if m:
                shards.setdefault(m["prefix"], []).append((int(m["i"]), int(m["n"]), name))

        for prefix in sorted(prefixes):
            ckpt = self._complete(view, prefix, entries, shards.get(prefix, []), result)
            if ckpt is not None:
                result.checkpoints.append(ckpt)
        # Forget cache entries for checkpoints that are gone, so memory stays bounded.
        for path in list(self._fp_cache):
            if path.parent == location and path.name not in entries:
                del self._fp_cache[path]
        result.checkpoints.sort(key=lambda c: c.order_key)
        return result

    def _state_prefixes(self, view: CheckpointDirectory, state: Entry) -> list[str]:
        """The prefixes the state file names (cached by its token where it has one)."""
        where = view.path(state.name)
        cached = self._state_cache.get(where)
        key = (state.size, state.mtime_ns, state.token)
        if state.token and cached is not None and cached[:3] == key:
            return cached[3]
        text = view.read_bytes(state.name).decode("utf-8", errors="replace")
        named = parse_state_file(text)
        if state.token:
            self._state_cache[where] = (*key, named)
        return named

    def _extra_files(self, prefix: str) -> tuple[str, ...]:
        """Files besides the index and shards a complete checkpoint has (a subclass's rule)."""
        return ()

    def _complete(
        self,
        view: CheckpointDirectory,
        prefix: str,
        entries: dict[str, Entry],
        shard_list: list[tuple[int, int, str]],
        result: ScanResult,
    ) -> Checkpoint | None:
        index = entries.get(prefix + ".index")
        if index is None:
            # Named by the state file but gone (max_to_keep) or not finished.
            result.incomplete.append(prefix)
            return None
        if not shard_list:
            result.incomplete.append(prefix)
            return None
        counts = {n for _, n, _ in shard_list}
        if len(counts) != 1:
            result.problems.append(
                f"{view.path(prefix)}: data shards disagree on their count {sorted(counts)}"
            )
            return None
        (count,) = counts
        present = {i for i, _, _ in shard_list}
        if present != set(range(count)):
            result.incomplete.append(prefix)
            return None
        shard_entries = [entries[name] for _, _, name in sorted(shard_list)]
        try:
            fp = self._fingerprint(view, index, [s.size for s in shard_entries])
        except OSError as e:
            result.problems.append(f"cannot read {view.path(index.name)}: {e}")
            return None
        if fp is None:
            result.incomplete.append(prefix)  # the index is still being written
            return None
        extra = [entries.get(name) for name in self._extra_files(prefix)]
        if any(e is None or e.is_dir for e in extra):
            result.incomplete.append(prefix)
            return None
        found = [*shard_entries, index, *(e for e in extra if e is not None)]
        return Checkpoint(
            prefix=view.path(prefix),
            step=step_from_prefix(prefix),
            files=tuple(view.path(e.name) for e in found),
            # The extra files (a TF1 graph) are not part of when it was written.
            written_ns=max(e.mtime_ns for e in [*shard_entries, index]),
            fingerprint=fp,
            sizes=tuple(e.size for e in found),
        )

    def _fingerprint(
        self, view: CheckpointDirectory, index: Entry, shard_sizes: list[int]
    ) -> str | None:
        """sha256 of the index and shard sizes; None while the index has no footer yet."""
        where = view.path(index.name)
        cached = self._fp_cache.get(where)
        key = (index.size, index.mtime_ns, index.token)
        if cached and cached[:3] == key:
            return cached[3]
        data = view.read_bytes(index.name)
        if not data.endswith(TABLE_MAGIC):
            return None
        fp = index_fingerprint(data, shard_sizes)
        self._fp_cache[where] = (*key, fp)
        return fp


def index_fingerprint(index: bytes, shard_sizes: list[int]) -> str:
    """A checkpoint's identity: sha256 of its ``.index`` bytes and its shards' sizes."""
    h = hashlib.sha256()
    h.update(index)
    h.update(repr(shard_sizes).encode())
    return "sha256:" + h.hexdigest()


#: ``source = "tf_checkpoint"``: no options of its own; needs a builder.
KIND = SourceKind(
    name="tf_checkpoint",
    scanner=TFCheckpointSource,
    exporter=f"{EXPORTERS_PACKAGE}.tf_checkpoint",
    builder="required",
    weights_in_checkpoint=True,
    reusable_exporter=True,
    remote_dirs=True,
)
