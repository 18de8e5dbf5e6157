"""The S3 and GCS clients against real servers on 127.0.0.1 (moto, fake-gcs-server).

Every test runs once per backend (the ``object_store`` fixture); the fault
tests put :class:`faultproxy.FaultProxy` between the client and the server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from objectstores import S3Server

from daemon.objectstore.client import ObjectStore, ObjectStoreError
from daemon.objectstore.gcs import GCSStore
from daemon.objectstore.s3 import S3Store
from daemon.objectstore.traffic import TRAFFIC
from daemon.objectstore.url import ObjectURL

pytestmark = pytest.mark.objectstore

MiB = 1024 * 1024
Case = tuple[ObjectStore, str, ObjectURL]


def small_parts_store(
    scheme: str, bucket: str, endpoint_url: str | None = None, **kw: Any
) -> ObjectStore:
    """A client whose multipart (S3) or resumable (GCS) path starts at a few MiB."""
    if scheme == "s3":
        return S3Store(
            bucket, endpoint_url=endpoint_url, multipart_threshold=5 * MiB, part_size=5 * MiB, **kw
        )
    return GCSStore(
        bucket, endpoint_url=endpoint_url, resumable_threshold=1 * MiB, chunk_size=1 * MiB, **kw
    )


def fast_retry(scheme: str, attempts: int) -> dict[str, Any]:
    """Client arguments for ``attempts`` HTTP attempts in all, with short waits."""
    if scheme == "s3":
        return {"max_attempts": attempts}
    return {"max_retries": attempts - 1, "initial_delay": 0.05, "max_delay": 0.2}


@pytest.fixture
def proxied(
    object_store: Case, request: pytest.FixtureRequest
) -> Iterator[Callable[..., tuple[ObjectStore, FaultProxy]]]:
    """``make(attempts=4, **kw)``: a client of the test's backend behind a fault proxy."""
    store, bucket, _ = object_store
    server = request.getfixturevalue("s3_server" if store.scheme == "s3" else "gcs_server")
    proxies: list[FaultProxy] = []

    def make(attempts: int = 4, **kw: Any) -> tuple[ObjectStore, FaultProxy]:
        proxy = FaultProxy(server.url, flavor="s3" if store.scheme == "s3" else "gcs").start()
        proxies.append(proxy)
        client = small_parts_store(
            store.scheme, bucket, proxy.url, **fast_retry(store.scheme, attempts), **kw
        )
        return client, proxy

    yield make
    for p in proxies:
        p.stop()


