"""A checkpoint directory as the scanners see it: a local folder or an object-store prefix.

The scanners (:mod:`daemon.sources.tf_checkpoint`, ``tf1_checkpoint``,
``saved_model``) read a directory only through :class:`CheckpointDirectory`,
so one code path decides completeness for both kinds of directory:

- :class:`LocalDirectory`: ``os.scandir`` and file reads, as the scanners
  always did;
- :class:`RemoteDirectory`: a ``gs://`` or ``s3://`` prefix, read through
  :class:`~daemon.objectstore.client.ObjectStore`. There are no events for
  it: the supervisor polls, and each poll costs one listing (all its pages)
  plus a GET only for what changed since the last poll; the scanners cache
  what they read by the object's (size, mtime, token), and a token
  (S3 ETag, GCS generation) changes with every write of an object.

Errors: a directory that does not exist yet is ``entries() -> None`` (for a
prefix: nothing under it). A local error is an ``OSError``; a file deleted
since the listing is ``FileNotFoundError`` on both kinds (a remote
``not_found`` is translated, so the scanners treat a vanished file alike).
Every other :class:`~daemon.objectstore.client.ObjectStoreError` (no bucket,
denied, transient) propagates out of the scan: the supervisor reports it and
pauses the model.

Supervisor side: no TensorFlow, no NumPy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from daemon.objectstore.client import ObjectInfo, ObjectStore, ObjectStoreError
from daemon.objectstore.url import ObjectURL


@dataclass(frozen=True, slots=True)
class Entry:
    """One file or folder of a directory.

    ``name`` is relative to the directory listed (to the folder walked, for
    :meth:`CheckpointDirectory.walk`), with ``/`` between segments.
    ``mtime_ns`` is the file's mtime, or the object's last-modified time as
    the store reports it. ``token`` changes whenever the object is written
    again (S3 ETag, GCS generation); it is ``""`` for local files, whose
    (size, mtime) is their identity. Folders have size 0; a remote folder
    (a common prefix) has mtime 0 and no token.
    """

    name: str
    size: int
    mtime_ns: int
    is_dir: bool
    token: str = ""


class CheckpointDirectory(Protocol):
    """What a scanner may ask of a checkpoint directory; see the module docstring.

    ``name`` arguments are relative to the directory and may hold ``/``
    (``"export/1/saved_model.pb"``). Instances are used by one scan at a
    time (not thread-safe).
    """

    @property
    def location(self) -> Path | ObjectURL:
        """The directory itself: what logs show and what :meth:`path` joins onto."""
        ...

    def path(self, name: str) -> Path | ObjectURL:
        """The location of ``name`` inside the directory."""
        ...

    def entries(self, *, recursive: bool = False) -> dict[str, Entry] | None:
        """The entries directly in the directory by name, or None if it does not exist.

        ``recursive`` says the caller will also :meth:`walk` its folders: a
        remote directory then lists every object below it in one listing and
        answers :meth:`walk` and :meth:`is_file` from that listing; a local
        one ignores it. ``NotADirectoryError`` when a file stands in its place.
        """
        ...

    def read_bytes(self, name: str) -> bytes:
        """The whole content of file ``name`` (``FileNotFoundError`` if it is gone)."""
        ...

    def is_file(self, name: str) -> bool:
        """Whether ``name`` is a file (an object) now."""
        ...

    def walk(self, name: str) -> list[Entry]:
        """Every file below folder ``name``, at any depth, sorted by relative name.

        Entry names are relative to ``name``. An empty list if it holds none.
        """
        ...


class LocalDirectory:
    """A folder on a local (or mounted) filesystem."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @property
    def location(self) -> Path:
        return self._path

    def path(self, name: str) -> Path:
        return self._path / name

    def entries(self, *, recursive: bool = False) -> dict[str, Entry] | None:
        """``os.scandir`` of the folder; every entry stat'ed (following symlinks).

        An entry that cannot be stat'ed (deleted since the listing, a dangling
        or looping symlink) is left out, as if it were not there yet.
        ``is_dir`` does not follow symlinks: a linked folder is not a candidate.
        """
        out: dict[str, Entry] = {}
        try:
            with os.scandir(self._path) as it:
                for e in it:
                    try:
                        st = e.stat()
                        is_dir = e.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    out[e.name] = Entry(e.name, st.st_size, st.st_mtime_ns, is_dir)
        except FileNotFoundError:
            return None
        return out

    def read_bytes(self, name: str) -> bytes:
        return (self._path / name).read_bytes()

    def is_file(self, name: str) -> bool:
        return (self._path / name).is_file()

    def walk(self, name: str) -> list[Entry]:
        """``os.walk`` of the folder; OSError if a file vanishes between listing and stat."""
        folder = self._path / name
        out = []
        for root, _dirs, files in os.walk(folder):
            for f in files:
                full = os.path.join(root, f)
                st = os.stat(full)
                rel = os.path.relpath(full, folder)
                out.append(Entry(rel, st.st_size, st.st_mtime_ns, False))
        return sorted(out, key=lambda e: e.name)


