"""A base path on an object store (:mod:`daemon.basepath.objects`, :mod:`daemon.basepath.lease`).

What the backend-parametrised contract tests (``tests/test_storage.py``)
cannot say: the order objects appear and go in, claims, partial versions,
verification, the lease, and faults between the client and the server.
Every test runs once per store (the ``object_store`` fixture: moto for S3,
fake-gcs-server for GCS, on 127.0.0.1). Faults come from
:class:`faultproxy.FaultProxy` in front of the server. :class:`Recording`
wraps the real client to record the calls made on it in order (and, where
a test says so, to change an object right after it was uploaded, as another
writer would); every call reaches the real server.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from faultproxy import FaultProxy

from daemon.basepath import lease as lease_module
from daemon.basepath import operations, records
from daemon.basepath import publish as publish_module
from daemon.basepath.layout import (
    LOCK_NAME,
    METADATA_RELPATH,
    PINS_NAME,
    REJECTED_NAME,
    ROLLED_BACK_DIRNAME,
    STATE_DIRNAME,
)
from daemon.basepath.lease import LeaseLock, held_lease
from daemon.basepath.objects import CLAIMS_DIRNAME, SAVED_MODEL_PB, ObjectStorage
from daemon.basepath.storage import BasePathStorage, PublishLock, storage_for
from daemon.objectstore.client import Listing, ObjectInfo, ObjectStore, ObjectStoreError
from daemon.objectstore.gcs import GCSStore
from daemon.objectstore.s3 import S3Store
from daemon.objectstore.url import ObjectURL
from daemon.rules.versions import list_versions, next_version

pytestmark = pytest.mark.objectstore

Case = tuple[ObjectStore, str, ObjectURL]
COMMIT = METADATA_RELPATH.as_posix()
T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Local export, staging and failed folders of every storage go under the test's tmp_path."""
    path = tmp_path / "scratch"
    monkeypatch.setenv("CKPT_EXPORTER_SCRATCH_DIR", str(path))
    return path


# --- helpers ---------------------------------------------------------------------


class Recording:
    """The real client, with every call recorded as ``(event, operation, key)`` in order.

    ``event`` is ``"start"`` or ``"end"`` (an ``"end"`` only for a call that
    returned). ``after_upload(key)``, when set, runs right after an upload of
    ``key`` returned, on the real client (another writer changing an object).
    """

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.events: list[tuple[str, str, str]] = []
        self.after_upload: Callable[[str], None] | None = None
        self._lock = threading.Lock()

    @property
    def scheme(self) -> str:
        return self.inner.scheme

    @property
    def bucket(self) -> str:
        return self.inner.bucket

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        with self._lock:
            self.events.append(("start", op, key))
        result = fn()
        with self._lock:
            self.events.append(("end", op, key))
        return result

    def list(self, prefix: str, *, delimiter: bool = True, start_after: str = "") -> Listing:
        return self._call(
            "list",
            prefix,
            lambda: self.inner.list(prefix, delimiter=delimiter, start_after=start_after),
        )

    def head(self, key: str) -> ObjectInfo | None:
        return self._call("head", key, lambda: self.inner.head(key))

    def get(self, key: str) -> bytes:
        return self._call("get", key, lambda: self.inner.get(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._call("get_range", key, lambda: self.inner.get_range(key, start, length))

    def download(self, key: str, dest: Path) -> int:
        return self._call("download", key, lambda: self.inner.download(key, dest))

    def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_token: str | None = None
    ) -> ObjectInfo:
        return self._call(
            "put", key, lambda: self.inner.put(key, data, if_absent=if_absent, if_token=if_token)
        )

    def upload(self, key: str, source: Path, *, if_absent: bool = False) -> ObjectInfo:
        info = self._call(
            "upload", key, lambda: self.inner.upload(key, source, if_absent=if_absent)
        )
        if self.after_upload is not None:
            self.after_upload(key)
        return info

    def verify(self, key: str, source: Path) -> None:
        self._call("verify", key, lambda: self.inner.verify(key, source))

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.inner.delete(key))

    def copy(self, source_key: str, dest_key: str) -> None:
        self._call("copy", dest_key, lambda: self.inner.copy(source_key, dest_key))

    def index(self, event: str, op: str, key: str) -> int:
        """Where ``(event, op, key)`` happened (ValueError when it never did)."""
        return self.events.index((event, op, key))

    def keys(self, op: str, below: str, event: str = "start") -> list[str]:
        """Keys of ``op`` calls below the key prefix ``below``, in the order they happened."""
        return [k for e, o, k in self.events if e == event and o == op and k.startswith(below)]