def write_file(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(os.urandom(size) if seed == 0 else bytes([seed % 256]) * size)
    return path


def kind_of(fn: Callable[[], object]) -> ObjectStoreError:
    with pytest.raises(ObjectStoreError) as info:
        fn()
    return info.value


# -- listing -----------------------------------------------------------------


def test_list_folders_objects_pages_and_start_after(object_store: Case) -> None:
    store, _, url = object_store
    many = url.child("many")
    names = [f"{i:05d}" for i in range(1100)]  # more than one page on both stores (1,000)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: store.put(many.key(n), b"x"), names))
    store.put(url.key("a/x"), b"1")
    store.put(url.key("b/deeper/y"), b"2")
    store.put(url.key("top.txt"), b"3")

    top = store.list(url.folder_key())
    assert [o.key for o in top.objects] == [url.key("top.txt")]
    assert top.folders == [url.key("a") + "/", url.key("b") + "/", many.key() + "/"]
    assert top.objects[0].size == 1 and top.objects[0].token and top.objects[0].updated_ns > 0

    every = store.list(many.folder_key(), delimiter=False)
    assert [many.name_of(o.key) for o in every.objects] == names
    assert every.folders == []

    rest = store.list(many.folder_key(), delimiter=False, start_after=many.key("01049"))
    assert [many.name_of(o.key) for o in rest.objects] == names[1050:]

    deep = store.list(url.folder_key(), delimiter=False, start_after=url.key("b"))
    assert url.key("a/x") not in [o.key for o in deep.objects]
    assert url.key("b/deeper/y") in [o.key for o in deep.objects]

    assert store.list(url.key("nothing") + "/").objects == []


# -- reads ---------------------------------------------------------------------


def test_head_get_range_and_download(object_store: Case, tmp_path: Path) -> None:
    store, _, url = object_store
    data = os.urandom(300_000)
    written = store.put(url.key("blob"), data)
    head = store.head(url.key("blob"))
    assert head is not None
    assert head.size == len(data) and head.token == written.token and head.key == url.key("blob")
    assert store.head(url.key("missing")) is None
    assert store.get(url.key("blob")) == data
    assert store.get_range(url.key("blob"), 1000, 5000) == data[1000:6000]
    assert store.get_range(url.key("blob"), 0, 0) == b""
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old content to be replaced")
    assert store.download(url.key("blob"), dest) == len(data)
    assert dest.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temp file left
    err = kind_of(lambda: store.get(url.key("missing")))
    assert err.kind == "not_found" and url.key("missing") in str(err)
    assert kind_of(lambda: store.download(url.key("missing"), tmp_path / "x")).kind == "not_found"
    assert not (tmp_path / "x").exists()


# -- conditional writes --------------------------------------------------------


def test_put_if_absent_creates_once(object_store: Case) -> None:
    store, _, url = object_store
    first = store.put(url.key("lock"), b"mine", if_absent=True)
    err = kind_of(lambda: store.put(url.key("lock"), b"theirs", if_absent=True))
    assert err.kind == "precondition" and err.operation == "put"
    assert store.get(url.key("lock")) == b"mine"
    head = store.head(url.key("lock"))
    assert head is not None and head.token == first.token


def test_put_if_token_replaces_only_what_was_read(object_store: Case) -> None:
    store, _, url = object_store
    v1 = store.put(url.key("state.json"), b'{"v": 1}')
    v2 = store.put(url.key("state.json"), b'{"v": 2}', if_token=v1.token)
    assert v2.token != v1.token
    err = kind_of(lambda: store.put(url.key("state.json"), b'{"v": 3}', if_token=v1.token))
    assert err.kind == "precondition"
    assert store.get(url.key("state.json")) == b'{"v": 2}'
    assert (
        kind_of(lambda: store.put(url.key("state.json"), b"x", if_token="not-a-token")).kind
        == "precondition"
    )


# -- uploads, verify -------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 11 * MiB + 123], ids=["small", "large"])
def test_upload_verify_and_create_only(
    object_store: Case, proxied: Any, tmp_path: Path, size: int
) -> None:
    store, _, url = object_store
    client, proxy = proxied()  # an empty proxy: it counts the requests of each path
    src = write_file(tmp_path / "variables.data", size)
    info = client.upload(url.key("v/variables.data"), src, if_absent=True)
    assert info.size == size
    if size > 5 * MiB:
        assert proxy.forwarded >= 3, "the multipart / resumable path sends the file in pieces"
        if store.scheme == "s3":
            assert info.token.endswith('-3"'), info.token  # a three-part object's ETag
    client.verify(url.key("v/variables.data"), src)
    store.verify(url.key("v/variables.data"), src)
    assert store.get(url.key("v/variables.data")) == src.read_bytes()

    other = write_file(tmp_path / "other", size, seed=7)
    err = kind_of(lambda: client.upload(url.key("v/variables.data"), other, if_absent=True))
    assert err.kind == "precondition"
    store.verify(url.key("v/variables.data"), src)  # unchanged
    assert store.list(url.folder_key(), delimiter=False).objects[0].size == size


def test_verify_fails_when_the_file_differs(object_store: Case, tmp_path: Path) -> None:
    store, _, url = object_store
    src = write_file(tmp_path / "a", 4096)
    store.upload(url.key("a"), src)
    same_size = tmp_path / "b"
    same_size.write_bytes(bytes(b ^ 1 for b in src.read_bytes()))
    err = kind_of(lambda: store.verify(url.key("a"), same_size))
    assert err.kind == "corrupt" and ("CRC32" in err.detail)
    longer = write_file(tmp_path / "c", 4097)
    assert kind_of(lambda: store.verify(url.key("a"), longer)).kind == "corrupt"
    assert kind_of(lambda: store.verify(url.key("gone"), src)).kind == "not_found"


def test_delete_and_copy(object_store: Case) -> None:
    store, _, url = object_store
    store.delete(url.key("never-existed"))
    store.put(url.key("src"), b"payload")
    store.copy(url.key("src"), url.key("dst"))
    assert store.get(url.key("dst")) == b"payload"
    store.delete(url.key("src"))
    assert store.head(url.key("src")) is None
    assert store.get(url.key("dst")) == b"payload"


# -- configuration errors --------------------------------------------------------


def test_missing_bucket_is_no_bucket(object_store: Case) -> None:
    store, _, _ = object_store
    missing = "ckpt-no-such-bucket"
    other = S3Store(missing) if store.scheme == "s3" else GCSStore(missing)
    for call in (
        lambda: other.list("x/"),
        lambda: other.head("x"),
        lambda: other.get("x"),
        lambda: other.put("x", b"1", if_absent=True),
        lambda: other.delete("x"),
    ):
        err = kind_of(call)
        assert err.kind == "no_bucket", err
        assert missing in str(err)


def test_s3_unknown_access_key_is_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto checks keys only with INITIAL_NO_AUTH_ACTION_COUNT set, so this server runs apart."""
    server = S3Server(tmp_path, auth=True).start()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7NOTREAL")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-do-not-print")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        store = S3Store("ckpt-test", endpoint_url=server.url, max_attempts=1)
        for call in (lambda: store.list("x/"), lambda: store.put("x", b"1")):
            err = kind_of(call)
            assert err.kind == "denied", err
            assert "wrong-secret-do-not-print" not in str(err)
    finally:
        server.stop()


# -- faults: retries -----------------------------------------------------------


def _put_path(scheme: str) -> tuple[str, str]:
    return ("PUT", r"/ckpt-test/t-") if scheme == "s3" else ("POST", r"uploadType=multipart")


@pytest.mark.parametrize("status", [500, 503, 429])
def test_error_answers_are_retried(object_store: Case, proxied: Any, status: int) -> None:
    store, _, url = object_store
    client, proxy = proxied(attempts=4)
    method, path = _put_path(store.scheme)
    proxy.fail(method, path, status=status, times=2)
    # The object's GET only (google-cloud-storage also reads bucket metadata in the background).
    get_path = r"/ckpt-test/t-" if store.scheme == "s3" else r"/o/t-[^?]*\?alt=media"
    proxy.fail("GET", get_path, status=status, times=2)
    before = TRAFFIC.snapshot().retries.get(store.scheme, 0)
    client.put(url.key("retried"), b"data", if_absent=True)
    assert client.get(url.key("retried")) == b"data"
    assert proxy.injected == 4
    assert TRAFFIC.snapshot().retries.get(store.scheme, 0) - before >= 4


def test_connection_reset_mid_upload_is_retried(
    object_store: Case, proxied: Any, tmp_path: Path
) -> None:
    store, _, url = object_store
    client, proxy = proxied(attempts=4)
    src = write_file(tmp_path / "big", 11 * MiB)
    # The second part (S3) or a chunk of the resumable session (GCS), cut after 64 KiB.
    path = r"partNumber=2" if store.scheme == "s3" else r"upload_id="
    proxy.reset("PUT", path, times=2, after_bytes=64 * 1024)
    before = TRAFFIC.snapshot().retries.get(store.scheme, 0)
    client.upload(url.key("big"), src, if_absent=True)
    assert proxy.injected == 2
    assert TRAFFIC.snapshot().retries.get(store.scheme, 0) - before >= 2
    store.verify(url.key("big"), src)
    assert store.get(url.key("big")) == src.read_bytes()


def test_too_many_faults_is_transient(object_store: Case, proxied: Any) -> None:
    store, _, url = object_store
    client, proxy = proxied(attempts=3)
    method, path = _put_path(store.scheme)
    proxy.fail(method, path, status=503, times=100)
    before = TRAFFIC.snapshot()
    err = kind_of(lambda: client.put(url.key("never"), b"data"))
    assert err.kind == "transient", err
    assert proxy.injected == 3
    after = TRAFFIC.snapshot()
    failed = after.requests_total(store.scheme, "put", "transient")
    assert failed - before.requests_total(store.scheme, "put", "transient") == 1
    proxy.clear()
    assert store.head(url.key("never")) is None


def test_lost_response_of_a_create_only_write_is_recognised(
    object_store: Case, proxied: Any
) -> None:
    """The write happened, its answer was lost, the retry got 412: the object is ours: done."""
    store, _, url = object_store
    client, proxy = proxied(attempts=4)
    method, path = _put_path(store.scheme)
    proxy.lose_response(method, path, times=1)
    client.put(url.key("once"), b"exactly this", if_absent=True)
    assert proxy.injected == 1
    assert store.get(url.key("once")) == b"exactly this"
    # Someone else's object under that key still fails the condition.
    proxy.lose_response(method, path, times=1)
    store.put(url.key("theirs"), b"their bytes")
    err = kind_of(lambda: client.put(url.key("theirs"), b"my bytes", if_absent=True))
    assert err.kind == "precondition"
