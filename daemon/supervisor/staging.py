"""Staging: a private, stable copy of a checkpoint for the length of one export.

(The job's first phase is still called ``pin`` in metrics and logs, as it
always was; "pinned" *versions* are another thing: ``ckpt-exporter pin``,
:mod:`daemon.basepath.operations`.)

The trainer's ``max_to_keep`` may delete a checkpoint while it is being
exported. A hard link keeps the file's data alive after the trainer unlinks its
name, costs no space and no copying, and needs no write access to the
checkpoint directory. Where linking fails (another filesystem, a filesystem
without links, ``fs.protected_hardlinks`` refusing a file we do not own) the
file is copied instead.

A checkpoint on an object store (its ``prefix`` an
:class:`~daemon.objectstore.url.ObjectURL`) is *fetched* instead
(:func:`fetch_checkpoint`): downloaded into the same staging layout, whole,
or, when the caller names the tensors the model needs, as sparse local files
holding only those tensors' bytes (ranged GETs), so the optimizer's slots
(two thirds of a trainer's checkpoint with Adam) never cross the network.
TensorFlow reads a tensor by its offset in the data file, so it restores the
named tensors from the sparse files; the holes read as zeros and are never
read by a partial restore.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import threading
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from daemon.formats import crc32c, varint
from daemon.formats.bundle import Bundle, BundleFormatError, parse_index
from daemon.formats.bundle import Entry as BundleEntry
from daemon.objectstore.client import ObjectStore, ObjectStoreError
from daemon.objectstore.url import ObjectURL
from daemon.sources.base import Checkpoint
from daemon.sources.tf_checkpoint import index_fingerprint


def _c_crc32c() -> Callable[[bytes], int] | None:
    """The C CRC-32C of ``google_crc32c`` (the gcs extra brings it: GB/s), if installed.

    The pure-Python one (:mod:`daemon.formats.crc32c`) does about 4 MB/s:
    too slow to check megabytes of tensors in the supervisor.
    """
    try:
        import google_crc32c
    except ImportError:  # pragma: no cover - depends on the extras installed
        return None
    if getattr(google_crc32c, "implementation", "c") != "c":
        return None  # its own pure-Python fallback: no faster than ours
    return lambda data: int(google_crc32c.value(data))


_FAST_CRC32C = _c_crc32c()

#: Parallel requests of one fetch: enough to hide latency, few enough to be polite.
FETCH_THREADS = 4
#: Needed tensors whose bytes are closer than this are fetched in one ranged GET:
#: a request costs about as much time as this many bytes, so merging wins.
MERGE_GAP = 64 * 1024
#: No ranged GET longer than this (memory held per request, parallelism).
MAX_RANGE = 32 * 1024 * 1024
#: Without the C CRC-32C, tensors up to this size are still verified in Python.
PURE_PYTHON_CRC_LIMIT = 256 * 1024


class CheckpointVanished(Exception):
    """A checkpoint file disappeared (or was replaced) before it could be pinned or fetched."""


def stage_checkpoint(ckpt: Checkpoint, staging: Path, *, copy: bool = False) -> tuple[Path, str]:
    """Link (or copy) every file of ``ckpt`` into ``staging``.

    Files keep their path relative to the folder holding ``ckpt.prefix``, so
    a checkpoint that is a directory tree (a SavedModel) is pinned as one.
    ``copy``: never link (the source rewrites files in place, see
    :attr:`~daemon.sources.base.SourceKind.rewrites_in_place`); a file whose
    identity (inode, size, times) changed during its copy was being
    rewritten, and is :class:`CheckpointVanished` too (the scan finds the new
    one). Returns the pinned prefix (same basename, inside ``staging``) and
    the method used (``"link"``, ``"copy"`` or ``"mixed"``). Raises
    :class:`CheckpointVanished` if the trainer deleted a file first.
    A checkpoint on an object store is a ValueError: see :func:`fetch_checkpoint`.
    """
    prefix = ckpt.prefix
    if not isinstance(prefix, Path):
        raise ValueError(f"{prefix} is on an object store: fetch_checkpoint, not stage_checkpoint")
    staging.mkdir(parents=True, exist_ok=True)
    methods = set()
    for src in ckpt.files:
        assert isinstance(src, Path)
        dst = staging / src.relative_to(prefix.parent)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            _copy_unchanged(src, dst)
            methods.add("copy")
            continue
        try:
            os.link(src, dst)
            methods.add("link")
        except FileNotFoundError as e:
            raise CheckpointVanished(f"{src} was deleted before it could be pinned") from e
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP):
                raise
            _copy_unchanged(src, dst)
            methods.add("copy")
    method = methods.pop() if len(methods) == 1 else "mixed"
    return staging / prefix.name, method


def _copy_unchanged(src: Path, dst: Path) -> None:
    """Copy ``src``; CheckpointVanished when it is deleted or rewritten meanwhile."""

    def identity(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    try:
        before = identity(os.stat(src))
        shutil.copy2(src, dst)
        after = identity(os.stat(src))
    except FileNotFoundError as e:
        raise CheckpointVanished(f"{src} was deleted before it could be pinned") from e
    if before != after:
        raise CheckpointVanished(f"{src} was rewritten while it was being pinned")


# --- fetching a checkpoint from an object store ----------------------------------


#: tensorflow.DataType values whose bytes are not the plain tensor buffer.
_DT_STRING, _DT_RESOURCE, _DT_VARIANT = 7, 20, 21


def _crc32c_of(data: bytes) -> int | None:
    """The CRC-32C of ``data``; None when only the pure-Python one is there and it is too big."""
    if _FAST_CRC32C is not None:
        return _FAST_CRC32C(data)
    if len(data) <= PURE_PYTHON_CRC_LIMIT:
        return crc32c.crc32c(data)
    return None


def _checksummed(entry: BundleEntry, data: bytes) -> bytes | None:
    """The bytes the entry's checksum covers, as ``BundleWriter`` computes it; None if unknown.

    A numeric tensor's checksum covers its stored bytes. A string tensor is
    stored as the varint64 length of each element, a 4-byte checksum of the
    lengths, then the elements; its checksum covers each length as a
    little-endian uint32 (uint64 past 4 GiB: tensor_bundle.cc keeps this for
    backward compatibility) instead of the varint, then the rest as stored.
    Variant and resource tensors are written by other code: not checked.
    """
    if entry.dtype in (_DT_RESOURCE, _DT_VARIANT):
        return None
    if entry.dtype != _DT_STRING:
        return data
    count = 1
    for d in entry.shape:
        count *= d
    lengths, pos = bytearray(), 0
    try:
        for _ in range(count):
            n, pos = varint.decode(data, pos)
            lengths += struct.pack("<I", n) if n <= 0xFFFFFFFF else struct.pack("<Q", n)
    except ValueError:
        return b""  # not even the lengths parse: no checksum can match
    return bytes(lengths) + data[pos:]


def _masked_crc32c(entry: BundleEntry, data: bytes) -> int | None:
    """The masked CRC-32C the index would record for ``data``; None if not checked."""
    covered = _checksummed(entry, data)
    crc = None if covered is None else _crc32c_of(covered)
    if crc is None:
        return None
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@dataclass
class _Span:
    """One ranged GET: ``[start, start + length)`` of a shard, covering some tensors."""

    shard: int
    start: int
    end: int
    #: (tensor key, its index entry) of each tensor inside.
    tensors: list[tuple[str, BundleEntry]] = field(default_factory=list)


def plan_ranges(
    bundle: Bundle, tensors: Iterable[str], gap: int = MERGE_GAP, max_range: int = MAX_RANGE
) -> list[_Span]:
    """The ranged GETs that fetch ``tensors`` of ``bundle``: one per run of close tensors.

    Tensors of one shard are sorted by offset and merged into one request
    while the hole between them is at most ``gap`` bytes and the request
    stays within ``max_range`` (a single tensor larger than that is one
    request of its own). Empty tensors need no bytes. KeyError if a tensor
    is not in the index.
    """
    wanted = sorted(
        (e.shard_id, e.offset, e.size, key)
        for key in set(tensors)
        for e in (bundle.entries[key],)
        if e.size > 0
    )
    spans: list[_Span] = []
    for shard, offset, size, key in wanted:
        last = spans[-1] if spans else None
        end = offset + size
        if (
            last is not None
            and last.shard == shard
            and offset - last.end <= gap
            and max(end, last.end) - last.start <= max_range
        ):
            last.end = max(last.end, end)
        else:
            last = _Span(shard, offset, end)
            spans.append(last)
        last.tensors.append((key, bundle.entries[key]))
    return spans


class _Fetch:
    """The state of one :func:`fetch_checkpoint` call (its threads share it, under a lock)."""

    def __init__(
        self,
        client: ObjectStore,
        total: int,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.client = client
        self.total = total
        self.progress = progress
        self.done = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        """Count ``nbytes`` downloaded and report progress (calls are serialized)."""
        with self._lock:
            self.done += nbytes
            if self.progress is not None:
                self.progress(self.done, max(self.total, self.done))


def _vanished(url: ObjectURL, e: ObjectStoreError) -> Exception:
    """``e`` as the caller should see it: a deleted object means the checkpoint vanished."""
    if e.kind == "not_found":
        return CheckpointVanished(f"{url} was deleted before it could be fetched")
    return e


def _parallel(tasks: list[Callable[[], None]]) -> None:
    """Run ``tasks`` on :data:`FETCH_THREADS` threads; the first error cancels the rest."""
    if not tasks:
        return
    pool = ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(tasks)))
    try:
        futures: list[Future[None]] = [pool.submit(t) for t in tasks]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in finished:
            exc = f.exception()
            if exc is not None:
                raise exc
        for f in futures:
            f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


#: Tensors up to this size are fetched whatever the model needs (:func:`_with_small_tensors`).
SMALL_TENSOR_BYTES = 64 * 1024


def fetch_checkpoint(
    ckpt: Checkpoint,
    staging: Path,
    tensors: Collection[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    client: ObjectStore | None = None,
) -> tuple[Path, str, int]:
    """Download the remote checkpoint ``ckpt`` into ``staging`` (:func:`stage_checkpoint`'s layout).

    Returns the staged local prefix (``staging / ckpt.prefix.name``), the
    method (``"fetch"``: every file whole; ``"fetch-ranges"``: the index whole
    and only ``tensors``' bytes of the data shards, in sparse files of the
    shards' full size) and the bytes downloaded.

    ``tensors``: the checkpoint keys the export reads (for a TF2 checkpoint
    including ``_CHECKPOINTABLE_OBJECT_GRAPH``). Ranges are used only for a
    tensor bundle (``<prefix>.index`` among the files) whose index names
    every one of them unsliced; otherwise everything is fetched whole. Each
    ranged tensor is checked against the masked CRC-32C its index records
    (with the C ``google_crc32c`` when installed; without it tensors over
    :data:`PURE_PYTHON_CRC_LIMIT` are checked by size only); a mismatch
    raises :class:`ObjectStoreError` kind ``corrupt`` naming the object and
    tensor. A TF checkpoint whose index no longer matches its fingerprint was
    rewritten since the scan.

    ``progress(done, total)`` is called, never concurrently, after each piece
    (bytes so far, bytes expected). Raises :class:`CheckpointVanished` when an
    object was deleted (or the checkpoint replaced) meanwhile, and
    :class:`ObjectStoreError` for other store failures. Thread-safe: it runs
    in a worker thread of the supervisor and starts :data:`FETCH_THREADS`
    threads of its own. ``client`` defaults to
    :func:`daemon.objectstore.clients.client_for` of the prefix.
    """
    prefix = ckpt.prefix
    if not isinstance(prefix, ObjectURL):
        raise ValueError(f"{prefix} is a local checkpoint: stage_checkpoint, not fetch_checkpoint")
    if client is None:
        from daemon.objectstore.clients import client_for

        client = client_for(prefix, prefix.endpoint or None)
    folder = prefix.parent
    files: list[tuple[ObjectURL, Path]] = []
    for url in ckpt.files:
        if not isinstance(url, ObjectURL):
            raise ValueError(f"{url} is not on the object store of {prefix}")
        files.append((url, staging / folder.name_of(url.prefix)))
    for _, dst in files:
        dst.parent.mkdir(parents=True, exist_ok=True)
    staged = staging / prefix.name
    sizes = dict(zip((u for u, _ in files), ckpt.sizes, strict=False))
    state = _Fetch(client, sum(ckpt.sizes), progress)

    index = next(((u, d) for u, d in files if u.name == prefix.name + ".index"), None)
    rest = files
    if index is not None:
        rest = [(u, d) for u, d in files if u != index[0]]
        # The index first: it says where the tensors are, and proves the
        # checkpoint is still the one scanned.
        data = _get(state, index[0])
        index[1].write_bytes(data)
        state.add(len(data))
        _check_identity(ckpt, data, sizes, index[0])
        if tensors is not None:
            bundle = _bundle(data, str(staged), tensors)
            if bundle is not None:
                wanted = _with_small_tensors(bundle, tensors)
                _fetch_ranges(state, prefix, bundle, wanted, rest, sizes)
                return staged, "fetch-ranges", state.done

    _parallel([_whole(state, u, d) for u, d in rest])
    return staged, "fetch", state.done


def _whole(state: _Fetch, url: ObjectURL, dst: Path) -> Callable[[], None]:
    """A task downloading object ``url`` to ``dst`` whole."""

    def run() -> None:
        try:
            n = state.client.download(url.prefix, dst)
        except ObjectStoreError as e:
            raise _vanished(url, e) from e
        state.add(n)

    return run


def _get(state: _Fetch, url: ObjectURL) -> bytes:
    try:
        return state.client.get(url.prefix)
    except ObjectStoreError as e:
        raise _vanished(url, e) from e


def _check_identity(
    ckpt: Checkpoint, index: bytes, sizes: dict[ObjectURL, int], url: ObjectURL
) -> None:
    """CheckpointVanished if a TF checkpoint's index is not the one its fingerprint hashed."""
    shard_sizes = [n for u, n in sizes.items() if ".data-" in u.name]
    if len(sizes) != len(ckpt.files) or not shard_sizes:
        return  # sizes not recorded, or not a tensor bundle: nothing to compare
    if index_fingerprint(index, shard_sizes) != ckpt.fingerprint:
        raise CheckpointVanished(f"{url} was rewritten since the scan (another checkpoint now)")


def _bundle(data: bytes, staged: str, tensors: Collection[str]) -> Bundle | None:
    """The parsed index if every needed tensor can be fetched by range, else None."""
    try:
        bundle = parse_index(data, staged)
    except BundleFormatError:
        return None  # TensorFlow will say what is wrong with it; fetch it all
    entries = bundle.entries
    if any(key not in entries or entries[key].sliced for key in tensors):
        return None
    return bundle


def _with_small_tensors(bundle: Bundle, tensors: Collection[str]) -> set[str]:
    """``tensors`` and every tensor of at most :data:`SMALL_TENSOR_BYTES`.

    A weights map names the model's variables only, but the exporter also
    reads the step counters the trainer saved (``step``, ``save_counter``),
    and a tensor left out reads as zeros that fail TensorFlow's checksum. A
    small tensor costs less to fetch than the request it would be merged
    into, so every one is fetched: counters, biases, a small model whole.
    """
    small = {k for k, e in bundle.entries.items() if e.size <= SMALL_TENSOR_BYTES and not e.sliced}
    return set(tensors) | small


def _fetch_ranges(
    state: _Fetch,
    prefix: ObjectURL,
    bundle: Bundle,
    tensors: Collection[str],
    files: list[tuple[ObjectURL, Path]],
    sizes: dict[ObjectURL, int],
) -> None:
    """Sparse local shards of their full size, with only ``tensors``' bytes filled in.

    ``files`` are the checkpoint's files but the index; those that are not
    data shards of ``bundle`` (a TF1 checkpoint's ``.meta`` graph) are
    downloaded whole, alongside.
    """
    by_name = {u.name: (u, d) for u, d in files}
    shard_names = {Path(bundle.data_file(i)).name for i in range(bundle.num_shards)}
    others = [(u, d) for u, d in files if u.name not in shard_names]
    spans = plan_ranges(bundle, tensors)
    state.total = (
        state.done + sum(s.end - s.start for s in spans) + sum(sizes.get(u, 0) for u, _ in others)
    )
    fds: dict[int, int] = {}
    try:
        for shard in range(bundle.num_shards):
            name = Path(bundle.data_file(shard)).name
            if name not in by_name:
                raise CheckpointVanished(f"{prefix}: the index names {name}, not among its files")
            url, dst = by_name[name]
            size = sizes.get(url)
            if size is None:
                try:
                    info = state.client.head(url.prefix)
                except ObjectStoreError as e:
                    raise _vanished(url, e) from e
                if info is None:
                    raise CheckpointVanished(f"{url} was deleted before it could be fetched")
                size = info.size
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds[shard] = fd
            os.ftruncate(fd, size)  # a hole of the shard's size: no disk used

        def fetch(span: _Span) -> Callable[[], None]:
            url = by_name[Path(bundle.data_file(span.shard)).name][0]

            def run() -> None:
                length = span.end - span.start
                try:
                    data = state.client.get_range(url.prefix, span.start, length)
                except ObjectStoreError as e:
                    raise _vanished(url, e) from e
                if len(data) != length:
                    raise ObjectStoreError(
                        "corrupt",
                        "get_range",
                        url.bucket,
                        url.prefix,
                        f"got {len(data)} bytes of {length} at {span.start}: "
                        "the object is shorter than its index says",
                    )
                for key, entry in span.tensors:
                    offset, size = entry.offset, entry.size
                    piece = data[offset - span.start : offset - span.start + size]
                    actual = _masked_crc32c(entry, piece)
                    if actual is not None and actual != entry.crc32c:
                        raise ObjectStoreError(
                            "corrupt",
                            "get_range",
                            url.bucket,
                            url.prefix,
                            f"tensor {key!r} (bytes {offset}..{offset + size}) does not "
                            "match the CRC-32C its index records",
                        )
                os.pwrite(fds[span.shard], data, span.start)
                state.add(length)

            return run

        _parallel([*(_whole(state, u, d) for u, d in others), *(fetch(s) for s in spans)])
    finally:
        for fd in fds.values():
            os.close(fd)
