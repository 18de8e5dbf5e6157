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
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.formats.bundle import TABLE_MAGIC
from daemon.protocol import EXPORTERS_PACKAGE
from daemon.sources.base import Checkpoint, ScanResult, SourceKind, list_directory

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


class TFCheckpointSource:
    """Scans a directory for complete TF2 checkpoints.

    Fingerprints hash the ``.index`` file (which holds a CRC32C of every
    tensor, so it identifies the contents) plus the shard sizes; they are
    cached by (path, size, mtime) so a rescan of an unchanged directory reads
    no checkpoint data.
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self._fp_cache: dict[Path, tuple[int, int, str]] = {}

    def scan(self, directory: Path) -> ScanResult:
        result = ScanResult()
        entries = list_directory(directory, result)
        if entries is None:
            return result

        prefixes: set[str] = set()
        for name in entries:
            if name.endswith(".index"):
                prefixes.add(name[: -len(".index")])
        if STATE_FILE in entries:
            try:
                text = (directory / STATE_FILE).read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                result.problems.append(f"cannot read {directory / STATE_FILE}: {e}")
            else:
                for p in parse_state_file(text):
                    pp = Path(p)
                    # Absolute entries pointing elsewhere are not ours to export.
                    if pp.is_absolute() and pp.parent != directory:
                        continue
                    prefixes.add(pp.name)

        shards: dict[str, list[tuple[int, int, str]]] = {}
        for name in entries:
            m = _SHARD_RE.match(name)
            if m:
                shards.setdefault(m["prefix"], []).append((int(m["i"]), int(m["n"]), name))

        for prefix in sorted(prefixes):
            ckpt = self._complete(directory, prefix, entries, shards.get(prefix, []), result)
            if ckpt is not None:
                result.checkpoints.append(ckpt)
        # Forget cache entries for checkpoints that are gone, so memory stays bounded.
        for path in list(self._fp_cache):
            if path.parent == directory and path.name not in entries:
                del self._fp_cache[path]
        result.checkpoints.sort(key=lambda c: c.order_key)
        return result

    def _complete(
        self,
        directory: Path,
        prefix: str,
        entries: dict[str, os.DirEntry[str]],
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
                f"{directory / prefix}: data shards disagree on their count {sorted(counts)}"
            )
            return None
        (count,) = counts
        present = {i for i, _, _ in shard_list}
        if present != set(range(count)):
            result.incomplete.append(prefix)
            return None
        try:
            st_index = index.stat()
            shard_stats = [(name, entries[name].stat()) for _, _, name in sorted(shard_list)]
        except FileNotFoundError:
            result.incomplete.append(prefix)
            return None
        files = (*tuple(directory / n for n, _ in shard_stats), directory / index.name)
        written_ns = max([st_index.st_mtime_ns] + [s.st_mtime_ns for _, s in shard_stats])
        try:
            fp = self._fingerprint(
                directory / index.name, st_index, [s.st_size for _, s in shard_stats]
            )
        except OSError as e:
            result.problems.append(f"cannot read {directory / index.name}: {e}")
            return None
        if fp is None:
            result.incomplete.append(prefix)  # the index is still being written
            return None
        return Checkpoint(
            prefix=directory / prefix,
            step=step_from_prefix(prefix),
            files=files,
            written_ns=written_ns,
            fingerprint=fp,
        )

    def _fingerprint(self, index: Path, st: os.stat_result, shard_sizes: list[int]) -> str | None:
        """sha256 of the index and shard sizes; None while the index has no footer yet."""
        cached = self._fp_cache.get(index)
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2]
        data = index.read_bytes()
        if not data.endswith(TABLE_MAGIC):
            return None
        h = hashlib.sha256()
        h.update(data)
        h.update(repr(shard_sizes).encode())
        fp = "sha256:" + h.hexdigest()
        self._fp_cache[index] = (st.st_size, st.st_mtime_ns, fp)
        return fp


#: ``source = "tf_checkpoint"``: no options of its own; needs a builder.
KIND = SourceKind(
    name="tf_checkpoint",
    scanner=TFCheckpointSource,
    exporter=f"{EXPORTERS_PACKAGE}.tf_checkpoint",
    builder="required",
    weights_in_checkpoint=True,
    reusable_exporter=True,
)