def make_export(
    storage: BasePathStorage, payload: bytes = b"m", big: int = 0, huge: int = 0
) -> Path:
    """A SavedModel-shaped export: saved_model.pb, a sharded checkpoint, an asset.

    ``big``: bytes of each variables data shard and of the asset (several
    requests' worth, for faults mid-upload). ``huge``: bytes of one more
    asset, ``assets/huge.bin`` (above 8 MiB, the GCS library uploads a file
    in a resumable session, whose requests a fault rule can pick out).
    """
    export = storage.new_export_dir()
    variables = export / "variables"
    variables.mkdir()
    (export / "assets").mkdir()
    (export / SAVED_MODEL_PB).write_bytes(b"graph:" + payload)
    (export / "fingerprint.pb").write_bytes(b"fp:" + payload)
    (variables / "variables.index").write_bytes(b"index:" + payload * 10)
    for i in range(3):
        (variables / f"variables.data-0000{i}-of-00003").write_bytes(
            bytes([i + 1]) * big + payload * (i + 1)
        )
    (export / "assets" / "big.bin").write_bytes(b"a" * big + payload)
    if huge:
        (export / "assets" / "huge.bin").write_bytes(b"h" * huge)
    return export


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def remote_files(store: ObjectStore, url: ObjectURL, name: str) -> dict[str, bytes]:
    """Every object of ``name`` below ``url``, by path inside it, with its content."""
    folder = url.key(name) + "/"
    return {
        o.key[len(folder) :]: store.get(o.key) for o in store.list(folder, delimiter=False).objects
    }


def versions(storage: BasePathStorage) -> list[str]:
    return [e.name for e in list_versions(storage.list_children())]


@contextlib.contextmanager
def lease_of(storage: BasePathStorage) -> Iterator[PublishLock]:
    """The base path's lease, held for the block (what the daemon does around a publish)."""
    lock = storage.publish_lock()
    assert lock.try_acquire()
    try:
        yield lock
    finally:
        lock.release()


def publish(
    storage: BasePathStorage, export: Path, choose: Callable[[list[int]], int] = next_version
) -> int:
    with lease_of(storage):
        version, _ = storage.publish(export, choose, {"model": "m"})
    return version


def lease_key(url: ObjectURL) -> str:
    return url.key(f"{STATE_DIRNAME}/{LOCK_NAME}")


def claim_key(url: ObjectURL, version: int) -> str:
    return url.key(f"{STATE_DIRNAME}/{CLAIMS_DIRNAME}/{version}")


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- the backend ------------------------------------------------------------------


def test_storage_for_a_url_is_the_object_store_backend(object_store: Case) -> None:
    _, _, url = object_store
    storage = storage_for(url)
    assert isinstance(storage, ObjectStorage) and isinstance(storage, BasePathStorage)
    assert storage.base_path == url
    lock = storage.publish_lock()
    assert isinstance(lock, PublishLock) and isinstance(lock, LeaseLock)
    assert str(lock.path) == f"{url}/{STATE_DIRNAME}/{LOCK_NAME}"


# --- publication order --------------------------------------------------------------


def test_saved_model_pb_comes_after_every_variable_and_the_commit_record_last(
    object_store: Case,
) -> None:
    store, _, url = object_store
    rec = Recording(store)
    storage = ObjectStorage(url, rec)
    export = make_export(storage)
    expected = local_files(export)
    assert publish(storage, export) == 1

    below = url.key("1") + "/"
    uploads = rec.keys("upload", below)
    pb, commit = url.key(f"1/{SAVED_MODEL_PB}"), url.key(f"1/{COMMIT}")
    body = [url.key(f"1/{rel}") for rel in expected if rel != SAVED_MODEL_PB]
    assert sorted(uploads) == sorted([*body, pb, commit])
    # The claim first, before anything of the version exists.
    claimed = rec.index("end", "put", claim_key(url, 1))
    assert all(rec.index("start", "upload", k) > claimed for k in uploads)
    # saved_model.pb starts only once every other file is uploaded and verified ...
    pb_start = rec.index("start", "upload", pb)
    for k in body:
        assert rec.index("end", "upload", k) < pb_start, k
        assert rec.index("end", "verify", k) < pb_start, k
    # ... and the commit record only once saved_model.pb is there and verified.
    commit_start = rec.index("start", "upload", commit)
    assert rec.index("end", "verify", pb) < commit_start
    assert uploads[-1] == commit and commit_start == max(
        rec.index("start", "upload", k) for k in uploads
    )
    # What is in the bucket is the export, plus the commit record.
    remote = remote_files(store, url, "1")
    assert {k: v for k, v in remote.items() if k != COMMIT} == expected
    meta = json.loads(remote[COMMIT])
    assert (meta["model"], meta["version"]) == ("m", 1)
    assert storage.read_version_metadata("1") == meta


