"""``gs://bucket/prefix`` and ``s3://bucket/prefix``: parsing, joining, printing.

Contract: :func:`parse_url` accepts exactly ``<scheme>://<bucket>[/<prefix>]``
with a scheme of :data:`SCHEMES`, a bucket name the store would accept, and a
prefix without empty, ``.`` or ``..`` segments (object stores keep those
literally, so ``a//b`` and ``a/./b`` would be other objects than the user
meant); anything else raises ``ValueError`` saying what is wrong. A parsed URL
never ends with ``/``; :meth:`ObjectURL.key` joins a relative name below it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: Object-store URL schemes the daemon reads and writes, and the extra that
#: installs each one's client.
SCHEMES: dict[str, str] = {"gs": "gcs", "s3": "s3"}

_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")
# The characters both stores allow in a bucket name (GCS also allows "_").
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


@dataclass(frozen=True, slots=True)
class ObjectURL:
    """A folder-like prefix in one bucket: ``s3://bucket/models/resnet``.

    ``prefix`` has no leading or trailing ``/`` and is ``""`` for the whole
    bucket. ``endpoint`` is the store's URL when it is not the scheme's
    default (an S3-compatible store from config); it travels with the URL so
    that every client made for it talks to the same store, and is not part
    of its text.
    """

    scheme: str
    bucket: str
    prefix: str = ""
    endpoint: str = ""

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    @property
    def extra(self) -> str:
        """The extra (``pip install 'ckpt-exporter[<extra>]'``) this scheme's client needs."""
        return SCHEMES[self.scheme]

    def key(self, name: str = "") -> str:
        """The object key of ``name`` (``"7/saved_model.pb"``) below this prefix."""
        name = name.strip("/")
        if not self.prefix:
            return name
        return f"{self.prefix}/{name}" if name else self.prefix

    def folder_key(self) -> str:
        """The key prefix listing this folder's contents (ends with ``/``; ``""`` at the root)."""
        return f"{self.prefix}/" if self.prefix else ""

    @property
    def name(self) -> str:
        """The last segment of the prefix (``""`` for a bucket root), like ``Path.name``."""
        return self.prefix.rpartition("/")[2]

    @property
    def parent(self) -> ObjectURL:
        """The URL one segment up (the bucket root stays itself), like ``Path.parent``."""
        return ObjectURL(self.scheme, self.bucket, self.prefix.rpartition("/")[0], self.endpoint)

    def child(self, name: str) -> ObjectURL:
        """The URL of ``name`` below this one."""
        return ObjectURL(self.scheme, self.bucket, self.key(name), self.endpoint)

    def __truediv__(self, name: str) -> ObjectURL:
        """``url / "7"``: :meth:`child`, so code that joins names reads as it does for a Path."""
        return self.child(name)

    def name_of(self, key: str) -> str:
        """``key`` relative to this prefix (the inverse of :meth:`key`)."""
        folder = self.folder_key()
        if not key.startswith(folder):
            raise ValueError(f"{key!r} is not below {self}")
        return key[len(folder) :]


#: Where checkpoints or versions live: a local folder or a prefix in a bucket.
#: Code that only names a location (logs, records) uses ``str()`` of either.
Location = Path | ObjectURL


def url_scheme(text: str) -> str | None:
    """The scheme of ``text`` if it looks like a URL (``scheme://...``), else None."""
    m = _URL_RE.match(text)
    return m.group("scheme").lower() if m else None


def parse_url(text: str, endpoint: str = "") -> ObjectURL:
    """The :class:`ObjectURL` ``text`` names (on ``endpoint``); ``ValueError`` saying why not."""
    m = _URL_RE.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a URL (expected gs://bucket/prefix or s3://bucket/prefix)"
        )
    scheme = m.group("scheme").lower()
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"unsupported URL scheme {scheme}:// in {text!r}; supported: {known}")
    bucket, _, prefix = m.group("rest").partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(
            f"{bucket!r} in {text!r} is not a valid bucket name "
            "(3 to 222 lowercase letters, digits, '.', '-' or '_')"
        )
    prefix = prefix.rstrip("/")
    if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
        raise ValueError(f"the prefix of {text!r} has an empty, '.' or '..' segment")
    return ObjectURL(scheme, bucket, prefix, endpoint)
