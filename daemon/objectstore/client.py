"""The one interface the daemon uses to talk to an object store, and its errors.

Every backend (:mod:`~daemon.objectstore.s3`, :mod:`~daemon.objectstore.gcs`)
implements :class:`ObjectStore` for one bucket. Keys are full object keys
(``models/resnet/7/saved_model.pb``); the callers join them with
:meth:`daemon.objectstore.url.ObjectURL.key`.

Error contract: a backend retries what is worth retrying (5xx, 429 /
SlowDown, connection resets and timeouts) itself, with exponential backoff
and a bounded number of attempts, and raises :class:`ObjectStoreError` for
everything it gives up on, with :attr:`ObjectStoreError.kind` saying what
kind of failure it was, and a message naming the bucket, the key and the
operation. Callers decide on ``kind`` alone; they never see a client
library's own exceptions.

Conditional writes are what make the daemon safe without ``rename(2)``:
``if_absent=True`` is a create-only write (``If-None-Match: *`` on S3,
``ifGenerationMatch=0`` on GCS) and ``if_token=`` replaces an object only if
it is still the one read (ETag with ``If-Match`` on S3, generation on GCS).
A write whose condition fails raises kind ``"precondition"`` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

#: What went wrong, as a caller needs to know it:
#: - ``not_found``: the object (or the bucket: see ``no_bucket``) does not exist;
#: - ``no_bucket``: the bucket does not exist;
#: - ``precondition``: a conditional write found the object present or changed;
#: - ``denied``: credentials missing, wrong or not allowed this operation;
#: - ``transient``: the store kept failing (5xx, 429, resets) after every retry;
#: - ``corrupt``: what was read or written does not match its checksum or size;
#: - ``other``: anything else (a bad request), not worth retrying.
ErrorKind = Literal[
    "not_found", "no_bucket", "precondition", "denied", "transient", "corrupt", "other"
]

#: The kinds that say the bucket or the credentials are unusable until a
#: person acts: a model hitting one is paused, not its checkpoints rejected.
CONFIGURATION_KINDS: frozenset[str] = frozenset({"no_bucket", "denied"})


class ObjectStoreError(OSError):
    """An operation failed for good. ``str()`` names the operation, bucket and key.

    An ``OSError``, because to its callers a base path or checkpoint folder on
    an object store is storage like a disk: code that handles a failing disk
    (report, pause the model, retry later) handles a failing bucket too.
    """

    def __init__(self, kind: ErrorKind, operation: str, bucket: str, key: str, detail: str) -> None:
        self.kind: ErrorKind = kind
        self.operation = operation
        self.bucket = bucket
        self.key = key
        self.detail = detail
        where = f"{bucket}/{key}" if key else bucket
        super().__init__(f"{operation} {where}: {detail}")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a listing or a ``head`` shows it.

    ``token`` is what a conditional replace names (S3 ETag, GCS generation as
    text); ``updated_ns`` is the store's last-modified time in nanoseconds.
    """

    key: str
    size: int
    updated_ns: int
    token: str


@dataclass(frozen=True, slots=True)
class Listing:
    """One level of a prefix, listed with delimiter ``/``.

    ``objects`` are the objects directly under the prefix; ``folders`` are
    the names of the common prefixes one level down, each ending with ``/``,
    as full keys.
    """

    objects: list[ObjectInfo]
    folders: list[str]


@runtime_checkable
class ObjectStore(Protocol):
    """One bucket of one object store. Thread-safe: uploads run in parallel."""

    @property
    def scheme(self) -> str:
        """``"s3"`` or ``"gs"``."""
        ...

    @property
    def bucket(self) -> str:
        """The bucket every key of this client lives in."""
        ...

    def list(self, prefix: str, *, delimiter: bool = True, start_after: str = "") -> Listing:
        """Every object (and, with ``delimiter``, folder) under ``prefix``, all pages.

        With ``delimiter=False`` every object below ``prefix`` at any depth is
        in ``objects`` and ``folders`` is empty. ``start_after`` skips keys up
        to and including it (a poll that remembers where it was). A missing
        bucket raises kind ``no_bucket``; a prefix with nothing under it is an
        empty listing.
        """
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """The object ``key``, or None when it does not exist."""
        ...

    def get(self, key: str) -> bytes:
        """The whole object ``key`` (kind ``not_found`` when it does not exist)."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of object ``key`` from byte ``start`` (one ranged GET)."""
        ...

    def download(self, key: str, dest: Path) -> int:
        """Write object ``key`` to the local file ``dest`` (replaced); returns its size."""
        ...

    def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_token: str | None = None
    ) -> ObjectInfo:
        """Write ``data`` as object ``key`` in one request; atomic for every reader.

        ``if_absent``: only if no object ``key`` exists. ``if_token``: only if
        the object is still the one with that token. A failed condition raises
        kind ``precondition``.
        """
        ...

    def upload(self, key: str, source: Path, *, if_absent: bool = False) -> ObjectInfo:
        """Upload the local file ``source`` as object ``key`` (multipart or resumable when large).

        The object appears whole or not at all. The store verifies a checksum
        of the content the client computed from ``source`` (CRC32C on GCS, a
        flexible checksum on S3), and the size is checked against the file;
        a mismatch raises kind ``corrupt``.
        """
        ...

    def verify(self, key: str, source: Path) -> None:
        """Check that object ``key`` holds exactly the local file ``source``.

        Compares the size and the store's checksum (CRC32C on GCS, the S3
        checksum the upload stored) with the file's; raises kind ``corrupt``
        on a mismatch, ``not_found`` when the object is gone.
        """
        ...

    def delete(self, key: str) -> None:
        """Delete object ``key``; a missing object is no error."""
        ...

    def copy(self, source_key: str, dest_key: str) -> None:
        """Copy object ``source_key`` to ``dest_key`` inside the bucket (server side)."""
        ...


@contextmanager
def counted(
    scheme: str,
    operation: str,
    library_errors: tuple[type[BaseException], ...],
    translate: Callable[[BaseException], ObjectStoreError],
) -> Iterator[None]:
    """Count one operation in the traffic counters, by outcome, for a backend.

    A client library's own failure (one of ``library_errors``) leaves as the
    :class:`ObjectStoreError` that ``translate`` makes of it, so callers only
    ever see errors by kind.
    """
    from daemon.objectstore.traffic import TRAFFIC

    try:
        yield
    except ObjectStoreError as e:
        TRAFFIC.request(scheme, operation, e.kind)
        raise
    except library_errors as e:
        err = translate(e)
        TRAFFIC.request(scheme, operation, err.kind)
        raise err from e
    TRAFFIC.request(scheme, operation, "ok")


def iter_keys(store: ObjectStore, prefix: str) -> Iterator[ObjectInfo]:
    """Every object below ``prefix`` at any depth (one recursive listing)."""
    yield from store.list(prefix, delimiter=False).objects
