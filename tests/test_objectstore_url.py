"""daemon/objectstore/url.py (parsing, joining) and clients.ClientMissing (fast, no servers)."""

from __future__ import annotations

import sys

import pytest

from daemon.objectstore import clients
from daemon.objectstore.url import ObjectURL, parse_url, url_scheme


@pytest.mark.parametrize(
    ("text", "scheme", "bucket", "prefix"),
    [
        ("s3://bucket", "s3", "bucket", ""),
        ("s3://bucket/", "s3", "bucket", ""),
        ("gs://my-bucket/models/resnet", "gs", "my-bucket", "models/resnet"),
        ("gs://my_bucket.example/a/b/", "gs", "my_bucket.example", "a/b"),
        ("S3://bucket/x", "s3", "bucket", "x"),
    ],
)
def test_parse_valid(text: str, scheme: str, bucket: str, prefix: str) -> None:
    url = parse_url(text)
    assert (url.scheme, url.bucket, url.prefix) == (scheme, bucket, prefix)
    assert str(url) == f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
    assert parse_url(str(url)) == url


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("/local/path", "not a URL"),
        ("bucket/prefix", "not a URL"),
        ("hdfs://bucket/x", "unsupported URL scheme"),
        ("s3://", "not a valid bucket"),
        ("s3://Bucket/x", "not a valid bucket"),
        ("s3://ab/x", "not a valid bucket"),
        ("gs://a..b/x", "not a valid bucket"),
        ("s3://bucket//x", "empty, '.' or '..'"),
        ("s3://bucket/a/./b", "empty, '.' or '..'"),
        ("s3://bucket/a/../b", "empty, '.' or '..'"),
    ],
)
def test_parse_invalid(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace(".", r"\.").replace("'", "'")):
        parse_url(text)


def test_url_scheme() -> None:
    assert url_scheme("gs://b/x") == "gs"
    assert url_scheme("/tmp/x") is None


def test_key_name_of_child_name_parent() -> None:
    url = parse_url("s3://bucket/models/resnet")
    assert url.key("7/saved_model.pb") == "models/resnet/7/saved_model.pb"
    assert url.key("/7/") == "models/resnet/7"
    assert url.key() == "models/resnet"
    assert url.folder_key() == "models/resnet/"
    assert url.name_of("models/resnet/7/saved_model.pb") == "7/saved_model.pb"
    with pytest.raises(ValueError, match="not below"):
        url.name_of("models/resnet2/x")
    child = url.child("7")
    assert str(child) == "s3://bucket/models/resnet/7" and child.name == "7"
    assert child.parent == url and url.parent.prefix == "models"
    root = parse_url("gs://bucket")
    assert root.key("a") == "a" and root.folder_key() == "" and root.name == ""
    assert root.parent == root and root.name_of("a/b") == "a/b"
    assert root.extra == "gcs" and url.extra == "s3"


@pytest.mark.parametrize(
    ("text", "module", "message"),
    [
        ("s3://bucket/x", "boto3", "s3:// needs boto3: pip install 'ckpt-exporter[s3]'"),
        (
            "gs://bucket/x",
            "google.cloud.storage",
            "gs:// needs google-cloud-storage: pip install 'ckpt-exporter[gcs]'",
        ),
    ],
)
def test_client_missing_names_the_extra(
    text: str, module: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A None in sys.modules makes ``import`` of that module fail as if it were not installed."""
    monkeypatch.setitem(sys.modules, module, None)
    for backend in ("daemon.objectstore.s3", "daemon.objectstore.gcs"):
        monkeypatch.delitem(sys.modules, backend, raising=False)
    clients.reset_clients()
    try:
        with pytest.raises(clients.ClientMissing) as info:
            clients.client_for(parse_url(text))
        assert str(info.value) == message
    finally:
        clients.reset_clients()


def test_client_for_caches_per_bucket_and_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    clients.reset_clients()
    try:
        a = clients.client_for(ObjectURL("s3", "bucket", "x"))
        assert clients.client_for(ObjectURL("s3", "bucket", "y")) is a
        assert clients.client_for(ObjectURL("s3", "other", "y")) is not a
        assert clients.client_for(ObjectURL("s3", "bucket"), "http://127.0.0.1:1") is not a
    finally:
        clients.reset_clients()
