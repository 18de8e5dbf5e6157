"""A base path on an object store (``gs://``, ``s3://``): publishing without rename.

What TF Serving does on an object store (tensorflow/serving's file-system
polling, read for this design): it lists the base path with a delimiter
every ``--file_system_poll_wait_seconds``; a version ``N`` exists as soon as
*any* object under ``N/`` exists; it loads it without checking for
``saved_model.pb`` first; a load without ``saved_model.pb`` fails and is
retried a few times, then that number stays failed until a higher one
appears; a ``saved_model.pb`` whose ``variables/`` are missing loads
"successfully" with no weights (tensorflow/serving#1086). And there is no
rename: a version cannot appear whole in one step.

So a version is published in this order (:meth:`ObjectStorage.publish`):

1. **claim** the number: a create-only write of ``.ckpt-exporter/claims/N``
   (a name TF Serving never parses as a version). Two publishers never take
   one number, and a number once claimed is never claimed again (the
   chooser is shown claimed numbers as taken). A number some version
   already occupies (one written by hand, say) is never claimed; one that
   turns out occupied right after the claim is released and chosen again;
2. **upload** every file but ``saved_model.pb`` and the commit record, in
   parallel, each create-only and checksummed by the store, and **verify**
   each object against its local file (size and checksum);
3. then ``saved_model.pb``, verified likewise: until it is there a load fails
   (and is retried); once it is there, every variable is already in place
   and verified;
4. **commit**: write the metadata object
   (:data:`~daemon.basepath.layout.METADATA_RELPATH`), only while the
   publish lease is still held. Only a committed version counts as published.

When a step fails, the publisher deletes what it uploaded (in the removal
order below) and the version stays uncommitted; what it could not delete is
a partial version.

Crash analysis:

- crash before the claim: nothing remote exists; the local export folder is
  removed at the next start.
- crash after the claim, before the commit: ``N`` is *partial* (a claim, no
  commit record). At the next publish (under the lease) every object of ``N``
  is deleted, ``saved_model.pb`` first, and the next export takes a new,
  higher number: TF Serving may already have given up on ``N``, so ``N`` is
  never completed later. A reader that waits for ``saved_model.pb`` (or the
  commit record) never loads a version without its variables.
- crash during removal: removal deletes ``saved_model.pb`` first (no reader
  starts loading), then the commit record (so the version reads as partial
  and the next publish finishes deleting it), then the rest.

The local side: an export is written into a local folder under the scratch
directory (:func:`scratch_root`), as are staging folders and failed exports
kept for inspection. The lock is a lease object (:mod:`daemon.basepath.lease`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from daemon.basepath.layout import (
    FAILED_DIRNAME,
    LOCK_NAME,
    METADATA_RELPATH,
    ROLLED_BACK_DIRNAME,
    STAGING_DIRNAME,
    STATE_DIRNAME,
)
from daemon.basepath.lease import LeaseLock, held_lease
from daemon.basepath.storage import (
    PUBLISH_ATTEMPTS,
    keep_failed_in,
    new_export_dir_in,
    remove_stale_exports_in,
    remove_stale_staging_in,
)
from daemon.durable import write_json_atomic
from daemon.objectstore.client import ObjectStore, ObjectStoreError
from daemon.objectstore.clients import client_for
from daemon.objectstore.url import Location, ObjectURL
from daemon.rules.versions import list_versions, parse_version

#: The last file of a version to appear and the first to go (see the module docstring).
SAVED_MODEL_PB = "saved_model.pb"
#: Claims of version numbers, inside the state folder.
CLAIMS_DIRNAME = "claims"
#: The local folder (under the scratch directory) holding the last published export.
PUBLISHED_DIRNAME = "published"
#: Uploads of one version running at once.
UPLOAD_THREADS = 8


def scratch_root() -> Path:
    """The local folder for exports, staging and failed exports of object-store base paths.

    ``$CKPT_EXPORTER_SCRATCH_DIR`` if set; else systemd's ``$CACHE_DIRECTORY``
    (the unit's ``CacheDirectory=``); else ``$XDG_CACHE_HOME/ckpt-exporter``
    (``~/.cache/ckpt-exporter``). It needs room for one export and one
    fetched checkpoint per model at a time.
    """
    explicit = os.environ.get("CKPT_EXPORTER_SCRATCH_DIR")
    if explicit:
        return Path(explicit)
    systemd = os.environ.get("CACHE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ckpt-exporter"


class ObjectStorage:
    """:class:`~daemon.basepath.storage.BasePathStorage` on a bucket prefix (module docstring)."""

    def __init__(self, base_path: ObjectURL, store: ObjectStore | None = None) -> None:
        self.base_path: Location = base_path
        self.url = base_path
        self.store = (
            store if store is not None else client_for(base_path, base_path.endpoint or None)
        )
        self.local = scratch_root() / base_path.scheme / base_path.bucket / base_path.prefix

    # --- keys ---------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.url.key("/".join(parts))

    def _state_key(self, name: str) -> str:
        return self._key(STATE_DIRNAME, name)

    def _version_objects(self, name: str) -> list[str]:
        return [o.key for o in self.store.list(self._key(name) + "/", delimiter=False).objects]

    # --- reading ------------------------------------------------------------

    def exists(self) -> bool:
        listing = self.store.list(self.url.folder_key())
        return bool(listing.objects or listing.folders)

    def list_children(self) -> list[tuple[str, bool]]:
        listing = self.store.list(self.url.folder_key())
        folders = [(self.url.name_of(f).rstrip("/"), True) for f in listing.folders]
        return folders + [(self.url.name_of(o.key), False) for o in listing.objects]

    def read_version_metadata(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.store.get(self._key(name, METADATA_RELPATH.as_posix())))
        except ObjectStoreError as e:
            if e.kind == "not_found":
                return None
            raise  # a failing bucket is not "a version without metadata"
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def version_bytes(self, name: str) -> int:
        listing = self.store.list(self._key(name) + "/", delimiter=False)
        return sum(o.size for o in listing.objects)

    def local_copy(self, name: str) -> Path | None:
        path = self.local / PUBLISHED_DIRNAME / name
        try:
            return path if path.is_dir() else None
        except OSError:  # is_dir raises on EACCES: no usable copy
            return None

    # --- records --------------------------------------------------------------

    def read_record(self, name: str) -> Any:
        try:
            data = self.store.get(self._state_key(name))
        except ObjectStoreError as e:
            if e.kind == "not_found":
                raise FileNotFoundError(f"{self.url}/{STATE_DIRNAME}/{name}") from e
            raise
        return json.loads(data.decode("utf-8"))

    def write_record(self, name: str, data: Any) -> None:
        # One PUT replaces an object atomically: a reader sees the old record
        # or the new one, and once the store answers, the write is durable.
        self.store.put(self._state_key(name), json.dumps(data, indent=1).encode())

    def delete_record(self, name: str) -> None:
        self.store.delete(self._state_key(name))

    # --- the lock -------------------------------------------------------------

    def publish_lock(self) -> LeaseLock:
        return LeaseLock(self.store, self.url, self._state_key(LOCK_NAME))

    # --- local folders --------------------------------------------------------

    def new_export_dir(self) -> Path:
        return new_export_dir_in(self.local)

    def reset_export_dir(self, export_dir: Path) -> None:
        shutil.rmtree(export_dir, ignore_errors=True)
        export_dir.mkdir()

    def discard_export(self, export_dir: Path) -> None:
        shutil.rmtree(export_dir, ignore_errors=True)

    def staging_dir(self, job_id: str) -> Path:
        return self.local / STAGING_DIRNAME / f"{os.getpid()}-{job_id}"

    def discard_staging(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def keep_failed(self, export_dir: Path, label: str, keep: int) -> Path | None:
        # Kept locally: a failed export is for a person on this machine to
        # inspect, and uploading it would only cost time and storage.
        return keep_failed_in(self.local / FAILED_DIRNAME, export_dir, label, keep)

    # --- publication ----------------------------------------------------------

    def publish(
        self,
        export_dir: Path,
        choose_version: Callable[[list[int]], int],
        metadata: Mapping[str, Any],
    ) -> tuple[int, Location]:
        """Claim, upload (``saved_model.pb`` last), verify, commit; see the module docstring.

        The caller holds the lease. ``choose_version`` is shown every version
        present and every number ever claimed (never reused). On failure the
        version is not committed: what was uploaded is deleted (what cannot
        be is a partial version, removed by the next publish) and
        ``export_dir`` keeps its files.
        """
        self.remove_partial_versions()
        version = self._claim(choose_version, export_dir, metadata)
        name = str(version)
        files = _files_in_upload_order(export_dir)
        uploaded: list[str] = []
        try:
            self._upload(export_dir, name, files, uploaded)
            lease = held_lease(self.url)
            if lease is None or not lease.held():
                raise ObjectStoreError(
                    "precondition",
                    "commit",
                    self.url.bucket,
                    self._key(name),
                    "the publish lease was lost (another process took it over) "
                    "before the version was committed; it stays uncommitted",
                )
            # The commit record: only now does the version count as published.
            commit = self._key(name, METADATA_RELPATH.as_posix())
            uploaded.append(commit)  # before the call: an answer lost after the write
            self.store.upload(commit, export_dir / METADATA_RELPATH, if_absent=True)
        except BaseException:
            # Only what this call uploaded: an object under this number that
            # was not (a by-hand write racing the claim) is not ours to delete.
            # If this fails too the version stays partial: the next publish removes it.
            with contextlib.suppress(OSError):
                self._delete_in_order(name, uploaded)
            raise
        self._keep_local_copy(export_dir, name)
        return version, self.url / name

    def _keep_local_copy(self, export_dir: Path, name: str) -> None:
        """Keep the export just published as the local copy of its version (the only one kept).

        The next export reuses its graph (and links its weights) from there,
        as it would from the version itself on a filesystem.
        """
        kept = self.local / PUBLISHED_DIRNAME
        kept.mkdir(parents=True, exist_ok=True)
        for old in kept.iterdir():
            shutil.rmtree(old, ignore_errors=True)
        os.rename(export_dir, kept / name)

    def _present(self) -> set[int]:
        """Every version number TF Serving sees in the base path (folders and files)."""
        return {e.version for e in list_versions(self.list_children())}

    def _claim(
        self,
        choose_version: Callable[[list[int]], int],
        export_dir: Path,
        metadata: Mapping[str, Any],
    ) -> int:
        """Choose a number, write the export's metadata for it, claim it (module docstring).

        The metadata is written before the claim, so that an export whose
        metadata cannot be written claims nothing.
        """
        claimed = set(self._claimed())
        present = self._present()
        for _attempt in range(PUBLISH_ATTEMPTS):
            version = choose_version(sorted(claimed | present))
            if version in present:
                continue  # a version occupies it (made by hand?): never claim it, choose again
            meta = dict(metadata, version=version, published_at=time.time())
            write_json_atomic(export_dir / METADATA_RELPATH, meta)
            claim = self._state_key(f"{CLAIMS_DIRNAME}/{version}")
            # Unique content: a retried create-only write recognises only its own bytes.
            body = json.dumps(
                {"pid": os.getpid(), "claimed_at": time.time(), "nonce": uuid.uuid4().hex}
            ).encode()
            try:
                self.store.put(claim, body, if_absent=True)
            except ObjectStoreError as e:
                if e.kind != "precondition":
                    raise
                claimed.add(version)  # claimed by someone else meanwhile: choose again
                continue
            present = self._present()
            if version in present:
                # Written without the lease between our listing and our claim.
                # Nothing of ours is under it: give the claim back, so that the
                # next publish does not take that version for a partial one of ours.
                self.store.delete(claim)
                continue
            return version
        raise FileExistsError(f"could not claim a free version number in {self.url}")

    def _claimed(self) -> list[int]:
        folder = self._state_key(CLAIMS_DIRNAME) + "/"
        out = []
        for o in self.store.list(folder).objects:
            v = parse_version(o.key[len(folder) :])
            if v is not None:
                out.append(v)
        return out

    def _upload(self, export_dir: Path, name: str, files: list[Path], uploaded: list[str]) -> None:
        """Every file but the commit record, verified; ``saved_model.pb`` last.

        Appends each key to ``uploaded`` before its upload starts (an upload
        whose answer is lost may still have written it), for the clean-up.
        """
        body = [f for f in files if f.name != SAVED_MODEL_PB]
        last = [f for f in files if f.name == SAVED_MODEL_PB]

        def key(f: Path) -> str:
            return self._key(name, f.relative_to(export_dir).as_posix())

        def put(f: Path) -> None:
            uploaded.append(key(f))  # list.append is atomic: threads share the list
            self.store.upload(key(f), f, if_absent=True)

        def verify(f: Path) -> None:
            self.store.verify(key(f), f)

        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(put, body))  # list(): raise the first failure
            # Every variable is checked before saved_model.pb makes the version loadable.
            list(pool.map(verify, body))
            for f in last:
                put(f)
                verify(f)

    def remove_partial_versions(self) -> list[int]:
        """Delete every claimed version without a commit record; returns their numbers.

        Only under the lease: a version another publisher is uploading right
        now is partial too.
        """
        removed = []
        present = {e.version: e.name for e in list_versions(self.list_children()) if e.is_dir}
        for v in self._claimed():
            name = present.get(v)
            if name is None:
                continue
            if self.store.head(self._key(name, METADATA_RELPATH.as_posix())) is None:
                self._delete_version_objects(name)
                removed.append(v)
        return removed

    # --- versions leaving -------------------------------------------------------

    def remove_version(self, name: str) -> None:
        if not self._delete_version_objects(name):
            raise FileNotFoundError(f"no version {name} in {self.url}")

    def _delete_version_objects(self, name: str) -> list[str]:
        """Delete every object of version ``name`` in the safe order; returns their keys."""
        keys = self._version_objects(name)
        self._delete_in_order(name, keys)
        return keys

    def _delete_in_order(self, name: str, keys: list[str]) -> None:
        """``saved_model.pb`` first, the commit record next, then the rest (module docstring)."""
        first = [k for k in keys if k.rsplit("/", 1)[-1] == SAVED_MODEL_PB]
        commit = self._key(name, METADATA_RELPATH.as_posix())
        rest = [k for k in keys if k not in first and k != commit]
        for k in first:
            self.store.delete(k)
        if commit in keys:
            self.store.delete(commit)
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(self.store.delete, rest))

    def move_to_rolled_back(self, name: str, label: str) -> Location:
        # No rename: copy the version whole inside the bucket (server side),
        # then delete it in the safe order. A crash in between leaves a copy
        # and the version; the rollback is then simply run again.
        keys = self._version_objects(name)
        if not keys:
            raise FileNotFoundError(f"no version {name} in {self.url}")
        folder = self._key(STATE_DIRNAME, ROLLED_BACK_DIRNAME)
        for n in range(100):
            dest = label + (f"-{n}" if n else "")
            if not self.store.list(f"{folder}/{dest}/", delimiter=False).objects:
                break
        else:
            raise FileExistsError(f"no free name for version {name} ({label}) in {folder}")
        source = self._key(name) + "/"
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(
                pool.map(lambda k: self.store.copy(k, f"{folder}/{dest}/{k[len(source) :]}"), keys)
            )
        self._delete_version_objects(name)
        return self.url / STATE_DIRNAME / ROLLED_BACK_DIRNAME / dest

    # --- after a crash ------------------------------------------------------------

    def prepare(self) -> list[Path]:
        # Fails here, naming the bucket, when it is missing or not ours to
        # read: the model then waits for a reload instead of failing exports.
        self.list_children()
        removed = self.remove_stale_exports()
        self.remove_stale_staging()
        lease = self.publish_lock()
        if lease.try_acquire():
            try:
                self.remove_partial_versions()
            finally:
                lease.release()
        return removed

    def remove_stale_exports(self) -> list[Path]:
        return remove_stale_exports_in(self.local)

    def remove_stale_staging(self) -> None:
        remove_stale_staging_in(self.local / STAGING_DIRNAME)

    def empty_trash(self) -> None:
        """Nothing to do: a version is deleted in place, in the safe order."""


def _files_in_upload_order(export_dir: Path) -> list[Path]:
    """Every regular file of the export but the commit record, ``saved_model.pb`` last."""
    files = sorted(p for p in export_dir.rglob("*") if p.is_file())
    commit = export_dir / METADATA_RELPATH
    files = [f for f in files if f != commit]
    return sorted(files, key=lambda f: f.name == SAVED_MODEL_PB)
