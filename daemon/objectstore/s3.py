"""The S3 backend of :class:`~daemon.objectstore.client.ObjectStore`, with boto3.

Endpoint: boto3's own configuration (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, profiles, credentials chain) unless ``endpoint_url``
is given (an S3-compatible store named in the daemon's config).

Conditional writes: create-only is ``PutObject`` (or
``CompleteMultipartUpload``) with ``If-None-Match: *``; replace-if-unchanged
is ``PutObject`` with ``If-Match: <ETag>``. Both answer 412
``PreconditionFailed`` (or 409 ``ConditionalRequestConflict`` when two
conditional writes race) and change nothing: kind ``precondition``. moto 5
honours all three (PutObject If-None-Match, PutObject If-Match and
CompleteMultipartUpload If-None-Match), measured by the tests.

Checksums: CRC32 (``zlib``; CRC32C would need botocore's optional CRT
extension). A single ``PutObject`` sends the CRC32 botocore computes and S3
rejects a body that does not match it; a multipart upload is created with a
*full-object* CRC32 (``ChecksumType=FULL_OBJECT``), each part carries its
own CRC32 and ``CompleteMultipartUpload`` names the whole file's CRC32, so
the stored checksum is comparable with a local file however it was split.
:meth:`S3Store.verify` compares size and that CRC32 (or the MD5 ETag of a
single-part object uploaded without a checksum). moto stores the checksum a
PutObject sends without checking it against the body, and computes a
multipart object's full-object CRC32 itself from the parts; so after every
upload this client also compares the checksum the store reports with its own
and raises kind ``corrupt`` (deleting what it created) on a mismatch.

Retries: botocore's ``standard`` mode (bounded attempts, exponential backoff
with jitter) retries 5xx, 429/SlowDown and connection errors, including a
connection reset while a request body is being sent (bodies are bytes or
seekable files, so they are sent again whole). Reads of a response body
that break midway are retried here (botocore retries the request only).
Every repeated attempt is counted in :data:`~daemon.objectstore.traffic.TRAFFIC`.

A lost response: a create-only write whose first attempt succeeded but whose
response was lost is retried by botocore and answered 412. When a
conditional write fails with ``precondition`` after a retry of this very
call, the object is read back (HEAD with its checksum): if it holds exactly
what this call wrote (same size and CRC32), the write is treated as done.
(A create-only write used as a lock should therefore carry content unique to
the writer, so that another writer's identical bytes are not taken for its own.)

Error messages carry the operation, bucket, key and the store's error code
and message, never credentials.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bx
from botocore.config import Config

from daemon.objectstore.client import ErrorKind, Listing, ObjectInfo, ObjectStoreError, counted
from daemon.objectstore.traffic import TRAFFIC

MiB = 1024 * 1024
#: S3 refuses CopyObject above 5 GiB; larger objects are copied in parts.
_COPY_LIMIT = 5 * 1024 * MiB
#: S3 allows at most 10,000 parts; the part size grows for files that need more.
_MAX_PARTS = 10_000
_MIN_PART = 5 * MiB
_READ_CHUNK = 1 * MiB

_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidSecurity",
}
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_CORRUPT = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "IncompleteBody"}

T = TypeVar("T")


def crc32_b64(data: bytes) -> str:
    """S3's spelling of a CRC32: base64 of its four big-endian bytes."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def file_crc32_b64(path: Path) -> str:
    """The CRC32 of the file at ``path``, spelled as S3 does (read in 1 MiB pieces)."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _ns(value: Any) -> int:
    """A boto3 timestamp (datetime) as nanoseconds since the epoch; 0 when absent."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000_000)
    return 0


