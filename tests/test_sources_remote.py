"""Scanning checkpoint directories on object stores (moto S3, fake-gcs-server) as on disk.

The same files (real ``tf.train.CheckpointManager`` output, broken the way
trainers and uploads break it) are laid out in a local folder and uploaded
under a fresh prefix; the remote scan must find the same checkpoints, with
the same fingerprints, as the local scan. Polling cost is counted at the
client interface by :class:`CountingStore`, a proxy that forwards every
call to the real client of the test's server.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from remote_checkpoints import write_checkpoints

from daemon.objectstore.client import Listing, ObjectInfo, ObjectStore, ObjectStoreError
from daemon.objectstore.url import ObjectURL
from daemon.sources import SOURCES
from daemon.sources.base import Checkpoint, ScanResult
from daemon.sources.directory import RemoteDirectory
from daemon.sources.saved_model import SavedModelSource
from daemon.sources.tf1_checkpoint import TF1CheckpointSource
from daemon.sources.tf_checkpoint import STATE_FILE, TFCheckpointSource


class CountingStore:
    """Forwards every call to ``inner`` (a real client) and counts the calls by operation."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    @property
    def scheme(self) -> str:
        return self.inner.scheme

    @property
    def bucket(self) -> str:
        return self.inner.bucket

    def list(self, prefix: str, *, delimiter: bool = True, start_after: str = "") -> Listing:
        self.calls["list"] += 1
        return self.inner.list(prefix, delimiter=delimiter, start_after=start_after)

    def head(self, key: str) -> ObjectInfo | None:
        self.calls["head"] += 1
        return self.inner.head(key)

    def get(self, key: str) -> bytes:
        self.calls["get"] += 1
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self.calls["get_range"] += 1
        return self.inner.get_range(key, start, length)

    def download(self, key: str, dest: Path) -> int:
        self.calls["download"] += 1
        return self.inner.download(key, dest)

    def __getattr__(self, name: str) -> Any:  # writes: not counted, not used by scans
        return getattr(self.inner, name)

    def reads(self) -> int:
        return sum(n for op, n in self.calls.items() if op != "list")


def upload(store: ObjectStore, url: ObjectURL, folder: Path) -> None:
    """Every file below ``folder`` as an object below ``url`` (same relative names)."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: store.upload(url.key(p.relative_to(folder).as_posix()), p), files))


def summary(result: ScanResult) -> dict[str, Any]:
    """What must agree between a local and a remote scan of the same files.

    Not the order: it follows write times, and uploads in parallel reorder them.
    """

    def one(c: Checkpoint) -> tuple[Any, ...]:
        return (c.name, c.step, c.fingerprint, [f.name for f in c.files], c.sizes)

    return {
        "checkpoints": sorted(one(c) for c in result.checkpoints),
        "incomplete": sorted(result.incomplete),
        "problems": len(result.problems),
        "exists": result.directory_exists,
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoints(tmp_path_factory.mktemp("written"))


@pytest.fixture
def broken(written: Path, tmp_path: Path) -> Path:
    """The trainer's three checkpoints plus every way a later one can be unfinished."""
    d = tmp_path / "broken"
    shutil.copytree(written / "adam", d)
    index = (d / "ckpt-3.index").read_bytes()
    data = d / "ckpt-3.data-00000-of-00001"
    (d / "ckpt-4.index").write_bytes(index)  # index without its shard (copied alone)
    shutil.copy(data, d / "ckpt-5.data-00000-of-00001")  # shards, index not merged yet
    (d / "ckpt-6.index").write_bytes(index[:-20])  # index still being written: no footer
    shutil.copy(data, d / "ckpt-6.data-00000-of-00001")
    (d / "ckpt-7.index").write_bytes(index)  # 2 of 3 shards
    shutil.copy(data, d / "ckpt-7.data-00000-of-00003")
    shutil.copy(data, d / "ckpt-7.data-00002-of-00003")
    state = (d / STATE_FILE).read_text()
    # The state file names a checkpoint max_to_keep already deleted.
    (d / STATE_FILE).write_text(state + 'all_model_checkpoint_paths: "ckpt-0"\n')
    return d


@pytest.mark.objectstore
def test_a_remote_directory_scans_like_the_same_files_on_disk(
    object_store: tuple[ObjectStore, str, ObjectURL], broken: Path
) -> None:
    store, _, url = object_store
    upload(store, url, broken)
    local = TFCheckpointSource().scan(broken)
    remote = TFCheckpointSource().scan(url)
    assert summary(remote) == summary(local)
    assert sorted(c.name for c in remote.checkpoints) == ["ckpt-1", "ckpt-2", "ckpt-3"]
    # ckpt-5 has no index yet: not even a candidate (as on disk).
    assert sorted(remote.incomplete) == ["ckpt-0", "ckpt-4", "ckpt-6", "ckpt-7"]
    last = next(c for c in remote.checkpoints if c.name == "ckpt-3")
    assert last.prefix == url.child("ckpt-3") and str(last.prefix) == f"{url}/ckpt-3"
    assert last.files == (url.child("ckpt-3.data-00000-of-00001"), url.child("ckpt-3.index"))
    assert last.written_ns > 0
    # Once ckpt-6's index is whole (a new upload replaces the object), it counts.
    store.put(url.key("ckpt-6.index"), (broken / "ckpt-3.index").read_bytes())
    again = TFCheckpointSource().scan(url)
    assert "ckpt-6" in [c.name for c in again.checkpoints]


