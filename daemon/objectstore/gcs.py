"""The GCS backend of :class:`~daemon.objectstore.client.ObjectStore`, with google-cloud-storage.

Endpoint: the library's own ``STORAGE_EMULATOR_HOST`` (then anonymous
credentials, as the library does) or an explicit ``endpoint_url``; otherwise
Google's endpoint with application-default credentials.

Conditional writes: create-only is ``ifGenerationMatch=0``; replace-if-unchanged
is ``ifGenerationMatch=<generation>``; an object's token is its generation as
text. A failed condition is HTTP 412: kind ``precondition``, nothing changed.
GCS checks the condition of a resumable upload when the session finalises;
fake-gcs-server honours ``ifGenerationMatch`` on single-request uploads
but ignores it on chunked resumable ones (measured), so a create-only
upload of a large file first asks whether the object exists (which also
saves sending a file GCS would refuse), and against fake-gcs-server that
non-atomic check is the only one.

Checksums: CRC32C. Uploads send the file's CRC32C (computed here with
``google_crc32c``) in the object's metadata, which GCS checks against the
body, and the library compares the CRC32C the store reports; this client then
compares the stored size and CRC32C with its own once more (fake-gcs-server
computes the CRC32C of what it received but does not reject a body whose
declared CRC32C differs, so that comparison is what catches a mismatch
there). :meth:`GCSStore.verify` compares size and the stored CRC32C.
Downloads of whole objects are checked against the stored CRC32C by the library.

Retries: one ``google.api_core`` Retry for every call, conditional writes
included (the library, by default, retries a write only when it carries a
generation precondition). It retries what the library deems retryable (429,
408, 5xx, connection resets and timeouts) with exponential backoff, at most
``max_retries`` times per operation and within ``deadline`` seconds per
request. Each repeated attempt is counted in :data:`~daemon.objectstore.traffic.TRAFFIC`.

A lost response: a create-only (or replace-if-unchanged) write whose first
attempt succeeded but whose response was lost is answered 412 on its retry.
When a conditional write fails with ``precondition`` after a retry of this
very call, the object is read back: if it holds exactly what this call wrote
(same size and CRC32C) the write is treated as done, otherwise the failure
stands. (A create-only write used as a lock should therefore carry content
unique to the writer.)
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import google_crc32c
import requests
from google.api_core import exceptions as gx
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage import exceptions as storage_exceptions
from google.cloud.storage import retry as storage_retry

from daemon.objectstore.client import ErrorKind, Listing, ObjectInfo, ObjectStoreError, counted
from daemon.objectstore.traffic import TRAFFIC

MiB = 1024 * 1024
_READ_CHUNK = 1 * MiB
#: Resumable chunks must be multiples of 256 KiB.
_CHUNK_QUANTUM = 256 * 1024


def crc32c_b64(data: bytes) -> str:
    """GCS's spelling of a CRC32C: base64 of its four big-endian bytes."""
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def file_crc32c_b64(path: Path) -> str:
    """The CRC32C of the file at ``path``, spelled as GCS does."""
    crc = google_crc32c.Checksum()  # type: ignore[no-untyped-call]
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            crc.update(chunk)  # type: ignore[no-untyped-call]
    return base64.b64encode(crc.digest()).decode()  # type: ignore[no-untyped-call]


def _ns(value: Any) -> int:
    return int(value.timestamp() * 1_000_000_000) if isinstance(value, datetime) else 0