def test_a_reader_polling_during_a_publish_never_sees_saved_model_pb_before_the_variables(
    object_store: Case,
) -> None:
    """What TF Serving's poll would see: listings taken while a version is uploaded."""
    store, _, url = object_store
    storage = ObjectStorage(url, store)
    export = make_export(storage, big=64 * KiB)
    everything = set(local_files(export))
    snapshots: list[set[str]] = []
    stop = threading.Event()

    def poll() -> None:
        folder = url.key("1") + "/"
        while not stop.is_set():
            listing = store.list(folder, delimiter=False)
            snapshots.append({o.key[len(folder) :] for o in listing.objects})

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        publish(storage, export)
    finally:
        stop.set()
        poller.join()
    snapshots.append(set(remote_files(store, url, "1")))
    assert len(snapshots) > 1
    for seen in snapshots:
        if SAVED_MODEL_PB in seen:
            assert everything <= seen, sorted(everything - seen)
        if COMMIT in seen:
            assert everything | {COMMIT} == seen
    assert snapshots[-1] == everything | {COMMIT}


# --- claims ---------------------------------------------------------------------------------


def test_two_publishers_racing_never_take_one_number(object_store: Case) -> None:
    store, _, url = object_store
    a, b = ObjectStorage(url, store), ObjectStorage(url, store)
    published: list[int] = []
    seen: list[list[int]] = []
    errors: list[BaseException] = []
    for round_ in range(3):
        barrier = threading.Barrier(2, timeout=30)

        def run(storage: ObjectStorage, tag: bytes, barrier: threading.Barrier = barrier) -> None:
            first = [True]

            def choose(existing: list[int]) -> int:
                seen.append(sorted(existing))
                if first[0]:
                    first[0] = False
                    barrier.wait()  # both choose from the same listing: the same number
                return next_version(existing)

            try:
                version, _ = storage.publish(
                    make_export(storage, tag), choose, {"tag": tag.decode()}
                )
                published.append(version)
            except BaseException as e:
                errors.append(e)

        with lease_of(a):  # the publishers' lease (registered for the whole process)
            threads = [
                threading.Thread(target=run, args=(a, f"a{round_}".encode())),
                threading.Thread(target=run, args=(b, f"b{round_}".encode())),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    assert errors == []
    assert sorted(published) == [1, 2, 3, 4, 5, 6]
    # Each loser chose again, shown the number the winner had claimed.
    assert [1] in seen and [1, 2, 3] in seen and [1, 2, 3, 4, 5] in seen
    for v in published:
        meta = a.read_version_metadata(str(v))
        assert meta is not None and meta["version"] == v
        tag = meta["tag"].encode()
        assert store.get(url.key(f"{v}/{SAVED_MODEL_PB}")) == b"graph:" + tag
    assert versions(a) == [str(v) for v in range(1, 7)]


def _leave_partial(store: ObjectStore, url: ObjectURL, version: int, pb: bool = True) -> list[str]:
    """What a publisher that died after its claim leaves: the claim and some files, no commit."""
    store.put(claim_key(url, version), b'{"pid": 1}', if_absent=True)
    keys = [url.key(f"{version}/variables/variables.index"), url.key(f"{version}/fingerprint.pb")]
    if pb:
        keys.append(url.key(f"{version}/{SAVED_MODEL_PB}"))
    for k in keys:
        store.put(k, b"half", if_absent=True)
    return keys


def test_a_partial_version_is_removed_saved_model_pb_first_and_its_number_never_reused(
    object_store: Case,
) -> None:
    store, _, url = object_store
    rec = Recording(store)
    storage = ObjectStorage(url, rec)
    assert publish(storage, make_export(storage, b"one")) == 1
    partial = _leave_partial(store, url, 2)
    store.put(url.key(f"9/{SAVED_MODEL_PB}"), b"by hand")  # no claim: not ours, never touched
    assert versions(storage) == ["1", "2", "9"]
    rec.events.clear()

    assert publish(storage, make_export(storage, b"two")) == 10

    deleted = rec.keys("delete", url.key("2") + "/")
    assert sorted(deleted) == sorted(partial)
    assert deleted[0] == url.key(f"2/{SAVED_MODEL_PB}")
    # Removed before the new version's first upload.
    last_delete = max(rec.index("end", "delete", k) for k in deleted)
    assert all(
        rec.index("start", "upload", k) > last_delete for k in rec.keys("upload", url.key("10"))
    )
    assert remote_files(store, url, "2") == {}
    assert store.get(url.key(f"9/{SAVED_MODEL_PB}")) == b"by hand"
    assert storage.read_version_metadata("1") is not None
    # The partial number stays claimed: never chosen again, even once nothing is above it.
    storage.remove_version("10")
    storage.remove_version("9")
    assert publish(storage, make_export(storage, b"three")) == 11
    assert versions(storage) == ["1", "11"]
    assert store.head(claim_key(url, 2)) is not None


def test_prepare_removes_a_partial_version_when_the_lease_is_free(object_store: Case) -> None:
    store, _, url = object_store
    storage = ObjectStorage(url, store)
    _leave_partial(store, url, 1, pb=False)  # died before saved_model.pb
    other = ObjectStorage(url, store)
    with lease_of(other):  # another publisher at work: its version may be partial now
        storage.prepare()
        assert remote_files(store, url, "1") != {}
    storage.prepare()
    assert remote_files(store, url, "1") == {}
    assert versions(storage) == []
    assert store.head(lease_key(url)) is None  # the lease prepare took is given back


def test_a_number_occupied_by_hand_is_never_claimed_and_nothing_foreign_is_deleted(
    object_store: Case,
) -> None:
    store, _, url = object_store
    storage = ObjectStorage(url, store)
    calls: list[list[int]] = []

    def choose(existing: list[int]) -> int:
        calls.append(sorted(existing))
        if len(calls) == 1:
            store.put(url.key(f"1/{SAVED_MODEL_PB}"), b"theirs")  # between choice and claim
            return 1
        return next_version(existing)

    assert publish(storage, make_export(storage), choose) == 2
    assert calls == [[], [1]]
    assert remote_files(store, url, "1") == {SAVED_MODEL_PB: b"theirs"}
    # The claim on 1 was given back: the next publish does not take the
    # foreign version for a partial one of ours.
    assert store.head(claim_key(url, 1)) is None
    assert publish(storage, make_export(storage)) == 3
    assert remote_files(store, url, "1") == {SAVED_MODEL_PB: b"theirs"}


# --- verification ------------------------------------------------------------------


def test_an_object_changed_after_its_upload_fails_verification_and_nothing_is_committed(
    object_store: Case,
) -> None:
    store, _, url = object_store
    rec = Recording(store)
    storage = ObjectStorage(url, rec)
    target = url.key("1/variables/variables.data-00001-of-00003")

    def tamper(key: str) -> None:
        if key == target:
            size = len(store.get(key))
            store.put(key, b"\x00" * size)  # same size, other bytes

    rec.after_upload = tamper
    export = make_export(storage)
    before = local_files(export)
    with lease_of(storage), pytest.raises(ObjectStoreError) as info:
        storage.publish(export, next_version, {})
    assert info.value.kind == "corrupt" and target in str(info.value)
    # saved_model.pb was never uploaded, the commit record never written,
    # and what was uploaded is gone again.
    assert rec.keys("upload", url.key(f"1/{SAVED_MODEL_PB}")) == []
    assert rec.keys("upload", url.key(f"1/{COMMIT}")) == []
    assert storage.read_version_metadata("1") is None
    assert remote_files(store, url, "1") == {}
    assert versions(storage) == []
    # The export is still there, whole, to keep aside or publish again.
    assert {k: v for k, v in local_files(export).items() if k != COMMIT} == before
    rec.after_upload = None
    assert publish(storage, export) == 2
    assert storage.read_version_metadata("2") is not None


# --- the lease ------------------------------------------------------------------------


def test_the_lease_is_taken_create_only_and_excludes_everyone_else(object_store: Case) -> None:
    store, _, url = object_store
    storage = ObjectStorage(url, store)
    first = storage.publish_lock()
    assert isinstance(first, LeaseLock)
    assert first.holder() == "unknown"
    assert first.try_acquire() is True
    assert first.held() and held_lease(url) is first
    content = json.loads(store.get(lease_key(url)))
    assert content["owner"] == first.owner and content["pid"] > 0
    assert time.time() < content["expires_at"] <= time.time() + lease_module.LEASE_SECONDS
    second = ObjectStorage(url, store).publish_lock()
    assert second.try_acquire() is False
    assert second.holder().startswith(f"pid {content['pid']} on ")
    second.release()  # not held: changes nothing
    assert store.head(lease_key(url)) is not None and first.held()
    first.release()
    assert store.head(lease_key(url)) is None and held_lease(url) is None
    assert not first.held()

    # Many takers at once: exactly one wins.
    takers = [ObjectStorage(url, store).publish_lock() for _ in range(8)]
    barrier = threading.Barrier(len(takers), timeout=30)
    won: list[bool] = [False] * len(takers)

    def take(i: int) -> None:
        barrier.wait()
        won[i] = takers[i].try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(takers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won.count(True) == 1
    for t in takers:
        t.release()
    assert store.head(lease_key(url)) is None


def test_renewal_keeps_the_lease_past_its_ttl(
    object_store: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, url = object_store
    monkeypatch.setattr(lease_module, "LEASE_SECONDS", 0.9)
    monkeypatch.setattr(lease_module, "TAKEOVER_GRACE_SECONDS", 0.2)
    storage = ObjectStorage(url, store)
    lock = storage.publish_lock()
    assert isinstance(lock, LeaseLock) and lock.ttl == 0.9
    assert lock.try_acquire()
    try:
        written = json.loads(store.get(lease_key(url)))["expires_at"]
        time.sleep(2.0)  # more than twice the ttl
        assert lock.held()
        assert json.loads(store.get(lease_key(url)))["expires_at"] > written + 0.5
        assert ObjectStorage(url, store).publish_lock().try_acquire() is False
        # And a publish under it commits.
        assert storage.publish(make_export(storage), next_version, {})[0] == 1
    finally:
        lock.release()
    assert storage.read_version_metadata("1") is not None


def _dead_lease(store: ObjectStore, url: ObjectURL, expires_in: float) -> None:
    """The lease a holder that died left behind, expiring ``expires_in`` seconds from now."""
    body = {"owner": "gone:1:x", "host": "gone", "pid": 1, "expires_at": time.time() + expires_in}
    store.put(lease_key(url), json.dumps(body).encode())


def test_an_expired_lease_is_taken_over_after_the_grace_and_by_one_taker_only(
    object_store: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, url = object_store
    monkeypatch.setattr(lease_module, "TAKEOVER_GRACE_SECONDS", 0.8)
    _dead_lease(store, url, expires_in=0.5)
    lock = ObjectStorage(url, store).publish_lock()
    assert lock.try_acquire() is False  # not expired
    time.sleep(0.8)
    assert lock.try_acquire() is False  # expired, but within the grace
    time.sleep(0.8)
    assert lock.try_acquire() is True
    assert json.loads(store.get(lease_key(url)))["pid"] != 1
    lock.release()

    _dead_lease(store, url, expires_in=-5)  # long expired: two takers at once, one wins
    takers = [ObjectStorage(url, store).publish_lock() for _ in range(4)]
    barrier = threading.Barrier(len(takers), timeout=30)
    won = [False] * len(takers)

    def take(i: int) -> None:
        barrier.wait()
        won[i] = takers[i].try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(takers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won.count(True) == 1
    for t in takers:
        t.release()


def test_a_dead_holder_on_this_machine_loses_its_lease_at_once_elsewhere_at_expiry(
    object_store: Case,
) -> None:
    """A daemon restarted after a crash does not wait out its own dead lease."""
    store, _, url = object_store
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that was alive on this machine and is gone now
    body = {"pid": dead.pid, "host": "h", "expires_at": time.time() + 300}
    # Written from another machine (or PID namespace): its PID means nothing here.
    store.put(lease_key(url), json.dumps(dict(body, machine="elsewhere/boot/1")).encode())
    lock = ObjectStorage(url, store).publish_lock()
    assert lock.try_acquire() is False
    # A live holder on this machine keeps it, whatever its expiry.
    alive = dict(body, pid=os.getppid(), machine=lease_module.MACHINE)
    store.put(lease_key(url), json.dumps(alive).encode())
    assert lock.try_acquire() is False
    # Written here by the dead process: taken at once, the usual conditional way.
    store.put(lease_key(url), json.dumps(dict(body, machine=lease_module.MACHINE)).encode())
    assert lease_module.MACHINE  # this machine can tell (Linux /proc)
    assert lock.try_acquire() is True
    assert json.loads(store.get(lease_key(url)))["pid"] == os.getpid()
    lock.release()


def test_a_lease_that_is_not_ours_expires_a_ttl_after_its_last_write(
    object_store: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, url = object_store
    monkeypatch.setattr(lease_module, "LEASE_SECONDS", 1.5)
    monkeypatch.setattr(lease_module, "TAKEOVER_GRACE_SECONDS", 0.2)
    store.put(lease_key(url), b"written by some other tool")
    lock = ObjectStorage(url, store).publish_lock()
    assert lock.try_acquire() is False  # just written: not taken at once
    wait_until(lock.try_acquire, 6, "the foreign lease to expire")
    lock.release()


def test_a_holder_that_lost_its_lease_sees_it_and_publish_refuses_to_commit(
    object_store: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, url = object_store
    monkeypatch.setattr(lease_module, "LEASE_SECONDS", 0.9)
    storage = ObjectStorage(url, store)
    lock = storage.publish_lock()
    assert isinstance(lock, LeaseLock)
    assert lock.try_acquire()
    try:
        # Another process took the lease over (we were paused past its expiry).
        theirs = {"owner": "other:2:y", "host": "other", "pid": 2, "expires_at": time.time() + 60}
        store.put(lease_key(url), json.dumps(theirs).encode())
        wait_until(lambda: not lock.held(), 5, "the renewal to find the lease taken over")
        assert held_lease(url) is lock  # still registered: publish asks it
        export = make_export(storage)
        with pytest.raises(ObjectStoreError) as info:
            storage.publish(export, next_version, {})
        assert info.value.kind == "precondition" and "lease" in str(info.value)
        assert storage.read_version_metadata("1") is None
        assert remote_files(store, url, "1") == {}
        assert (export / SAVED_MODEL_PB).is_file()
    finally:
        lock.release()
    # Release leaves the new holder's lease alone.
    assert json.loads(store.get(lease_key(url)))["owner"] == "other:2:y"


def test_publish_without_the_lease_commits_nothing(object_store: Case) -> None:
    store, _, url = object_store
    storage = ObjectStorage(url, store)
    with pytest.raises(ObjectStoreError) as info:
        storage.publish(make_export(storage), next_version, {})
    assert info.value.kind == "precondition"
    assert versions(storage) == [] and storage.read_version_metadata("1") is None


# --- versions leaving, records, reading --------------------------------------------------


def test_removal_and_rollback_on_the_remote_layout(object_store: Case) -> None:
    store, _, url = object_store
    rec = Recording(store)
    storage = ObjectStorage(url, rec)
    exports = [make_export(storage, f"v{i}".encode()) for i in range(1, 4)]
    contents = [local_files(e) for e in exports]
    for i, export in enumerate(exports, start=1):
        assert publish(storage, export) == i
    rec.events.clear()

    storage.remove_version("1")  # what retention does
    deleted = rec.keys("delete", url.key("1") + "/")
    assert deleted[:2] == [url.key(f"1/{SAVED_MODEL_PB}"), url.key(f"1/{COMMIT}")]
    assert sorted(deleted) == sorted(url.key(f"1/{k}") for k in [*contents[0], COMMIT])
    assert versions(storage) == ["2", "3"]

    rec.events.clear()
    where = storage.move_to_rolled_back("2", "2-20240101T000000Z")
    assert where == url / STATE_DIRNAME / ROLLED_BACK_DIRNAME / "2-20240101T000000Z"
    # Every copy is made before the first delete, and the delete is in the safe order.
    copies = [i for i, (e, op, _k) in enumerate(rec.events) if op == "copy" and e == "end"]
    deletes = [i for i, (e, op, _k) in enumerate(rec.events) if op == "delete" and e == "start"]
    assert copies and deletes and max(copies) < min(deletes)
    assert rec.keys("delete", url.key("2") + "/")[0] == url.key(f"2/{SAVED_MODEL_PB}")
    kept = remote_files(store, url, f"{STATE_DIRNAME}/{ROLLED_BACK_DIRNAME}/2-20240101T000000Z")
    assert {k: v for k, v in kept.items() if k != COMMIT} == contents[1]
    assert json.loads(kept[COMMIT])["version"] == 2
    assert versions(storage) == ["3"]
    again = storage.move_to_rolled_back("3", "2-20240101T000000Z")
    assert again.name == "2-20240101T000000Z-1"
    assert versions(storage) == []
    # Through the base-path function the supervisor calls, a missing version is an error.
    with pytest.raises(FileNotFoundError):
        publish_module.remove_version(url / "3")
    with pytest.raises(FileNotFoundError):
        storage.move_to_rolled_back("1", "x")


def test_records_round_trip_in_the_state_folder(object_store: Case) -> None:
    store, _, url = object_store
    storage = ObjectStorage(url, store)
    with pytest.raises(FileNotFoundError):
        storage.read_record(PINS_NAME)
    assert operations.read_pins(url) == frozenset()
    storage.write_record(PINS_NAME, [3, 1])
    assert json.loads(store.get(url.key(f"{STATE_DIRNAME}/{PINS_NAME}"))) == [3, 1]
    assert operations.read_pins(url) == frozenset({1, 3})
    records.write_rejected(url, {"fp": {"reason": "bad"}})
    assert records.read_rejected(url) == {"fp": {"reason": "bad"}}
    assert ObjectStorage(url, store).read_record(REJECTED_NAME) == {"fp": {"reason": "bad"}}
    storage.delete_record(PINS_NAME)
    storage.delete_record(PINS_NAME)  # gone: no error
    with pytest.raises(FileNotFoundError):
        storage.read_record(PINS_NAME)
    store.put(url.key(f"{STATE_DIRNAME}/{PINS_NAME}"), b"[1,")
    with pytest.raises(ValueError):
        storage.read_record(PINS_NAME)
    assert versions(storage) == []  # records never look like versions


def test_listing_sizes_metadata_and_the_local_copy(object_store: Case) -> None:
    store, _, url = object_store
    storage = ObjectStorage(url, store)
    first, second = make_export(storage, b"1"), make_export(storage, b"22")
    sizes = [sum(len(v) for v in local_files(e).values()) for e in (first, second)]
    publish(storage, first)
    publish(storage, second)
    store.put(url.key("notes.txt"), b"hello")
    children = set(storage.list_children())
    assert {("1", True), ("2", True), ("notes.txt", False), (STATE_DIRNAME, True)} <= children
    for name, size in (("1", sizes[0]), ("2", sizes[1])):
        commit = len(store.get(url.key(f"{name}/{COMMIT}")))
        assert storage.version_bytes(name) == size + commit
        meta = storage.read_version_metadata(name)
        assert meta is not None and meta["version"] == int(name) and meta["model"] == "m"
    assert storage.version_bytes("404") == 0 and storage.read_version_metadata("404") is None
    # Only the last upload is kept locally, whole, for the next export to reuse.
    assert storage.local_copy("1") is None
    kept = storage.local_copy("2")
    assert kept is not None
    assert local_files(kept) == {
        k[len("2/") :]: v
        for k, v in ((f"2/{k}", v) for k, v in remote_files(store, url, "2").items())
    }
    assert storage.exists() and not ObjectStorage(url / "nothing", store).exists()


# --- a missing bucket -----------------------------------------------------------------------


def test_a_missing_bucket_is_no_bucket_naming_it(object_store: Case) -> None:
    _, _, url = object_store
    missing = ObjectURL(url.scheme, "ckpt-no-such-bucket", "models/m")
    storage = storage_for(missing)
    export = make_export(storage)
    for call in (
        storage.prepare,
        lambda: storage.publish(export, next_version, {}),
        storage.publish_lock().try_acquire,
    ):
        with pytest.raises(ObjectStoreError) as info:
            call()
        assert info.value.kind == "no_bucket", info.value
        assert "ckpt-no-such-bucket" in str(info.value)
    assert (export / SAVED_MODEL_PB).is_file()


# --- faults between the client and the server ---------------------------------------------


@pytest.fixture
def proxied(
    object_store: Case, request: pytest.FixtureRequest
) -> Iterator[Callable[[int], tuple[ObjectStore, FaultProxy]]]:
    """``make(attempts)``: a client of the test's store through a fault proxy, fast retries.

    S3 requests name their key in the path, so a rule picks out one file's
    upload. A GCS upload names its object in the body, except the chunks
    (``PUT ...upload_id=``) of a resumable session, used above 8 MiB: rules
    pick out those, or any single-request upload (``uploadType=multipart``).
    """
    store, bucket, _ = object_store
    server = request.getfixturevalue("s3_server" if store.scheme == "s3" else "gcs_server")
    proxies: list[FaultProxy] = []

    def make(attempts: int) -> tuple[ObjectStore, FaultProxy]:
        proxy = FaultProxy(server.url, flavor="s3" if store.scheme == "s3" else "gcs").start()
        proxies.append(proxy)
        client: ObjectStore
        if store.scheme == "s3":
            client = S3Store(bucket, endpoint_url=proxy.url, max_attempts=attempts)
        else:
            client = GCSStore(
                bucket,
                endpoint_url=proxy.url,
                max_retries=attempts - 1,
                initial_delay=0.05,
                max_delay=0.2,
                resumable_threshold=1 * MiB,
                chunk_size=1 * MiB,
            )
        return client, proxy

    yield make
    for p in proxies:
        p.stop()


def _upload_rule(scheme: str, shard: str) -> tuple[str, str]:
    """Method and path of the upload of one file of version 1 (GCS: a resumable session's chunk)."""
    if scheme == "s3":
        return "PUT", rf"/1/{shard}"
    return "PUT", r"upload_id="


def _huge(scheme: str) -> int:
    """Bytes of ``assets/huge.bin``: on GCS, one file uploaded in a resumable session."""
    return 0 if scheme == "s3" else 9 * MiB


def _verified(store: ObjectStore, url: ObjectURL, name: str, export: dict[str, bytes]) -> None:
    remote = remote_files(store, url, name)
    assert {k: v for k, v in remote.items() if k != COMMIT} == export
    assert json.loads(remote[COMMIT])["version"] == int(name)


def test_publish_rides_out_error_answers_and_a_reset_mid_upload(
    object_store: Case, proxied: Any, tmp_path: Path
) -> None:
    store, _, url = object_store
    client, proxy = proxied(6)
    storage = ObjectStorage(url, client)
    export = make_export(storage, big=300 * KiB, huge=_huge(store.scheme))
    expected = local_files(export)
    if store.scheme == "s3":  # three files answered an error, one reset mid-body
        shards = [f"variables/variables\\.data-0000{i}" for i in range(3)]
        for shard, status in zip(shards, (500, 503, 429), strict=True):
            proxy.fail("PUT", rf"/1/{shard}", status=status, times=1)
        proxy.reset("PUT", r"/1/assets/big", times=1, after_bytes=64 * KiB)
    else:  # the first three single-request uploads (lease, claim, files), a chunk
        for status in (500, 503, 429):
            proxy.fail("POST", r"uploadType=multipart", status=status, times=1)
        proxy.reset("PUT", r"upload_id=", times=1, after_bytes=64 * KiB)

    assert publish(storage, export) == 1
    assert proxy.injected == 4
    _verified(store, url, "1", expected)
    kept = storage.local_copy("1")
    assert kept is not None
    for rel in expected:
        store.verify(url.key(f"1/{rel}"), kept / rel)  # size and checksum, by the store


def test_too_many_faults_fail_the_publish_and_the_next_one_cleans_up(
    object_store: Case, proxied: Any
) -> None:
    store, _, url = object_store
    client, proxy = proxied(2)
    storage = ObjectStorage(url, client)
    export = make_export(storage, big=300 * KiB, huge=_huge(store.scheme))
    expected = local_files(export)
    proxy.fail(*_upload_rule(store.scheme, "variables/variables\\.data-00001"), times=1000)
    proxy.fail("DELETE", r"/1/|%2F1%2F", times=1000)  # the clean-up fails too: a partial stays

    with lease_of(storage), pytest.raises(ObjectStoreError) as info:
        storage.publish(export, next_version, {})
    assert info.value.kind == "transient"
    assert store.head(url.key(f"1/{SAVED_MODEL_PB}")) is None  # never loadable
    assert store.head(url.key(f"1/{COMMIT}")) is None
    assert storage.read_version_metadata("1") is None
    left = remote_files(store, url, "1")
    assert left and SAVED_MODEL_PB not in left  # partial: some variables, no graph
    assert {k: v for k, v in local_files(export).items() if k != COMMIT} == expected

    proxy.clear()
    assert publish(storage, export) == 2
    assert remote_files(store, url, "1") == {}
    _verified(store, url, "2", expected)
    assert versions(storage) == ["2"]


def test_a_lease_whose_renewals_fail_stops_counting_as_held(
    object_store: Case, proxied: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed renewals must not move the expiry: the store's copy expires all the same."""
    store, _, url = object_store
    monkeypatch.setattr(lease_module, "LEASE_SECONDS", 1.5)
    client, proxy = proxied(2)
    lock = ObjectStorage(url, client).publish_lock()
    assert isinstance(lock, LeaseLock) and lock.try_acquire()
    try:
        # Every write of the lease fails from now on (on GCS: every small upload).
        rule = ("PUT", r"\.ckpt-exporter/lock") if store.scheme == "s3" else ("POST", "upload")
        proxy.fail(*rule, status=503, times=1000)
        wait_until(lambda: not lock.held(), 5, "the lease to expire")
        written = json.loads(store.get(lease_key(url)))["expires_at"]
        assert written < time.time()  # what another process reads: expired too
        time.sleep(1.2)
        assert not lock.held()
        proxy.clear()  # nobody took it over: the next renewal holds it again
        wait_until(lock.held, 5, "a renewal once the store answers again")
    finally:
        lock.release()


def test_a_lease_that_cannot_be_read_is_not_taken_over(
    object_store: Case, proxied: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, url = object_store
    monkeypatch.setattr(lease_module, "TAKEOVER_GRACE_SECONDS", 0.0)
    holder = ObjectStorage(url, store).publish_lock()
    assert isinstance(holder, LeaseLock) and holder.try_acquire()
    try:
        client, proxy = proxied(2)
        rule = ("GET", r"\.ckpt-exporter/lock") if store.scheme == "s3" else ("GET", "alt=media")
        proxy.fail(*rule, status=503, times=1000)
        taker = ObjectStorage(url, client).publish_lock()
        with pytest.raises(ObjectStoreError) as info:
            taker.try_acquire()
        assert info.value.kind == "transient"
        assert holder.held()
        assert json.loads(store.get(lease_key(url)))["owner"] == holder.owner
    finally:
        holder.release()
