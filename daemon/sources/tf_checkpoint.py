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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon import child, incremental, worker
from daemon.sources.base import Checkpoint, ScanResult, SourceKind, list_directory

STATE_FILE = "checkpoint"
_STEP_RE = re.compile(r"-(\d+)$")
#: The last 8 bytes of a complete TensorFlow table file (``kTableMagicNumber``,
#: little-endian), the format of a checkpoint's ``.index``.
TABLE_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")
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
    exporter=__name__,
    builder="required",
    weights_in_checkpoint=True,
    reusable_exporter=True,
)


# --- export (runs in the worker child; imports TensorFlow) -------------------


def export(req: dict[str, Any]) -> dict[str, Any]:
    """Restore the pinned checkpoint into the builder's model and export it.

    Fails permanently unless every variable of the model was restored from
    the object the trainer saved under ``checkpoint_key``.
    """
    t0 = time.monotonic()
    link_fallback = None
    if req.get("template"):
        try:
            linked = incremental.link(
                req["template"],
                req["checkpoint"],
                req["checkpoint_key"],
                req["export_dir"],
                need_warmup=bool(req.get("warmup_records")),
            )
        except incremental.Fallback as e:
            link_fallback = str(e)  # then the TensorFlow path, incremental or full
        else:
            return _linked_result(req, linked, time.monotonic() - t0)
    obj, reused = worker.model_for(req)
    t_build = time.monotonic()
    n_vars, status = _restore(obj, req["checkpoint_key"], req["checkpoint"])
    t_restore = time.monotonic()
    result = worker.export_model(obj, req)
    if link_fallback is not None:
        result["incremental"]["link_fallback"] = link_fallback
    why_not = incremental.record_weights_map(
        req["export_dir"],
        incremental.restored_from(status, req["checkpoint"]),
        req["checkpoint"],
        req["checkpoint_key"],
        worker.kept_code_files(),
    )
    result["weights_map"] = "written" if why_not is None else f"not written: {why_not}"
    return {
        **result,
        "variables": n_vars,
        "model_reused": reused,
        "saved_counters": _saved_counters(req["checkpoint"]),
        "durations": {
            "import_seconds": round(t_build - t0, 3),
            "restore_seconds": round(t_restore - t_build, 3),
            "save_seconds": result.pop("save_seconds"),
        },
    }


def _linked_result(req: dict[str, Any], linked: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The result of an export by :func:`daemon.incremental.link`: no model, no reference outputs.

    The reference file is written empty: the validator then has no outputs
    to compare with and checks the weights map tensor by tensor instead.
    """
    import numpy as np

    np.savez(req["reference"])
    return {
        "kind": "linked",
        "incremental": {"template": req["template"], **linked},
        "variables": linked["variables"],
        "model_reused": False,
        "saved_counters": _saved_counters(req["checkpoint"]),
        "durations": {"link_seconds": round(seconds, 3)},
    }


def _checkpoint_keys(prefix: str) -> list[str]:
    """Names of the root object's children (the keyword arguments of tf.train.Checkpoint).

    Read from the object graph, not from variable names: a variable is stored
    under its first path in the graph, which is often through the optimizer.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    try:
        reader = tf.train.load_checkpoint(prefix)
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    except Exception as e:
        raise _unreadable(prefix, e) from e
    return sorted(child.local_name for child in graph.nodes[0].children)


def _unreadable(prefix: str, e: Exception) -> child.ChildFailure:
    """The failure for a checkpoint whose files cannot be read back.

    The index is written last, so a checkpoint that passed the completeness
    check and still cannot be read is truncated or corrupt: permanent. Pinned
    files that are gone were removed by someone else: transient.
    """
    name = os.path.basename(prefix)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
    if not os.path.exists(prefix + ".index"):
        return child.ChildFailure(
            "checkpoint_vanished",
            f"the pinned files of checkpoint {name} disappeared ({first})",
            permanent=False,
        )
    return child.ChildFailure(
        "checkpoint_corrupt",
        f"checkpoint {name} cannot be read: {type(e).__name__}: {first}; "
        "its files are truncated or corrupt (the .index is written last, so this is "
        "not a checkpoint still being written)",
    )


def _saved_counters(prefix: str) -> dict[str, int]:
    """Step counters saved in the checkpoint, if the trainer tracked any."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    out = {}
    for key in ("step", "global_step", "save_counter"):
        name = f"{key}/.ATTRIBUTES/VARIABLE_VALUE"
        if reader.has_tensor(name):
            value = reader.get_tensor(name)
            if getattr(value, "shape", None) == ():
                out[key] = int(value)
    return out


def _restore(obj: Any, key: str, prefix: str) -> tuple[int, Any]:
    """Restore ``prefix``'s object ``key`` into ``obj``; the variable count and the load status."""
    import tensorflow as tf

    variables = list(obj.variables)
    if not variables:
        raise child.ChildFailure(
            "no_variables",
            "the builder returned a model without variables; build it before returning "
            "(for Keras: start from keras.Input(...) or call model.build(input_shape))",
        )
    keys = _checkpoint_keys(prefix)
    if key not in keys:
        raise child.ChildFailure(
            "restore_mismatch",
            f"checkpoint {prefix} has no object {key!r} (it has {', '.join(keys) or 'nothing'});"
            " set checkpoint_key to the name the trainer gave tf.train.Checkpoint",
        )
    try:
        # A shape mismatch raises in read(); a variable the checkpoint lacks, in the assert.
        status = tf.train.Checkpoint(**{key: obj}).read(prefix)
        status.assert_existing_objects_matched()
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
        raise _unreadable(prefix, e) from e  # checksum mismatch, short read
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        raise child.ChildFailure(
            "restore_mismatch",
            f"the builder's model does not match checkpoint {prefix} under {key!r}: "
            f"{str(e)[:2000]}",
        ) from e
    return len(variables), status
