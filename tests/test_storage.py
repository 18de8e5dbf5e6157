"""The contract of :class:`daemon.basepath.storage.BasePathStorage`, on real folders.

Every contract test takes the ``backend`` fixture, which is parametrised over
the storage backends: POSIX, and the object store (:class:`ObjectBackend`) on
S3 (moto) and GCS (fake-gcs-server) servers on 127.0.0.1, those marked
``objectstore``. A backend is a class with the same few helpers as
:class:`PosixBackend` (write or read a file as another tool would, list a
folder, publish as the daemon does, run a child process that opens the same
base path) and a parameter of the fixture; the tests go through the storage
interface and those helpers only. Folders handed out by ``new_export_dir``,
``staging_dir`` and ``keep_failed`` are local on every backend, so tests use
them with plain file I/O (the helpers take an absolute path for a local one).

Where the contract allows what a filesystem and an object store do
differently (an empty folder, a lock freed by the kernel, a trash folder,
a number never reused), the test says so and checks each its own way.

No mocks: real folders and servers, a real second process for the lock and
for the crash clean-up, a real reader thread racing the record writer. The
last section covers the base-path functions the supervisor calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import OBJECT_STORE_BUCKET, child_env

from daemon.basepath import lease as lease_module
from daemon.basepath import operations, publish
from daemon.basepath.layout import (
    METADATA_RELPATH,
    PINS_NAME,
    ROLLED_BACK_NAME,
    STATE_DIRNAME,
    TEMP_PREFIX,
    TRASH_DIRNAME,
)
from daemon.basepath.storage import (
    BasePathStorage,
    PosixStorage,
    PublishLock,
    storage_for,
)
from daemon.objectstore.url import Location, ObjectURL
from daemon.rules.planner import History
from daemon.rules.versions import VersionError, list_versions, next_version, parse_version

# Python run by a child process before its body: binds ``storage`` to the base
# path named by sys.argv[1], as a second daemon or `ckpt-exporter` would.
_CHILD_PRELUDE = """\
import sys, time
from pathlib import Path
from daemon.basepath.storage import storage_for
storage = storage_for(Path(sys.argv[1]))
"""


class PosixBackend:
    """A :class:`PosixStorage` on a fresh folder, and what the tests need besides it."""

    name = "posix"

    def __init__(self, root: Path) -> None:
        self.base = root / "serving" / "m"
        self.base.mkdir(parents=True)
        self.storage: BasePathStorage = PosixStorage(self.base)
        self._missing = root / "not-yet" / "m"

    def other(self) -> BasePathStorage:
        """A second handle on the same base path (what another process would get)."""
        return storage_for(self.base)

    def missing(self) -> BasePathStorage:
        """A storage whose base path does not exist (yet)."""
        return storage_for(self._missing)

    def put(self, rel: str, data: bytes = b"x") -> None:
        """Write a file under the base path as another tool (or a crashed process) would."""
        path = self.base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def read(self, rel: str) -> bytes:
        return (self.base / rel).read_bytes()

    def listdir(self, rel: str) -> list[str]:
        """The names directly under ``rel`` (sorted; [] when there is no such folder)."""
        try:
            return sorted(p.name for p in (self.base / rel).iterdir())
        except FileNotFoundError:
            return []

    def relative(self, location: Location) -> str:
        """A location the storage returned, as a path relative to the base path."""
        assert isinstance(location, Path)
        return location.relative_to(self.base).as_posix()

    def publish(
        self,
        storage: BasePathStorage,
        export: Path,
        choose: Callable[[list[int]], int],
        metadata: Mapping[str, Any],
    ) -> tuple[int, Location]:
        """``storage.publish`` as the tests always called it here (without the lock)."""
        return storage.publish(export, choose, metadata)

    def spawn(self, body: str) -> subprocess.Popen[str]:
        """A real child process with ``storage`` open on this base path."""
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD_PRELUDE + body, str(self.base)],
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )


# A child process of the object backend: sys.argv[1] is the URL, the endpoint
# comes in the environment (sys.argv must stay as long as the POSIX child's).
_OBJECT_CHILD_PRELUDE = """\
import os, sys, time
from daemon.basepath.storage import storage_for
from daemon.objectstore.url import parse_url
storage = storage_for(parse_url(sys.argv[1], os.environ["CKPT_TEST_ENDPOINT"]))
"""


class ObjectBackend:
    """An :class:`~daemon.basepath.objects.ObjectStorage` on a fresh prefix of a real server.

    Local folders (exports, staging, failed exports) live under the scratch
    directory the fixture points ``CKPT_EXPORTER_SCRATCH_DIR`` at; the helpers
    take an absolute path for those.
    """

    def __init__(self, scheme: str, endpoint: str) -> None:
        from daemon.objectstore.clients import client_for

        self.name = scheme
        self.endpoint = endpoint
        self.base = ObjectURL(scheme, OBJECT_STORE_BUCKET, f"t-{uuid.uuid4().hex[:12]}", endpoint)
        self.store = client_for(self.base, endpoint)
        self.storage: BasePathStorage = storage_for(self.base)
        self._missing = ObjectURL(
            scheme, OBJECT_STORE_BUCKET, f"t-{uuid.uuid4().hex[:12]}/not-yet", endpoint
        )

    def other(self) -> BasePathStorage:
        return storage_for(self.base)

    def missing(self) -> BasePathStorage:
        return storage_for(self._missing)

    def put(self, rel: str, data: bytes = b"x") -> None:
        self.store.put(self.base.key(rel), data)

    def read(self, rel: str) -> bytes:
        if rel.startswith("/"):
            return Path(rel).read_bytes()
        return self.store.get(self.base.key(rel))

    def listdir(self, rel: str) -> list[str]:
        if rel.startswith("/"):
            try:
                return sorted(p.name for p in Path(rel).iterdir())
            except FileNotFoundError:
                return []
        folder = self.base.key(rel) + "/"
        listing = self.store.list(folder)
        names = [o.key[len(folder) :] for o in listing.objects]
        return sorted(names + [f[len(folder) :].rstrip("/") for f in listing.folders])

    def relative(self, location: Location) -> str:
        if isinstance(location, Path):
            return str(location)  # a local folder: absolute
        return self.base.name_of(location.prefix)

    def publish(
        self,
        storage: BasePathStorage,
        export: Path,
        choose: Callable[[list[int]], int],
        metadata: Mapping[str, Any],
    ) -> tuple[int, Location]:
        """``storage.publish`` under the lease, as the daemon calls it (it commits only then)."""
        lock = storage.publish_lock()
        assert lock.try_acquire()
        try:
            return storage.publish(export, choose, metadata)
        finally:
            lock.release()

    def spawn(self, body: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", _OBJECT_CHILD_PRELUDE + body, str(self.base)],
            env=dict(child_env(), CKPT_TEST_ENDPOINT=self.endpoint),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )


Backend = PosixBackend | ObjectBackend


@pytest.fixture(
    params=[
        "posix",
        pytest.param("s3", marks=pytest.mark.objectstore),
        pytest.param("gs", marks=pytest.mark.objectstore),
    ]
)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    if request.param == "posix":
        yield PosixBackend(tmp_path)
        return
    from objectstores import DUMMY_AWS_ENV

    from daemon.objectstore.clients import reset_clients

    monkeypatch.setenv("CKPT_EXPORTER_SCRATCH_DIR", str(tmp_path / "scratch"))
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        for name, value in DUMMY_AWS_ENV.items():
            monkeypatch.setenv(name, value)
    else:
        server = request.getfixturevalue("gcs_server")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    reset_clients()
    try:
        yield ObjectBackend(str(request.param), server.url)
    finally:
        reset_clients()


def _is_posix(backend: Backend) -> bool:
    return isinstance(backend, PosixBackend)


def _export(storage: BasePathStorage, payload: bytes = b"model") -> Path:
    """A complete-looking export in a fresh export folder."""
    export = storage.new_export_dir()
    (export / "variables").mkdir()
    (export / "saved_model.pb").write_bytes(payload)
    (export / "variables" / "variables.index").write_bytes(payload * 3)
    return export


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _versions(storage: BasePathStorage) -> list[str]:
    """The children TF Serving takes for versions, by version."""
    return [e.name for e in list_versions(storage.list_children())]


def _children(storage: BasePathStorage) -> set[str]:
    return {name for name, _is_folder in storage.list_children()}


# --- the backend selection ------------------------------------------------------


def test_storage_for_a_path_is_posix_and_implements_the_interface(tmp_path: Path) -> None:
    storage = storage_for(tmp_path)
    assert isinstance(storage, PosixStorage) and isinstance(storage, BasePathStorage)
    assert storage.base_path == tmp_path
    assert isinstance(storage.publish_lock(), PublishLock)


# --- reading ----------------------------------------------------------------------


def test_a_missing_base_path_has_no_children_until_prepared(backend: Backend) -> None:
    storage = backend.missing()
    assert storage.exists() is False
    assert storage.list_children() == []
    assert storage.read_version_metadata("1") is None
    assert storage.version_bytes("1") == 0
    assert storage.prepare() == []
    # A filesystem has empty folders; a prefix of an object store exists
    # only once an object lies under it, and preparing writes none for good.
    assert storage.exists() is _is_posix(backend)
    assert _versions(storage) == []


def test_children_are_listed_with_whether_they_are_folders(backend: Backend) -> None:
    backend.put("7/saved_model.pb")
    backend.put("0008/variables/variables.index")
    backend.put("notes.txt")
    children = set(backend.storage.list_children())
    assert {("7", True), ("0008", True), ("notes.txt", False)} <= children
    assert _versions(backend.storage) == ["7", "0008"]


def test_version_metadata_is_read_back_and_anything_else_is_none(backend: Backend) -> None:
    storage = backend.storage
    version, _ = backend.publish(
        storage, _export(storage), next_version, {"tool": "t", "model": "m"}
    )
    meta = storage.read_version_metadata(str(version))
    assert meta is not None
    assert (meta["tool"], meta["model"], meta["version"]) == ("t", "m", version)
    assert time.time() - 60 < meta["published_at"] <= time.time()

    metadata = METADATA_RELPATH.as_posix()
    backend.put(f"5/{metadata}", b"{not json")
    backend.put(f"6/{metadata}", b'["a", "list"]')
    backend.put("7/saved_model.pb")  # made by hand: no metadata
    for name in ("5", "6", "7", "99"):
        assert storage.read_version_metadata(name) is None


def test_version_bytes_counts_the_files_of_a_version(backend: Backend) -> None:
    storage = backend.storage
    version, _ = backend.publish(storage, _export(storage, b"12345"), next_version, {})
    name = str(version)
    expected = 5 + 15 + len(backend.read(f"{name}/{METADATA_RELPATH.as_posix()}"))
    assert storage.version_bytes(name) == expected
    assert storage.version_bytes("404") == 0


# --- records ------------------------------------------------------------------------


def test_records_round_trip_and_replace_whole(backend: Backend) -> None:
    storage = backend.storage
    with pytest.raises(FileNotFoundError):
        storage.read_record(PINS_NAME)
    storage.write_record(PINS_NAME, [3, 1])
    assert storage.read_record(PINS_NAME) == [3, 1]
    storage.write_record(ROLLED_BACK_NAME, {"fingerprints": {"a": {"version": 2}}, "floor_ns": 5})
    storage.write_record(ROLLED_BACK_NAME, {"floor_ns": 7})
    assert storage.read_record(ROLLED_BACK_NAME) == {"floor_ns": 7}
    assert storage.read_record(PINS_NAME) == [3, 1]
    # A second handle (another process) reads what the first wrote.
    assert backend.other().read_record(ROLLED_BACK_NAME) == {"floor_ns": 7}
    # Records live in the state folder, never where TF Serving looks.
    assert _versions(storage) == []
    assert backend.listdir(STATE_DIRNAME) == sorted([PINS_NAME, ROLLED_BACK_NAME])


def test_a_corrupt_record_raises_value_error(backend: Backend) -> None:
    backend.put(f"{STATE_DIRNAME}/{PINS_NAME}", b"[1, 2")
    with pytest.raises(ValueError):
        backend.storage.read_record(PINS_NAME)
    backend.put(f"{STATE_DIRNAME}/{PINS_NAME}", b"\xff\xfe not utf-8")
    with pytest.raises(ValueError):
        backend.storage.read_record(PINS_NAME)


def test_deleting_a_record(backend: Backend) -> None:
    storage = backend.storage
    storage.delete_record(PINS_NAME)  # none yet: no error
    storage.write_record(PINS_NAME, [1])
    storage.delete_record(PINS_NAME)
    with pytest.raises(FileNotFoundError):
        storage.read_record(PINS_NAME)
    assert PINS_NAME not in backend.listdir(STATE_DIRNAME)


def test_a_reader_racing_the_writer_sees_whole_records_only(backend: Backend) -> None:
    storage, reader_storage = backend.storage, backend.other()
    # Large enough that a write in place would be seen half done.
    records = [{"n": i, "pad": str(i) * 200_000} for i in range(2)]
    storage.write_record(ROLLED_BACK_NAME, records[0])
    seen: list[Any] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_forever() -> None:
        while not stop.is_set():
            try:
                seen.append(reader_storage.read_record(ROLLED_BACK_NAME)["n"])
            except BaseException as e:  # a missing or torn record is the failure
                errors.append(e)
                return

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for i in range(40):
            storage.write_record(ROLLED_BACK_NAME, records[i % 2])
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert seen and set(seen) <= {0, 1}
    # No temporary file is left beside the record.
    assert backend.listdir(STATE_DIRNAME) == [ROLLED_BACK_NAME]


# --- the lock ---------------------------------------------------------------------------


def test_the_lock_is_exclusive_across_processes_and_freed_by_death(backend: Backend) -> None:
    if not _is_posix(backend):
        pytest.skip(
            "only the kernel frees a lock when its holder dies (flock); an object store's "
            "lease outlives it until expiry: test_a_dead_holders_lease_is_taken_over_after_expiry"
        )
    holder = backend.spawn(
        "lock = storage.publish_lock()\n"
        "assert lock.try_acquire()\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = backend.storage.publish_lock()
        assert lock.try_acquire() is False
        assert lock.holder() == str(holder.pid)
        holder.kill()  # no release: the holder dies
        holder.wait()
        assert lock.try_acquire() is True
        assert lock.holder() == str(os.getpid())
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def _holder_is(backend: Backend, lock: PublishLock, pid: int) -> bool:
    """Whether ``lock.holder()`` names process ``pid`` (a PID on POSIX, a sentence on a lease)."""
    if _is_posix(backend):
        return lock.holder() == str(pid)
    return lock.holder().startswith(f"pid {pid} on ")


def test_a_dead_holders_lease_is_taken_over_after_expiry(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object-store side of the test above: a killed holder's lease is free once it expired."""
    if _is_posix(backend):
        pytest.skip("flock is freed by the holder's death: the test above")
    holder = backend.spawn(
        "import daemon.basepath.lease as lease\n"
        "lease.LEASE_SECONDS = 1.5\n"
        "lock = storage.publish_lock()\n"
        "assert lock.try_acquire()\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(lease_module, "TAKEOVER_GRACE_SECONDS", 0.5)
        lock = backend.storage.publish_lock()
        assert lock.try_acquire() is False
        assert _holder_is(backend, lock, holder.pid)
        time.sleep(1.0)  # its renewer runs every half second: still not ours
        assert lock.try_acquire() is False
        holder.kill()  # no release: the holder dies
        holder.wait()
        deadline = time.monotonic() + 15
        while not lock.try_acquire():
            assert time.monotonic() < deadline, "the dead holder's lease was never taken over"
            time.sleep(0.2)
        assert _holder_is(backend, lock, os.getpid())
        lock.release()
        assert _children(backend.storage) == set()  # the lease is gone with the release
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_two_lock_handles_in_one_process_exclude_each_other(backend: Backend) -> None:
    first, second = backend.storage.publish_lock(), backend.other().publish_lock()
    assert first.holder() == "unknown"  # never taken yet
    assert first.try_acquire() is True
    assert second.try_acquire() is False
    assert _holder_is(backend, second, os.getpid())
    second.release()  # not held: a no-op that frees nothing
    assert second.try_acquire() is False
    first.release()
    first.release()  # twice is fine
    assert second.try_acquire() is True
    second.release()
    # The lock never shows up where TF Serving looks.
    assert _versions(backend.storage) == []


# --- exports and publication --------------------------------------------------------------


def test_export_folders_are_fresh_local_folders_never_taken_for_versions(
    backend: Backend,
) -> None:
    storage = backend.missing()  # created on demand
    a, b = storage.new_export_dir(), storage.new_export_dir()
    assert a != b
    for export in (a, b):
        assert export.is_dir() and list(export.iterdir()) == []
        assert parse_version(export.name) is None
        assert str(os.getpid()) in export.name
    assert _versions(storage) == []


def test_publish_takes_the_next_version_as_tf_serving_counts(backend: Backend) -> None:
    backend.put("0007/saved_model.pb", b"by hand")
    backend.put(" 12", b"a file TF Serving still parses as 12")
    backend.put("1e3/saved_model.pb", b"not a version")
    storage = backend.storage
    export = _export(storage)
    seen: list[list[int]] = []

    def choose(existing: list[int]) -> int:
        seen.append(sorted(existing))
        return next_version(existing)

    version, location = backend.publish(storage, export, choose, {"model": "m"})
    assert (version, backend.relative(location)) == (13, "13")
    assert seen == [[7, 12]]
    assert not export.exists()
    assert backend.read("13/saved_model.pb") == b"model"
    assert backend.read("13/variables/variables.index") == b"model" * 3
    assert _versions(storage) == ["0007", " 12", "13"]
    # Nothing foreign was touched.
    assert backend.read("0007/saved_model.pb") == b"by hand"
    assert backend.read("1e3/saved_model.pb") == b"not a version"


def test_publish_never_replaces_a_version_taken_meanwhile(backend: Backend) -> None:
    storage = backend.storage
    export = _export(storage)
    calls: list[list[int]] = []

    def choose(existing: list[int]) -> int:
        calls.append(sorted(existing))
        if len(calls) == 1:
            backend.put("1/saved_model.pb", b"theirs")  # between the choice and the write
            return 1
        return next_version(existing)

    version, _ = backend.publish(storage, export, choose, {})
    assert version == 2 and calls == [[], [1]]
    assert backend.listdir("1") == ["saved_model.pb"]
    assert backend.read("1/saved_model.pb") == b"theirs"
    assert backend.read("2/saved_model.pb") == b"model"


def test_publish_never_replaces_an_empty_folder(backend: Backend) -> None:
    if not isinstance(backend, PosixBackend):
        pytest.skip("an empty folder exists only on a filesystem")
    (backend.base / "1").mkdir()  # plain rename(2) would silently replace it
    calls: list[int] = []

    def choose(existing: list[int]) -> int:
        calls.append(1)
        return 1 if len(calls) == 1 else next_version(existing)

    version, _ = backend.storage.publish(_export(backend.storage), choose, {})
    assert version == 2 and backend.listdir("1") == []


def test_publish_gives_up_when_every_choice_is_taken(backend: Backend) -> None:
    backend.put("1/saved_model.pb", b"theirs")
    storage = backend.storage
    export = _export(storage)
    with pytest.raises(FileExistsError):
        backend.publish(storage, export, lambda _existing: 1, {})
    assert backend.read("1/saved_model.pb") == b"theirs" and backend.listdir("1") == [
        "saved_model.pb"
    ]
    assert _versions(storage) == ["1"]
    assert _files(export)["saved_model.pb"] == b"model"  # still there, to keep aside


def test_a_refused_version_publishes_nothing(backend: Backend) -> None:
    backend.put("50/saved_model.pb")
    storage = backend.storage
    export = _export(storage)
    before = _children(storage)

    def refuse(existing: list[int]) -> int:
        raise VersionError("refusing to go backwards")

    with pytest.raises(VersionError):
        backend.publish(storage, export, refuse, {})
    assert _children(storage) == before
    assert _files(export) == {"saved_model.pb": b"model", "variables/variables.index": b"model" * 3}


def test_a_publication_that_fails_midway_leaves_nothing_half_written(backend: Backend) -> None:
    storage = backend.storage
    export = _export(storage)
    # A file where the metadata's folder must go: writing the metadata fails.
    (export / METADATA_RELPATH.parent).write_bytes(b"in the way")
    before = _children(storage)
    with pytest.raises(OSError):
        backend.publish(storage, export, next_version, {})
    assert _children(storage) == before and _versions(storage) == []
    assert _files(export)["saved_model.pb"] == b"model"


def test_reset_and_discard_an_export_folder(backend: Backend) -> None:
    storage = backend.storage
    export = _export(storage)
    storage.reset_export_dir(export)
    assert export.is_dir() and list(export.iterdir()) == []
    (export / "half").write_bytes(b"x")
    storage.discard_export(export)
    assert not export.exists()
    storage.discard_export(export)  # gone already: no error
    assert _children(storage) <= {STATE_DIRNAME}


def test_failed_exports_are_kept_newest_first_up_to_keep(backend: Backend) -> None:
    storage = backend.storage
    kept: list[Path] = []
    for i in range(4):
        location = storage.keep_failed(_export(storage, f"try{i}".encode()), f"ckpt-{i}", 2)
        assert location is not None and f"ckpt-{i}" in location.name
        kept.append(location)
        time.sleep(0.05)  # distinct modification times, whatever the clock's grain
    rel = [backend.relative(p) for p in kept]
    folder = rel[0].rsplit("/", 1)[0]
    assert backend.listdir(folder) == sorted(r.rsplit("/", 1)[1] for r in rel[-2:])
    assert backend.read(f"{rel[-1]}/saved_model.pb") == b"try3"

    export = _export(storage)
    assert storage.keep_failed(export, "x", 0) is None
    assert not export.exists()
    assert _versions(storage) == []
    assert not any(n.startswith(TEMP_PREFIX) for n in _children(storage))


# --- versions leaving ------------------------------------------------------------------------


def test_remove_version_leaves_nothing_behind(backend: Backend) -> None:
    storage = backend.storage
    for _ in range(3):
        backend.publish(storage, _export(storage), next_version, {})
    storage.remove_version("2")
    assert _versions(storage) == ["1", "3"]
    assert backend.read("3/saved_model.pb") == b"model"
    assert backend.listdir(f"{STATE_DIRNAME}/{TRASH_DIRNAME}") == []
    with pytest.raises(FileNotFoundError):
        storage.remove_version("2")


def test_rolled_back_versions_are_moved_whole_and_never_over_each_other(backend: Backend) -> None:
    storage = backend.storage
    backend.publish(storage, _export(storage, b"first"), next_version, {})
    first = storage.move_to_rolled_back("1", "1-20240101T000000Z")
    assert _versions(storage) == []
    # On a filesystem the number is free again (1); an object store never
    # reuses a claimed number (2). Either way the label is the same.
    again, _ = backend.publish(storage, _export(storage, b"second"), next_version, {})
    assert again == (1 if _is_posix(backend) else 2)
    second = storage.move_to_rolled_back(str(again), "1-20240101T000000Z")  # same label
    assert first != second
    assert first.name == "1-20240101T000000Z" and second.name == "1-20240101T000000Z-1"
    assert backend.read(f"{backend.relative(first)}/saved_model.pb") == b"first"
    assert backend.read(f"{backend.relative(second)}/saved_model.pb") == b"second"
    assert _versions(storage) == []
    with pytest.raises(FileNotFoundError):
        storage.move_to_rolled_back(str(again), "again")


# --- staging and the clean-up after a crash ------------------------------------------------------


def test_staging_folders_are_named_not_created(backend: Backend) -> None:
    storage = backend.storage
    staging = storage.staging_dir("job1")
    assert not staging.exists()
    assert str(os.getpid()) in staging.name and staging != storage.staging_dir("job2")
    staging.mkdir(parents=True)
    (staging / "ckpt-5.index").write_bytes(b"x")
    storage.discard_staging(staging)
    assert not staging.exists()
    storage.discard_staging(staging)  # gone already: no error
    assert _versions(storage) == []


_WORKING_CHILD = """\
export = storage.new_export_dir()
(export / "saved_model.pb").write_bytes(b"half")
staging = storage.staging_dir("job")
staging.mkdir(parents=True)
print(export, staging, sep="\\n", flush=True)
if len(sys.argv) > 2:
    sys.stdin.read()
"""


def test_clean_up_removes_only_what_dead_processes_left(backend: Backend) -> None:
    storage = backend.storage
    backend.publish(storage, _export(storage), next_version, {})
    live = backend.spawn(_WORKING_CHILD + "sys.stdin.read()\n")
    dead = backend.spawn(_WORKING_CHILD)
    try:
        assert live.stdout is not None and dead.stdout is not None
        live_export, live_staging = (Path(live.stdout.readline().strip()) for _ in range(2))
        dead_export, dead_staging = (Path(dead.stdout.readline().strip()) for _ in range(2))
        dead.wait()
        # Export folders lie where new_export_dir makes them (in the base path
        # on POSIX, in the local scratch folder of an object store).
        ours = storage.new_export_dir()
        storage.discard_export(ours)
        garbage = ours.parent / f"{TEMP_PREFIX}garbage"  # no PID: nobody's
        garbage.mkdir()
        (garbage / "saved_model.pb").write_bytes(b"x")
        backend.put(".tmp-other-tool/saved_model.pb")  # not ours: never touched
        if _is_posix(backend):  # an object store deletes in place: it has no trash
            backend.put(f"{STATE_DIRNAME}/{TRASH_DIRNAME}/4-1a2b3c4d/saved_model.pb")

        removed = storage.prepare()

        assert sorted(p.name for p in removed) == sorted(
            [dead_export.name, f"{TEMP_PREFIX}garbage"]
        )
        assert not dead_export.exists() and not dead_staging.exists()
        assert (live_export / "saved_model.pb").read_bytes() == b"half"
        assert live_staging.is_dir()
        assert backend.read(".tmp-other-tool/saved_model.pb") == b"x"
        assert backend.read("1/saved_model.pb") == b"model"
        assert backend.listdir(f"{STATE_DIRNAME}/{TRASH_DIRNAME}") == []
        # The separate steps keep the live process's folders just the same.
        assert storage.remove_stale_exports() == []
        storage.remove_stale_staging()
        storage.empty_trash()
        assert live_export.is_dir() and live_staging.is_dir()
    finally:
        for proc in (live, dead):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# --- the base-path functions the supervisor calls -------------------------------------------------


def test_prepare_base_path_creates_and_cleans(tmp_path: Path) -> None:
    base = tmp_path / "serving" / "m"
    assert publish.prepare_base_path(base) == []
    assert base.is_dir()
    stale = base / f"{TEMP_PREFIX}999999999-abc"  # a PID no process has
    stale.mkdir()
    (base / STATE_DIRNAME / TRASH_DIRNAME / "3-x").mkdir(parents=True)
    assert publish.prepare_base_path(base) == [stale]
    assert not stale.exists() and not (base / STATE_DIRNAME / TRASH_DIRNAME / "3-x").exists()


def test_staging_and_export_helpers(tmp_path: Path) -> None:
    base = tmp_path / "base"
    staging = publish.staging_dir(base, "j1")
    assert staging == base / STATE_DIRNAME / "staging" / f"{os.getpid()}-j1"
    staging.mkdir(parents=True)
    publish.discard_staging(staging, base)
    assert not staging.exists()

    export = publish.new_temp_dir(base)
    (export / "saved_model.pb").write_bytes(b"x")
    publish.reset_export_dir(export, base)
    assert export.is_dir() and list(export.iterdir()) == []
    publish.discard_export(export, base)
    assert not export.exists()


def _history() -> History:
    return History(published_fingerprints=frozenset({"p"}), watermark_ns=10, rejected=frozenset())


def test_load_rolled_back_reads_everything_once(tmp_path: Path) -> None:
    base = tmp_path / "base"
    empty = operations.load_rolled_back(base)
    assert empty == operations.RolledBack()
    assert empty.apply(_history()) == _history()
    assert not empty.rules_out("a", 1)

    storage_for(base).write_record(
        ROLLED_BACK_NAME,
        {"fingerprints": {"a": {"version": 4}, "b": {}}, "floor_ns": 50, "highest_version": 4},
    )
    record = operations.load_rolled_back(base)
    assert record == operations.RolledBack(frozenset({"a", "b"}), 50, 4, None)
    assert record.rules_out("a", 999) and record.rules_out("zzz", 50)
    assert not record.rules_out("zzz", 51)
    assert record.apply(_history()) == dataclasses.replace(
        _history(), rejected=frozenset({"a", "b"}), watermark_ns=50
    )
    # The old functions say the same.
    assert operations.read_rolled_back(base) == (record.fingerprints, record.floor_ns)
    assert operations.highest_rolled_back_version(base) == 4
    assert operations.rolled_back_problem(base) is None
    assert operations.apply_rolled_back(_history(), base) == record.apply(_history())


@pytest.mark.parametrize(
    ("raw", "kind"), [(b"{broken", "corrupt"), (b"[1]", "corrupt"), (b"\xff", "corrupt")]
)
def test_load_rolled_back_reports_a_bad_record_and_rules_nothing_out(
    tmp_path: Path, raw: bytes, kind: str
) -> None:
    path = operations.rolled_back_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(raw)
    record = operations.load_rolled_back(tmp_path)
    assert record.problem is not None and record.problem.kind == kind
    assert str(path) in record.problem.message
    assert (record.fingerprints, record.floor_ns, record.highest_version) == (frozenset(), 0, 0)
    assert operations.rolled_back_problem(tmp_path) == record.problem


def test_load_rolled_back_reports_an_unreadable_record_as_io(tmp_path: Path) -> None:
    path = operations.rolled_back_path(tmp_path)
    path.mkdir(parents=True)  # a folder where the file should be: reading it fails
    record = operations.load_rolled_back(tmp_path)
    assert record.problem is not None and record.problem.kind == "io"
    assert json.dumps(dataclasses.asdict(record.problem))  # plain data, for logs