@pytest.mark.objectstore
def test_tf1_and_saved_model_sources_read_remote_directories(
    object_store: tuple[ObjectStore, str, ObjectURL], written: Path, tmp_path: Path
) -> None:
    store, _, url = object_store
    tf1 = tmp_path / "tf1"
    tf1.mkdir()
    for n in (100, 200):
        for src in (written / "adam").glob("ckpt-1.*"):
            shutil.copy(src, tf1 / src.name.replace("ckpt-1", f"model.ckpt-{n}"))
    (tf1 / "model.ckpt-100.meta").write_bytes(b"graph")  # 200: Saver has not written it yet
    upload(store, url.child("tf1"), tf1)
    local, remote = TF1CheckpointSource().scan(tf1), TF1CheckpointSource().scan(url.child("tf1"))
    assert summary(remote) == summary(local)
    assert [c.name for c in remote.checkpoints] == ["model.ckpt-100"]
    assert remote.incomplete == ["model.ckpt-200"]
    assert remote.checkpoints[0].files[-1] == url.child("tf1/model.ckpt-100.meta")

    sm = tmp_path / "sm"
    for name, marked in (("1700000100", True), ("1700000200", False), ("temp-1", True)):
        (sm / name / "variables").mkdir(parents=True)
        (sm / name / "saved_model.pb").write_bytes(b"graph " + name.encode())
        (sm / name / "variables" / "variables.index").write_bytes(b"index")
        (sm / name / "variables" / "variables.data-00000-of-00001").write_bytes(b"data")
        if marked:
            (sm / name / "_SUCCESS").write_bytes(b"")
    (sm / "not-a-model").mkdir()
    (sm / "not-a-model" / "events.out").write_bytes(b"x")
    upload(store, url.child("sm"), sm)
    source, counting = SavedModelSource({"marker": "_SUCCESS"}), CountingStore(store)
    view = RemoteDirectory(url.child("sm"), counting)
    remote = source.scan(view)
    assert summary(remote) == summary(SavedModelSource({"marker": "_SUCCESS"}).scan(sm))
    assert [c.name for c in remote.checkpoints] == ["1700000100"]
    assert remote.incomplete == ["1700000200"]
    # One listing of every level, then two GETs (saved_model.pb, variables.index) once.
    assert counting.calls == Counter(list=1, get=2)
    counting.calls.clear()
    source.scan(view)
    assert counting.calls == Counter(list=1)
    # Without a marker, a remote tree settles as a local one does (store time).
    unsettled = SavedModelSource({"settle_seconds": 3600}).scan(url.child("sm"))
    assert unsettled.checkpoints == [] and sorted(unsettled.incomplete) == [
        "1700000100",
        "1700000200",
    ]
    assert unsettled.recheck_at is not None and unsettled.recheck_at > time.time() + 3000


@pytest.mark.objectstore
def test_a_poll_costs_one_listing_however_many_old_checkpoints(
    object_store: tuple[ObjectStore, str, ObjectURL], written: Path, tmp_path: Path
) -> None:
    store, _, url = object_store
    old = 1000
    index = (written / "mixed" / "ckpt.index").read_bytes()
    data = (written / "mixed" / "ckpt.data-00000-of-00001").read_bytes()

    def put(n: int) -> None:
        store.put(url.key(f"ckpt-{n}.data-00000-of-00001"), data)
        store.put(url.key(f"ckpt-{n}.index"), index)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(1, old + 1)))
    store.put(url.key(STATE_FILE), f'model_checkpoint_path: "ckpt-{old}"\n'.encode())

    counting = CountingStore(store)
    source, view = TFCheckpointSource(), RemoteDirectory(url, counting)
    first = source.scan(view)
    assert len(first.checkpoints) == old
    # The first poll reads each index once (and the state file), in one listing.
    assert counting.calls == Counter(list=1, get=old + 1)
    for _ in range(3):
        counting.calls.clear()
        t0 = time.monotonic()
        again = source.scan(view)
        elapsed = time.monotonic() - t0
        assert counting.calls == Counter(list=1), counting.calls
        assert len(again.checkpoints) == old
    print(f"\n{url.scheme}: poll of {2 * old + 1} objects: 1 listing, 0 GETs, {elapsed:.2f} s")
    # A new checkpoint costs its own index, nothing else.
    put(old + 1)
    counting.calls.clear()
    newest = source.scan(view)
    assert counting.calls == Counter(list=1, get=1)
    assert newest.checkpoints[-1].name == f"ckpt-{old + 1}"
    # Deleted ones (max_to_keep) are forgotten: their cache does not grow forever.
    for n in range(1, 11):
        store.delete(url.key(f"ckpt-{n}.index"))
    counting.calls.clear()
    assert len(source.scan(view).checkpoints) == old + 1 - 10
    assert counting.calls == Counter(list=1)
    assert len(source._fp_cache) == old + 1 - 10


@pytest.mark.objectstore
def test_a_missing_prefix_is_a_directory_not_there_yet_and_store_errors_propagate(
    object_store: tuple[ObjectStore, str, ObjectURL],
) -> None:
    _, _, url = object_store
    for kind in ("tf_checkpoint", "tf1_checkpoint", "saved_model"):
        assert SOURCES[kind].remote_dirs
        result = SOURCES[kind].scanner({}).scan(url.child("not-yet"))
        assert not result.directory_exists and result.checkpoints == []
    assert not SOURCES["command"].remote_dirs and not SOURCES["keras"].remote_dirs
    no_bucket = ObjectURL(url.scheme, "no-such-bucket-here", "run", url.endpoint)
    with pytest.raises(ObjectStoreError) as e:
        TFCheckpointSource().scan(no_bucket)
    assert e.value.kind == "no_bucket"


def test_local_scans_still_take_paths_and_record_sizes(written: Path) -> None:
    result = TFCheckpointSource().scan(written / "adam")
    last = result.checkpoints[-1]
    assert isinstance(last.prefix, Path)
    assert last.sizes == tuple(os.path.getsize(str(f)) for f in last.files)