def _status(exc: BaseException) -> int:
    if isinstance(exc, gx.GoogleAPICallError) and exc.code is not None:
        return int(exc.code)
    response = getattr(exc, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def error_kind(exc: BaseException) -> tuple[ErrorKind, str]:
    """The kind of a google-cloud-storage failure and a one-line detail."""
    if isinstance(exc, gx.RetryError):
        cause = exc.cause
        return "transient", f"gave up retrying: {cause if cause is not None else exc}"
    if isinstance(exc, storage_exceptions.DataCorruption):
        return "corrupt", f"checksum mismatch: {exc}"
    if isinstance(exc, auth_exceptions.DefaultCredentialsError | auth_exceptions.RefreshError):
        return "denied", f"no usable Google credentials: {type(exc).__name__}"
    status = _status(exc)
    message = getattr(exc, "message", None) or str(exc)
    detail = f"HTTP {status}: {message}" if status else f"{type(exc).__name__}: {message}"
    kind: ErrorKind
    if status == 404:
        kind = "not_found"
    elif status == 412:
        kind = "precondition"
    elif status in (401, 403):
        kind = "denied"
    elif status in (408, 429) or status >= 500:
        kind = "transient"
    elif status:
        kind = "other"
    elif isinstance(
        exc,
        requests.ConnectionError
        | requests.Timeout
        | ConnectionError
        | auth_exceptions.TransportError,
    ):
        kind = "transient"
    else:
        kind = "other"
    return kind, detail.splitlines()[0][:500]


_API_ERRORS: tuple[type[BaseException], ...] = (
    gx.GoogleAPIError,
    storage_exceptions.InvalidResponse,
    storage_exceptions.DataCorruption,
    auth_exceptions.GoogleAuthError,
    requests.RequestException,
    ConnectionError,
)


class GCSStore:
    """One GCS bucket (:class:`~daemon.objectstore.client.ObjectStore`). Thread-safe.

    Files larger than ``resumable_threshold`` are uploaded with a resumable
    upload in chunks of ``chunk_size`` (a multiple of 256 KiB); smaller
    ones in one multipart request. ``anonymous``: use no credentials (the
    default with ``STORAGE_EMULATOR_HOST`` or a plain-``http://`` endpoint).
    """

    scheme = "gs"

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        project: str | None = None,
        anonymous: bool | None = None,
        max_retries: int = 8,
        deadline: float = 120.0,
        initial_delay: float = 0.5,
        max_delay: float = 16.0,
        resumable_threshold: int = 8 * MiB,
        # The library's own default: a version's one big variables file then
        # goes up in one request rather than in sequential 16 MiB chunks
        # (measured 2.19x a plain upload with 16 MiB chunks, bench/objectstores.py).
        chunk_size: int = 100 * MiB,
        timeout: float = 60.0,
    ) -> None:
        self._bucket_name = bucket
        self.max_retries = max(0, max_retries)
        self.resumable_threshold = resumable_threshold
        self.chunk_size = max(_CHUNK_QUANTUM, chunk_size // _CHUNK_QUANTUM * _CHUNK_QUANTUM)
        self.timeout = timeout
        if anonymous is None:
            anonymous = bool(os.environ.get("STORAGE_EMULATOR_HOST")) or bool(
                endpoint_url and endpoint_url.startswith("http://")
            )
        kwargs: dict[str, Any] = {}
        if endpoint_url:
            kwargs["client_options"] = {"api_endpoint": endpoint_url}
        if anonymous:
            kwargs["credentials"] = AnonymousCredentials()  # type: ignore[no-untyped-call]
            kwargs["project"] = project or "ckpt-exporter"
        elif project:
            kwargs["project"] = project
        self._client: Any = storage.Client(**kwargs)
        self._bucket: Any = self._client.bucket(bucket)
        self._local = threading.local()
        self._bucket_exists = False
        self._retry = Retry(
            predicate=self._should_retry,
            initial=initial_delay,
            maximum=max_delay,
            multiplier=2.0,
            timeout=deadline,
            on_error=self._on_retry,
        )

    @property
    def bucket(self) -> str:
        return self._bucket_name

    def __repr__(self) -> str:
        return f"GCSStore({self._bucket_name!r})"

    # -- bookkeeping --------------------------------------------------------

    def _should_retry(self, exc: Exception) -> bool:
        """The library's own notion of retryable, bounded by ``max_retries`` per operation."""
        if not storage_retry._should_retry(exc):
            return False
        return self._retried() < self.max_retries

    def _on_retry(self, exc: Exception) -> None:
        TRAFFIC.retry(self.scheme)
        self._local.retried = self._retried() + 1

    def _retried(self) -> int:
        return int(getattr(self._local, "retried", 0))

    @contextmanager
    def _op(self, operation: str, key: str) -> Iterator[None]:
        """Count the operation and turn every library failure into an ObjectStoreError."""
        self._local.retried = 0
        with counted(self.scheme, operation, _API_ERRORS, lambda e: self._error(e, operation, key)):
            yield

    def _error(self, exc: BaseException, operation: str, key: str) -> ObjectStoreError:
        kind, detail = error_kind(exc)
        # GCS answers 404 for a missing bucket as for a missing object: ask which.
        if kind == "not_found" and not self._bucket_present():
            kind = "no_bucket"
            detail = f"bucket {self._bucket_name!r} does not exist ({detail})"
        return ObjectStoreError(kind, operation, self._bucket_name, key, detail)

    def _bucket_present(self) -> bool:
        """Whether the bucket exists (remembered once seen)."""
        if self._bucket_exists:
            return True
        try:
            exists = bool(self._bucket.exists(retry=self._retry, timeout=self.timeout))
        except _API_ERRORS:
            return True  # denied or flaky: do not claim the bucket is missing
        self._bucket_exists = exists
        return exists

    def _info(self, blob: Any) -> ObjectInfo:
        return ObjectInfo(
            key=str(blob.name),
            size=int(blob.size or 0),
            updated_ns=_ns(blob.updated),
            token=str(blob.generation),
        )

    def _get_blob(self, key: str) -> Any:
        """The blob's metadata, or None when it does not exist (no_bucket: the bucket doesn't)."""
        blob = self._bucket.get_blob(key, retry=self._retry, timeout=self.timeout)
        if blob is None and not self._bucket_present():
            raise ObjectStoreError(
                "no_bucket",
                "head",
                self._bucket_name,
                key,
                f"bucket {self._bucket_name!r} does not exist",
            )
        return blob

    @staticmethod
    def _generation(token: str | None) -> int | None:
        if token is None:
            return None
        try:
            return int(token)
        except ValueError:
            return -1  # no object has this generation: the condition fails as it should

    # -- reads --------------------------------------------------------------

    def list(self, prefix: str, *, delimiter: bool = True, start_after: str = "") -> Listing:
        """See :meth:`ObjectStore.list`: objects.list, every page (``start_after``: startOffset)."""
        objects: list[ObjectInfo] = []
        folders: list[str] = []
        with self._op("list", prefix):
            it = self._client.list_blobs(
                self._bucket_name,
                prefix=prefix or None,
                delimiter="/" if delimiter else None,
                start_offset=start_after or None,
                retry=self._retry,
                timeout=self.timeout,
            )
            for page in it.pages:
                # startOffset is inclusive; start_after is not.
                objects.extend(self._info(b) for b in page if b.name > start_after)
                folders.extend(sorted(page.prefixes))
            self._bucket_exists = True
        return Listing(objects=objects, folders=sorted(set(folders)))

    def head(self, key: str) -> ObjectInfo | None:
        """See :meth:`ObjectStore.head`."""
        with self._op("head", key):
            blob = self._get_blob(key)
        return None if blob is None else self._info(blob)

    def get(self, key: str) -> bytes:
        """See :meth:`ObjectStore.get` (CRC32C checked by the library)."""
        with self._op("get", key):
            data = bytes(
                self._bucket.blob(key).download_as_bytes(
                    checksum="crc32c", retry=self._retry, timeout=self.timeout
                )
            )
        TRAFFIC.downloaded(self.scheme, len(data))
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """See :meth:`ObjectStore.get_range` (no checksum: GCS has none for ranges)."""
        if length <= 0:
            return b""
        with self._op("get_range", key):
            data = bytes(
                self._bucket.blob(key).download_as_bytes(
                    start=start,
                    end=start + length - 1,
                    checksum=None,
                    retry=self._retry,
                    timeout=self.timeout,
                )
            )
        TRAFFIC.downloaded(self.scheme, len(data))
        return data

    def download(self, key: str, dest: Path) -> int:
        """See :meth:`ObjectStore.download`: via a temp file beside ``dest``, CRC32C checked."""
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}-{threading.get_ident()}")
        with self._op("download", key):
            try:
                blob = self._bucket.blob(key)
                blob.download_to_filename(
                    str(tmp), checksum="crc32c", retry=self._retry, timeout=self.timeout
                )
                n = tmp.stat().st_size
                if blob.size is not None and int(blob.size) != n:
                    raise ObjectStoreError(
                        "corrupt",
                        "download",
                        self._bucket_name,
                        key,
                        f"got {n} bytes of {blob.size}",
                    )
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        TRAFFIC.downloaded(self.scheme, n)
        return n

    # -- writes -------------------------------------------------------------

    def _mine_after_retry(self, key: str, size: int, crc: str) -> ObjectInfo | None:
        """After a 412 on a retried write: the object, if it is exactly what this call wrote."""
        if not self._retried():
            return None
        blob = self._bucket.get_blob(key, retry=self._retry, timeout=self.timeout)
        if blob is not None and int(blob.size or -1) == size and blob.crc32c == crc:
            return self._info(blob)
        return None

    def _check_stored(self, operation: str, blob: Any, size: int, crc: str) -> ObjectInfo:
        if int(blob.size if blob.size is not None else -1) != size or blob.crc32c != crc:
            # Created by this call and wrong: remove it, if it is still the one written.
            with suppress(*_API_ERRORS):
                blob.delete(
                    if_generation_match=blob.generation, retry=self._retry, timeout=self.timeout
                )
            raise ObjectStoreError(
                "corrupt",
                operation,
                self._bucket_name,
                str(blob.name),
                f"store has {blob.size} bytes, CRC32C {blob.crc32c}; "
                f"sent {size} bytes, CRC32C {crc}",
            )
        return self._info(blob)

    def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_token: str | None = None
    ) -> ObjectInfo:
        """See :meth:`ObjectStore.put`: one multipart upload carrying its CRC32C."""
        crc = crc32c_b64(data)
        generation = 0 if if_absent else self._generation(if_token)
        with self._op("put", key):
            blob = self._bucket.blob(key)
            blob.crc32c = crc  # sent in the metadata: GCS refuses a body that does not match
            try:
                blob.upload_from_string(
                    data,
                    checksum="crc32c",
                    if_generation_match=generation,
                    retry=self._retry,
                    timeout=self.timeout,
                )
            except gx.PreconditionFailed:
                mine = self._mine_after_retry(key, len(data), crc)
                if mine is None:
                    raise
                TRAFFIC.uploaded(self.scheme, len(data))
                return mine
            info = self._check_stored("put", blob, len(data), crc)
            self._bucket_exists = True
        TRAFFIC.uploaded(self.scheme, len(data))
        return info

    def upload(self, key: str, source: Path, *, if_absent: bool = False) -> ObjectInfo:
        """See :meth:`ObjectStore.upload`: multipart, or resumable above ``resumable_threshold``."""
        size = source.stat().st_size
        crc = file_crc32c_b64(source)
        with self._op("upload", key):
            large = size > self.resumable_threshold
            if large and if_absent and self._get_blob(key) is not None:
                # GCS checks ifGenerationMatch=0 only when the resumable session
                # finalises; asking first saves sending gigabytes it would refuse.
                # (fake-gcs-server does not check it on chunked resumable uploads
                # at all, so there this is the only check: not atomic.)
                raise ObjectStoreError(
                    "precondition", "upload", self._bucket_name, key, "the object exists"
                )
            blob = self._bucket.blob(key, chunk_size=self.chunk_size if large else None)
            blob.crc32c = crc
            try:
                blob.upload_from_filename(
                    str(source),
                    checksum="crc32c",
                    if_generation_match=0 if if_absent else None,
                    retry=self._retry,
                    timeout=self.timeout,
                )
            except gx.PreconditionFailed:
                mine = self._mine_after_retry(key, size, crc)
                if mine is None:
                    raise
                TRAFFIC.uploaded(self.scheme, size)
                return mine
            info = self._check_stored("upload", blob, size, crc)
        TRAFFIC.uploaded(self.scheme, size)
        return info

    def verify(self, key: str, source: Path) -> None:
        """See :meth:`ObjectStore.verify`: size and CRC32C."""
        with self._op("verify", key):
            blob = self._get_blob(key)
            if blob is None:
                raise ObjectStoreError(
                    "not_found", "verify", self._bucket_name, key, "no such object"
                )
            size = source.stat().st_size
            if int(blob.size or 0) != size:
                raise ObjectStoreError(
                    "corrupt",
                    "verify",
                    self._bucket_name,
                    key,
                    f"store has {blob.size} bytes, file has {size}",
                )
            local = file_crc32c_b64(source)
            if blob.crc32c != local:
                raise ObjectStoreError(
                    "corrupt",
                    "verify",
                    self._bucket_name,
                    key,
                    f"store has CRC32C {blob.crc32c}, file has {local}",
                )

    def delete(self, key: str) -> None:
        """See :meth:`ObjectStore.delete`: a missing object is fine, a missing bucket is not."""
        with self._op("delete", key):
            try:
                self._bucket.blob(key).delete(retry=self._retry, timeout=self.timeout)
            except gx.NotFound:
                if not self._bucket_present():
                    raise

    def copy(self, source_key: str, dest_key: str) -> None:
        """See :meth:`ObjectStore.copy`: objects.rewrite until done (server side, any size)."""
        with self._op("copy", dest_key):
            source = self._bucket.blob(source_key)
            dest = self._bucket.blob(dest_key)
            token, _, _ = dest.rewrite(source, retry=self._retry, timeout=self.timeout)
            while token is not None:
                token, _, _ = dest.rewrite(
                    source, token=token, retry=self._retry, timeout=self.timeout
                )
