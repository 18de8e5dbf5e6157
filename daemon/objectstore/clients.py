"""Which backend serves a URL: :func:`client_for`, one cached client per bucket and endpoint.

The client libraries are optional extras (``ckpt-exporter[s3]``,
``ckpt-exporter[gcs]``) and imported only when a URL of their scheme is
first used, so a daemon with local paths only never imports them. A
missing library raises :class:`ClientMissing`, whose message names the
extra to install.
"""

from __future__ import annotations

import threading

from daemon.objectstore.client import ObjectStore
from daemon.objectstore.url import ObjectURL

#: The module each scheme's backend needs, as ``pip`` would name its package.
_LIBRARIES: dict[str, tuple[str, str]] = {
    "s3": ("boto3", "boto3"),
    "gs": ("google.cloud.storage", "google-cloud-storage"),
}

_lock = threading.Lock()
_clients: dict[tuple[str, str, str | None], ObjectStore] = {}


class ClientMissing(Exception):
    """A URL's client library is not installed; the message names the extra to install."""

    def __init__(self, url: ObjectURL, library: str) -> None:
        self.url = url
        self.library = library
        super().__init__(
            f"{url.scheme}:// needs {library}: pip install 'ckpt-exporter[{url.extra}]'"
        )


def _make(url: ObjectURL, endpoint_url: str | None) -> ObjectStore:
    _, library = _LIBRARIES[url.scheme]
    try:
        if url.scheme == "s3":
            from daemon.objectstore.s3 import S3Store

            return S3Store(url.bucket, endpoint_url=endpoint_url)
        from daemon.objectstore.gcs import GCSStore

        return GCSStore(url.bucket, endpoint_url=endpoint_url)
    except ImportError as e:
        # Only the client library (or one of its own imports) missing is the
        # user's to fix with an extra; a broken module of ours must not hide as one.
        missing = e.name or ""
        if missing.startswith("daemon."):
            raise
        raise ClientMissing(url, library) from e


def client_for(url: ObjectURL, endpoint_url: str | None = None) -> ObjectStore:
    """The client of ``url``'s bucket: one per scheme, bucket and endpoint (thread-safe).

    ``endpoint_url`` (default: ``url.endpoint``, when set) overrides the
    library's own endpoint configuration (``AWS_ENDPOINT_URL``,
    ``AWS_ENDPOINT_URL_S3``, ``STORAGE_EMULATOR_HOST``).
    Raises :class:`ClientMissing` when the scheme's library is not installed.
    """
    if url.scheme not in _LIBRARIES:
        raise ValueError(f"no object-store client for {url.scheme}://")
    if endpoint_url is None:
        endpoint_url = url.endpoint or None
    cache_key = (url.scheme, url.bucket, endpoint_url)
    with _lock:
        client = _clients.get(cache_key)
        if client is None:
            client = _make(url, endpoint_url)
            _clients[cache_key] = client
        return client


def reset_clients() -> None:
    """Forget every cached client (tests: a new endpoint or credentials take effect)."""
    with _lock:
        _clients.clear()