def _file_entry(name: str, info: ObjectInfo) -> Entry:
    return Entry(name, info.size, info.updated_ns, False, info.token)


class RemoteDirectory:
    """A prefix of a bucket (``gs://bucket/run``), polled by listing.

    ``client`` defaults to :func:`daemon.objectstore.clients.client_for` of the
    URL (which caches one client per bucket and endpoint); tests may pass
    any :class:`~daemon.objectstore.client.ObjectStore` for the same bucket.
    Objects whose key ends with ``/`` (folder placeholders some tools write)
    are not files and are skipped.
    """

    def __init__(self, url: ObjectURL, client: ObjectStore | None = None) -> None:
        self._url = url
        self._client = client
        #: Folder name -> its files (relative names), from the last recursive listing.
        self._tree: dict[str, dict[str, Entry]] | None = None

    @property
    def location(self) -> ObjectURL:
        return self._url

    @property
    def client(self) -> ObjectStore:
        """The client of the URL's bucket (made on first use)."""
        if self._client is None:
            from daemon.objectstore.clients import client_for

            self._client = client_for(self._url, self._url.endpoint or None)
        return self._client

    def path(self, name: str) -> ObjectURL:
        return self._url.child(name)

    def entries(self, *, recursive: bool = False) -> dict[str, Entry] | None:
        """One listing of the prefix (every page): delimited, or below every level."""
        listing = self.client.list(self._url.folder_key(), delimiter=not recursive)
        out: dict[str, Entry] = {}
        tree: dict[str, dict[str, Entry]] = {}
        for info in listing.objects:
            rel = self._url.name_of(info.key)
            if not rel or rel.endswith("/"):
                continue  # the folder's own placeholder object
            top, sep, below = rel.partition("/")
            if sep:
                out.setdefault(top, Entry(top, 0, 0, True))
                tree.setdefault(top, {})[below] = _file_entry(below, info)
            else:
                out[rel] = _file_entry(rel, info)
        for folder in listing.folders:
            top = self._url.name_of(folder).rstrip("/")
            if top:
                out.setdefault(top, Entry(top, 0, 0, True))
        self._tree = tree if recursive else None
        if not out:
            return None  # nothing below the prefix: on a store, no such "directory"
        return out

    def read_bytes(self, name: str) -> bytes:
        key = self._url.key(name)
        try:
            return self.client.get(key)
        except ObjectStoreError as e:
            if e.kind == "not_found":
                raise FileNotFoundError(f"{self.path(name)} is gone") from e
            raise

    def _in_tree(self, name: str) -> tuple[str, str] | None:
        top, sep, below = name.partition("/")
        return (top, below) if sep and self._tree is not None else None

    def is_file(self, name: str) -> bool:
        split = self._in_tree(name)
        if split is not None:
            assert self._tree is not None
            return split[1] in self._tree.get(split[0], {})
        return self.client.head(self._url.key(name)) is not None

    def walk(self, name: str) -> list[Entry]:
        name = name.strip("/")
        if self._tree is not None and "/" not in name:
            return sorted(self._tree.get(name, {}).values(), key=lambda e: e.name)
        folder = self._url.child(name)
        out = []
        for info in self.client.list(folder.folder_key(), delimiter=False).objects:
            rel = folder.name_of(info.key)
            if rel and not rel.endswith("/"):
                out.append(_file_entry(rel, info))
        return sorted(out, key=lambda e: e.name)


def open_directory(where: Path | ObjectURL | CheckpointDirectory) -> CheckpointDirectory:
    """The view of ``where``: a local folder, a bucket prefix, or a view already made."""
    if isinstance(where, Path):
        return LocalDirectory(where)
    if isinstance(where, ObjectURL):
        return RemoteDirectory(where)
    return where