def error_kind(exc: BaseException) -> tuple[ErrorKind, str]:
    """The kind of a botocore failure and a one-line detail (no credentials in it)."""
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        message = str(err.get("Message", "")).strip()
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = (
            f"{code or status}: {message} (HTTP {status})" if message else f"{code} (HTTP {status})"
        )
        kind: ErrorKind
        if code == "NoSuchBucket":
            kind = "no_bucket"
        elif code in _DENIED or status in (401, 403):
            kind = "denied"
        elif code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            kind = "precondition"
        elif code in ("NoSuchKey", "NoSuchUpload", "404") or status == 404:
            kind = "not_found"
        elif code in _CORRUPT:
            kind = "corrupt"
        elif code in _TRANSIENT or status == 429 or status >= 500:
            kind = "transient"
        else:
            kind = "other"
        return kind, detail
    if isinstance(exc, bx.FlexibleChecksumError):
        return "corrupt", f"checksum mismatch: {exc}"
    if isinstance(exc, bx.IncompleteReadError):
        return "transient", f"response body cut short: {exc}"
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return "denied", "no usable AWS credentials found"
    if isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.ResponseStreamingError):
        return "transient", f"{type(exc).__name__}: {exc}"
    return "other", f"{type(exc).__name__}: {exc}"


class S3Store:
    """One S3 bucket (:class:`~daemon.objectstore.client.ObjectStore`). Thread-safe.

    ``max_attempts``: HTTP attempts per request (botocore's standard retry
    mode). Files larger than ``multipart_threshold`` are uploaded in parts of
    ``part_size`` (at least 5 MiB; more when a file would need over 10,000),
    ``max_concurrency`` at a time.
    """

    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 6,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
        max_concurrency: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        self._bucket = bucket
        self.multipart_threshold = multipart_threshold
        self.part_size = max(part_size, _MIN_PART)
        self.max_concurrency = max(1, max_concurrency)
        self.max_attempts = max(1, max_attempts)
        config = Config(
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * self.max_concurrency),
            # Checksums on every request body that supports them (PutObject, UploadPart).
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_supported",
        )
        # A session of its own: boto3's default session is not thread-safe to create clients from.
        session = boto3.session.Session()
        self._s3: Any = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self._local = threading.local()
        self._bucket_exists = False
        # Count each repeated HTTP attempt; AWSRequest.context carries botocore's attempt number.
        self._s3.meta.events.register("request-created.s3", self._on_request_created)

    @property
    def bucket(self) -> str:
        return self._bucket

    def __repr__(self) -> str:
        return f"S3Store({self._bucket!r})"

    # -- bookkeeping --------------------------------------------------------

    def _on_request_created(self, request: Any, **_: Any) -> None:
        attempt = int(getattr(request, "context", {}).get("retries", {}).get("attempt", 1))
        if attempt > 1:
            TRAFFIC.retry(self.scheme)
            self._local.retried = getattr(self._local, "retried", 0) + 1

    def _retried(self) -> int:
        return int(getattr(self._local, "retried", 0))

    @contextmanager
    def _op(self, operation: str, key: str) -> Iterator[None]:
        """Count the operation and turn every botocore failure into an ObjectStoreError."""
        self._local.retried = 0
        with counted(
            self.scheme,
            operation,
            (bx.BotoCoreError, bx.ClientError),
            lambda e: self._error(e, operation, key),
        ):
            yield

    def _error(self, exc: BaseException, operation: str, key: str) -> ObjectStoreError:
        kind, detail = error_kind(exc)
        # A 404 without NoSuchBucket (a HEAD has no error body) may still mean the
        # bucket is gone: say which, since a missing bucket needs a person.
        if kind == "not_found" and not self._bucket_present():
            kind = "no_bucket"
        if kind == "no_bucket":
            detail = f"bucket {self._bucket!r} does not exist ({detail})"
        return ObjectStoreError(kind, operation, self._bucket, key, detail)

    def _bucket_present(self) -> bool:
        """Whether the bucket exists (remembered once seen: buckets rarely vanish)."""
        if self._bucket_exists:
            return True
        try:
            self._s3.head_bucket(Bucket=self._bucket)
        except bx.ClientError as e:
            # Denied or flaky: do not claim the bucket is missing.
            return error_kind(e)[0] not in ("not_found", "no_bucket")
        except bx.BotoCoreError:
            return True
        self._bucket_exists = True
        return True

    def _read_retrying(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a request and the reading of its body) again when the body read breaks."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return fn()
            except (bx.ResponseStreamingError, bx.IncompleteReadError, bx.ReadTimeoutError):
                if attempt == self.max_attempts:
                    raise
                TRAFFIC.retry(self.scheme)
                self._local.retried = self._retried() + 1
        raise AssertionError("unreachable")

    def _info(self, key: str, head: dict[str, Any]) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=int(head.get("ContentLength", head.get("Size", 0))),
            updated_ns=_ns(head.get("LastModified")),
            token=str(head.get("ETag", "")),
        )

    def _head(self, key: str, *, checksum: bool = False) -> dict[str, Any] | None:
        try:
            extra = {"ChecksumMode": "ENABLED"} if checksum else {}
            head: dict[str, Any] = self._s3.head_object(Bucket=self._bucket, Key=key, **extra)
        except bx.ClientError as e:
            if error_kind(e)[0] == "not_found" and self._bucket_present():
                return None
            raise
        return head

    # -- reads --------------------------------------------------------------

    def list(self, prefix: str, *, delimiter: bool = True, start_after: str = "") -> Listing:
        """See :meth:`ObjectStore.list`: ListObjectsV2, every page."""
        objects: list[ObjectInfo] = []
        folders: list[str] = []
        with self._op("list", prefix):
            args: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix}
            if delimiter:
                args["Delimiter"] = "/"
            if start_after:
                args["StartAfter"] = start_after
            for page in self._s3.get_paginator("list_objects_v2").paginate(**args):
                for obj in page.get("Contents", []):
                    objects.append(self._info(obj["Key"], obj))
                folders.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
            self._bucket_exists = True
        return Listing(objects=objects, folders=folders)

    def head(self, key: str) -> ObjectInfo | None:
        """See :meth:`ObjectStore.head`."""
        with self._op("head", key):
            head = self._head(key)
        return None if head is None else self._info(key, head)

    def get(self, key: str) -> bytes:
        """See :meth:`ObjectStore.get`. botocore checks the stored full-object checksum."""
        with self._op("get", key):

            def read() -> bytes:
                r = self._s3.get_object(Bucket=self._bucket, Key=key, ChecksumMode="ENABLED")
                return bytes(r["Body"].read())

            data = self._read_retrying(read)
        TRAFFIC.downloaded(self.scheme, len(data))
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """See :meth:`ObjectStore.get_range` (no checksum: S3 has none for ranges)."""
        if length <= 0:
            return b""
        with self._op("get_range", key):

            def read() -> bytes:
                rng = f"bytes={start}-{start + length - 1}"
                r = self._s3.get_object(Bucket=self._bucket, Key=key, Range=rng)
                return bytes(r["Body"].read())

            data = self._read_retrying(read)
        TRAFFIC.downloaded(self.scheme, len(data))
        return data

    def download(self, key: str, dest: Path) -> int:
        """See :meth:`ObjectStore.download`: streamed to a temp file beside ``dest``, renamed.

        botocore checks the full-object checksum as the body streams; the size
        is checked against Content-Length.
        """
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}-{threading.get_ident()}")
        with self._op("download", key):

            def read() -> int:
                r = self._s3.get_object(Bucket=self._bucket, Key=key, ChecksumMode="ENABLED")
                expected = int(r.get("ContentLength", -1))
                n = 0
                with tmp.open("wb") as f:
                    for chunk in r["Body"].iter_chunks(_READ_CHUNK):
                        f.write(chunk)
                        n += len(chunk)
                if expected >= 0 and n != expected:
                    raise ObjectStoreError(
                        "corrupt", "download", self._bucket, key, f"got {n} bytes of {expected}"
                    )
                return n

            try:
                n = self._read_retrying(read)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        TRAFFIC.downloaded(self.scheme, n)
        return n

    # -- writes -------------------------------------------------------------

    def _conditions(self, if_absent: bool, if_token: str | None) -> dict[str, str]:
        args: dict[str, str] = {}
        if if_absent:
            args["IfNoneMatch"] = "*"
        if if_token is not None:
            args["IfMatch"] = if_token
        return args

    def _mine_after_retry(self, key: str, size: int, crc: str) -> ObjectInfo | None:
        """After a 412 on a retried write: the object, if it is what this call wrote."""
        if not self._retried():
            return None
        head = self._head(key, checksum=True)
        if head is None:
            return None
        if int(head.get("ContentLength", -1)) == size and head.get("ChecksumCRC32") == crc:
            return self._info(key, head)
        return None

    def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_token: str | None = None
    ) -> ObjectInfo:
        """See :meth:`ObjectStore.put`: one PutObject with a CRC32 the store checks.

        ``updated_ns`` of the result is the store's response time (a PUT
        response carries no Last-Modified).
        """
        crc = crc32_b64(data)
        with self._op("put", key):
            try:
                r = self._s3.put_object(
                    Bucket=self._bucket,
                    Key=key,
                    Body=data,
                    ChecksumAlgorithm="CRC32",
                    **self._conditions(if_absent, if_token),
                )
            except bx.ClientError as e:
                if error_kind(e)[0] == "precondition":
                    mine = self._mine_after_retry(key, len(data), crc)
                    if mine is not None:
                        TRAFFIC.uploaded(self.scheme, len(data))
                        return mine
                raise
            stored = r.get("ChecksumCRC32")
            if stored is not None and stored != crc:
                raise ObjectStoreError(
                    "corrupt", "put", self._bucket, key, f"store has CRC32 {stored}, sent {crc}"
                )
            self._bucket_exists = True
        TRAFFIC.uploaded(self.scheme, len(data))
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        updated = int(parsedate_to_datetime(date).timestamp() * 1e9) if date else 0
        return ObjectInfo(key=key, size=len(data), updated_ns=updated, token=str(r.get("ETag", "")))

    def upload(self, key: str, source: Path, *, if_absent: bool = False) -> ObjectInfo:
        """See :meth:`ObjectStore.upload`: PutObject, or parallel parts above the threshold."""
        size = source.stat().st_size
        crc = file_crc32_b64(source)
        with self._op("upload", key):
            if size <= self.multipart_threshold:
                with source.open("rb") as f:
                    try:
                        self._s3.put_object(
                            Bucket=self._bucket,
                            Key=key,
                            Body=f,
                            ChecksumAlgorithm="CRC32",
                            **self._conditions(if_absent, None),
                        )
                    except bx.ClientError as e:
                        if error_kind(e)[0] == "precondition":
                            mine = self._mine_after_retry(key, size, crc)
                            if mine is not None:
                                TRAFFIC.uploaded(self.scheme, size)
                                return mine
                        raise
            else:
                if if_absent and self._head(key) is not None:
                    # S3 checks If-None-Match only at CompleteMultipartUpload; asking
                    # first saves sending every part of a file it would refuse.
                    raise ObjectStoreError(
                        "precondition", "upload", self._bucket, key, "the object exists"
                    )
                self._multipart(key, source, size, crc, if_absent)
            info = self._check_stored(key, size, crc, delete_on_mismatch=True)
        TRAFFIC.uploaded(self.scheme, size)
        return info

    def _check_stored(
        self, key: str, size: int, crc: str, *, delete_on_mismatch: bool
    ) -> ObjectInfo:
        """HEAD ``key`` and compare its size and CRC32 with the local file's."""
        head = self._head(key, checksum=True)
        if head is None:
            raise ObjectStoreError(
                "not_found", "upload", self._bucket, key, "object gone after upload"
            )
        stored_size = int(head.get("ContentLength", -1))
        stored = head.get("ChecksumCRC32")
        if stored_size != size or (stored is not None and stored != crc):
            if delete_on_mismatch:
                self._s3.delete_object(Bucket=self._bucket, Key=key)
            raise ObjectStoreError(
                "corrupt",
                "upload",
                self._bucket,
                key,
                f"store has {stored_size} bytes, CRC32 {stored}; "
                f"file has {size} bytes, CRC32 {crc}",
            )
        return self._info(key, head)

    def _multipart(self, key: str, source: Path, size: int, crc: str, if_absent: bool) -> None:
        """A full-object-CRC32 multipart upload; aborted on any failure so no parts linger."""
        part_size = max(self.part_size, -(-size // _MAX_PARTS))
        ranges = [
            (i + 1, off, min(part_size, size - off))
            for i, off in enumerate(range(0, size, part_size))
        ]
        mp = self._s3.create_multipart_upload(
            Bucket=self._bucket, Key=key, ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT"
        )
        upload_id = mp["UploadId"]

        def send(part: tuple[int, int, int]) -> dict[str, Any]:
            number, offset, length = part
            with source.open("rb") as f:
                f.seek(offset)
                body = f.read(length)
            if len(body) != length:
                raise ObjectStoreError(
                    "corrupt",
                    "upload",
                    self._bucket,
                    key,
                    f"{source} changed while it was uploaded",
                )
            r = self._s3.upload_part(
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="CRC32",
            )
            return {
                "PartNumber": number,
                "ETag": r["ETag"],
                "ChecksumCRC32": r.get("ChecksumCRC32") or crc32_b64(body),
            }

        try:
            with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="s3-part") as pool:
                parts = list(pool.map(send, ranges))
            try:
                self._s3.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    ChecksumCRC32=crc,
                    ChecksumType="FULL_OBJECT",
                    **self._conditions(if_absent, None),
                )
            except bx.ClientError as e:
                # A lost CompleteMultipartUpload response: the retry finds the upload
                # gone (NoSuchUpload) or the key taken (412); either is fine when the
                # object is exactly this file.
                if error_kind(e)[0] in ("precondition", "not_found") and self._retried():
                    head = self._head(key, checksum=True)
                    if (
                        head is not None
                        and head.get("ChecksumCRC32") == crc
                        and int(head["ContentLength"]) == size
                    ):
                        return
                raise
        except BaseException:
            # If the abort fails too, the bucket's lifecycle rule for incomplete
            # multipart uploads is the backstop.
            with suppress(bx.BotoCoreError, bx.ClientError):
                self._s3.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
            raise

    def verify(self, key: str, source: Path) -> None:
        """See :meth:`ObjectStore.verify`: size, then the stored full-object CRC32 (or MD5 ETag)."""
        with self._op("verify", key):
            head = self._head(key, checksum=True)
            if head is None:
                raise ObjectStoreError("not_found", "verify", self._bucket, key, "no such object")
            size = source.stat().st_size
            stored_size = int(head.get("ContentLength", -1))
            if stored_size != size:
                raise ObjectStoreError(
                    "corrupt",
                    "verify",
                    self._bucket,
                    key,
                    f"store has {stored_size} bytes, file has {size}",
                )
            stored = head.get("ChecksumCRC32")
            etag = str(head.get("ETag", "")).strip('"')
            if (
                stored
                and "-" not in stored
                and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
            ):
                local = file_crc32_b64(source)
                what = "CRC32"
            elif etag and "-" not in etag:
                # A single-part object stored without a flexible checksum: its ETag is the MD5.
                stored = etag
                md5 = hashlib.md5(usedforsecurity=False)
                with source.open("rb") as f:
                    while chunk := f.read(_READ_CHUNK):
                        md5.update(chunk)
                local = md5.hexdigest()
                what = "MD5"
            else:
                raise ObjectStoreError(
                    "other",
                    "verify",
                    self._bucket,
                    key,
                    "the object has no full-object checksum to compare",
                )
            if stored != local:
                raise ObjectStoreError(
                    "corrupt",
                    "verify",
                    self._bucket,
                    key,
                    f"store has {what} {stored}, file has {local}",
                )

    def delete(self, key: str) -> None:
        """See :meth:`ObjectStore.delete` (S3 answers 204 for a missing key too)."""
        with self._op("delete", key):
            self._s3.delete_object(Bucket=self._bucket, Key=key)

    def copy(self, source_key: str, dest_key: str) -> None:
        """See :meth:`ObjectStore.copy`: CopyObject (CRC32 by the store), in parts above 5 GiB."""
        with self._op("copy", dest_key):
            src = {"Bucket": self._bucket, "Key": source_key}
            head = self._head(source_key)
            if head is None:
                raise ObjectStoreError(
                    "not_found", "copy", self._bucket, source_key, "no such object"
                )
            if int(head.get("ContentLength", 0)) <= _COPY_LIMIT:
                self._s3.copy_object(
                    Bucket=self._bucket, Key=dest_key, CopySource=src, ChecksumAlgorithm="CRC32"
                )
            else:
                self._s3.copy(src, self._bucket, dest_key, ExtraArgs={"ChecksumAlgorithm": "CRC32"})
