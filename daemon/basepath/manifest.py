"""The provenance manifest of a version, and its verification.

Every version the daemon publishes carries
:data:`~daemon.basepath.layout.MANIFEST_RELPATH`
(``assets.extra/ckpt_exporter_manifest.json``), written into the export by
the publisher right before :meth:`~daemon.basepath.storage.BasePathStorage.publish`
(:func:`write_manifest`). It records:

- ``files``: the SHA-256 and size of every regular file of the export as it
  was validated, by path relative to the version (``/``-separated). Two files
  are never listed: the manifest itself, and the commit record
  :data:`~daemon.basepath.layout.METADATA_RELPATH`, which the storage writes
  *after* the manifest (it holds the version number, chosen only then);
- ``checkpoint``: the checkpoint's fingerprint, step and prefix;
- ``builder``: the builder spec, the SHA-256 of its module's file and of the
  other source files the export worker reported the builder imported (files
  of the Python installation are left out: ``libraries`` covers them), and
  the git commit of the checkout holding the builder's module with whether
  it had uncommitted or untracked changes (``git`` is null when git is
  absent, refuses the checkout, is slow, or the file is not in a checkout);
- ``config_sha256``: a SHA-256 of the canonical JSON
  (:func:`canonical_json`) of the model's config fields that shape the export
  (:data:`CONFIG_FIELDS`, named in ``config_fields``);
- ``libraries``: the daemon's, TensorFlow's and Keras's versions;
- ``gate``: the metric and its value when a metric gate passed, else null.

The version number is not in the manifest (it is chosen after the manifest
is written); the commit record names it.

:func:`verify_version` re-hashes a version (a local folder or a prefix in a
bucket) against its manifest. Files are streamed in chunks; an object is
downloaded to a temporary file and hashed from there, never held in memory
whole. Supervisor side: standard library only (the object-store client is
imported only for a URL).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from daemon.basepath.layout import MANIFEST_RELPATH, METADATA_RELPATH
from daemon.durable import write_json_atomic
from daemon.objectstore.url import Location, ObjectURL

if TYPE_CHECKING:
    from daemon.config.loading import ModelConfig
    from daemon.objectstore.client import ObjectStore

#: Format of the manifest; a reader refuses another.
MANIFEST_FORMAT = 1
#: Bytes read at a time when hashing a file.
CHUNK_BYTES = 1 << 20
#: How long each git command may take before the provenance says "unknown" (null).
GIT_TIMEOUT_SECONDS = 5.0
#: The :class:`~daemon.config.loading.ModelConfig` fields that shape what is
#: exported: not where checkpoints come from or versions go, nor naming,
#: version policy, retention, validation tolerances or gates.
CONFIG_FIELDS = (
    "source",
    "builder",
    "python_path",
    "checkpoint_key",
    "signature",
    "input_type",
    "image_preprocessing",
    "sample_inputs",
    "warmup_records",
    "incremental_export",
    "options",
)
#: Paths inside a version that its manifest never lists (see the module docstring).
UNLISTED = frozenset({MANIFEST_RELPATH.as_posix(), METADATA_RELPATH.as_posix()})


class ManifestError(Exception):
    """A version cannot be verified: it has no manifest, or an unreadable or foreign one."""


# --- hashing ------------------------------------------------------------------------


def sha256_file(path: Path) -> tuple[str, int]:
    """``(hex SHA-256, size)`` of the file ``path``, read in chunks of :data:`CHUNK_BYTES`.

    Raises ``OSError`` when it cannot be read.
    """
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _entry(digest: str, size: int) -> dict[str, Any]:
    return {"sha256": digest, "bytes": size}


def _regular_files(root: Path) -> dict[str, Path]:
    """Every regular file below ``root`` (links followed, as an upload does) by relative path."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    """``{path: {"sha256", "bytes"}}`` of every file below ``root`` but :data:`UNLISTED`."""
    return {
        rel: _entry(*sha256_file(p))
        for rel, p in _regular_files(root).items()
        if rel not in UNLISTED
    }


# --- provenance -----------------------------------------------------------------------


def _git(folder: Path, *args: str, timeout: float) -> str | None:
    """stdout of ``git -C folder ARGS``, or None when git is absent, fails or is too slow."""
    # The daemon's own GIT_* variables (GIT_DIR...) must not redirect the
    # question; no optional locks: never rewrite the user's index.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_OPTIONAL_LOCKS"] = "0"
    env["GIT_TERMINAL_PROMPT"] = "0"
    try:
        r = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return r.stdout if r.returncode == 0 else None


def git_provenance(folder: Path, timeout: float = GIT_TIMEOUT_SECONDS) -> dict[str, Any] | None:
    """The commit checked out where ``folder`` lies, and whether the checkout was dirty.

    ``{"commit": hex, "dirty": bool | None}`` from ``git rev-parse HEAD`` and
    ``git status --porcelain`` (dirty: any line, untracked files included;
    None when the status command failed or took longer than ``timeout``).
    None, never an error, when git is not installed, ``folder`` is not in a
    checkout (or one without a commit yet), git refuses it (a checkout owned
    by another user: ``safe.directory``) or ``rev-parse`` is too slow.
    """
    head = _git(folder, "rev-parse", "HEAD", timeout=timeout)
    commit = head.strip() if head else ""
    if len(commit) not in (40, 64) or any(c not in "0123456789abcdef" for c in commit):
        return None
    status = _git(folder, "status", "--porcelain", timeout=timeout)
    return {"commit": commit, "dirty": None if status is None else bool(status.strip())}


def _installation_dirs() -> list[Path]:
    """The folders of this Python installation (standard library, site-packages)."""
    paths = sysconfig.get_paths()
    keys = ("stdlib", "platstdlib", "purelib", "platlib")
    return sorted({Path(paths[k]).resolve() for k in keys if k in paths})


def _hash_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return _entry(*sha256_file(path))
    except OSError:
        return None


def builder_provenance(
    spec: str,
    builder_file: Path | None,
    code_files: Iterable[str] = (),
    *,
    git_timeout: float = GIT_TIMEOUT_SECONDS,
) -> dict[str, Any] | None:
    """What the manifest records about the builder ``spec`` (``"module:function"``).

    ``builder_file`` is its module's source file
    (:func:`daemon.config.builders.builder_file`), ``code_files`` the source
    files the export worker reported the builder imported (the export
    result's ``code_files``); files under this Python installation are left
    out, the builder's own file never. Each file maps to its ``{"sha256",
    "bytes"}`` as read now (null when unreadable). ``git`` is
    :func:`git_provenance` of the builder file's folder. None when there is
    no builder (formats that need none).
    """
    if not spec:
        return None
    libraries = _installation_dirs()
    paths: set[Path] = set()
    for text in code_files:
        path = Path(text)
        resolved = path.resolve()
        if not any(resolved.is_relative_to(d) for d in libraries):
            paths.add(path)
    if builder_file is not None:
        paths.add(builder_file)
    return {
        "spec": spec,
        "file": None if builder_file is None else str(builder_file),
        "files": {str(p): _hash_or_none(p) for p in sorted(paths)},
        "git": None
        if builder_file is None
        else git_provenance(builder_file.parent, timeout=git_timeout),
    }


def _plain(value: Any) -> Any:
    """``value`` as JSON types: dataclasses as objects, tuples as lists, paths as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def canonical_json(cfg: ModelConfig) -> str:
    """The canonical JSON of ``cfg``'s :data:`CONFIG_FIELDS`.

    Keys sorted, no spaces, ASCII only; paths as their (absolute) text,
    tuples as lists. The same config always gives the same text.
    """
    data = {name: _plain(getattr(cfg, name)) for name in CONFIG_FIELDS}
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_sha256(cfg: ModelConfig) -> str:
    """The hex SHA-256 of :func:`canonical_json` of ``cfg``."""
    return hashlib.sha256(canonical_json(cfg).encode("ascii")).hexdigest()


# --- writing --------------------------------------------------------------------------


def build_manifest(
    export_dir: Path,
    *,
    model: str,
    checkpoint: Mapping[str, Any],
    builder: Mapping[str, Any] | None,
    config_digest: str,
    libraries: Mapping[str, str],
    gate: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The manifest of the complete export in ``export_dir`` (hashes every file now).

    ``checkpoint`` holds at least ``fingerprint`` and ``step``; ``builder``
    comes from :func:`builder_provenance`; ``config_digest`` from
    :func:`config_sha256`; ``libraries`` maps a distribution to its version;
    ``gate`` is the passed metric gate (``metric`` and ``value``) or None.
    Raises ``OSError`` when a file cannot be read.
    """
    return {
        "format": MANIFEST_FORMAT,
        "tool": "ckpt-exporter",
        "model": model,
        "created_at": time.time(),
        "algorithm": "sha256",
        "files": hash_tree(export_dir),
        "not_listed": sorted(UNLISTED),
        "checkpoint": dict(checkpoint),
        "builder": None if builder is None else dict(builder),
        "config_sha256": config_digest,
        "config_fields": list(CONFIG_FIELDS),
        "libraries": dict(libraries),
        "gate": None if gate is None else dict(gate),
    }


def write_manifest(export_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest`` to :data:`MANIFEST_RELPATH` in ``export_dir`` (atomically); returns it.

    Call it once the export is complete and before it is published: a file
    added to the export afterwards (other than the commit record) is
    reported as not listed by :func:`verify_version`.
    """
    path = export_dir / MANIFEST_RELPATH
    write_json_atomic(path, manifest)
    return path


# --- verifying ------------------------------------------------------------------------


@dataclass
class Changed:
    """A listed file whose content differs: what the manifest says and what was found.

    ``found_sha256`` is None when the size already differed (an object not downloaded).
    """

    path: str
    expected_sha256: str
    expected_bytes: int
    found_sha256: str | None
    found_bytes: int


@dataclass
class VerifyReport:
    """What :func:`verify_version` found. Intact when nothing changed, went missing or was added.

    ``unlisted`` are files present but not in the manifest (the commit
    record and the manifest itself are never counted). ``commit_record``
    says whether :data:`METADATA_RELPATH` is there (an object-store version
    without it was never committed); it does not decide ``intact``.
    """

    location: str
    listed: int
    changed: list[Changed] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    commit_record: bool = False
    checkpoint: dict[str, Any] = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        return not (self.changed or self.missing or self.unlisted)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON types (what ``ckpt-exporter verify --json`` prints)."""
        return {
            "location": self.location,
            "intact": self.intact,
            "listed": self.listed,
            "changed": [dataclasses.asdict(c) for c in self.changed],
            "missing": self.missing,
            "unlisted": self.unlisted,
            "commit_record": self.commit_record,
            "checkpoint": self.checkpoint,
        }


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """The manifest in ``data``, checked; :class:`ManifestError` naming ``where`` if it is not one.

    Every listed path must be relative, ``/``-separated and stay inside the
    version (no ``..``), with a hex SHA-256 and a size.
    """
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise ManifestError(f"{where} is not a JSON manifest: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("tool") != "ckpt-exporter":
        raise ManifestError(f"{where} is not a ckpt-exporter manifest")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(
            f"{where} has manifest format {manifest.get('format')!r}; "
            f"this ckpt-exporter reads format {MANIFEST_FORMAT}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ManifestError(f"{where} lists no files")
    for rel, entry in files.items():
        pure = PurePosixPath(rel)
        ok_path = bool(rel) and not pure.is_absolute() and ".." not in pure.parts
        ok_entry = (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
            and isinstance(entry.get("bytes"), int)
            and not isinstance(entry.get("bytes"), bool)
        )
        if not (ok_path and ok_entry):
            raise ManifestError(
                f"{where}: entry {rel!r} is not a relative path with sha256 and bytes"
            )
    return manifest


def _no_manifest(where: str) -> ManifestError:
    return ManifestError(
        f"{where} has no {MANIFEST_RELPATH.as_posix()}: a version published before "
        "ckpt-exporter wrote manifests, or not a version of ckpt-exporter: "
        "nothing to verify against"
    )


def _compare(
    report: VerifyReport,
    listed: Mapping[str, Mapping[str, Any]],
    present: Mapping[str, int],
    digest: Callable[[str], str],
) -> None:
    """Fill ``report`` from the manifest's ``listed`` files and the ``present`` ones (sizes).

    ``digest(rel)`` hashes a present file, called only when its size matches.
    """
    for rel in sorted(listed):
        want = listed[rel]
        if rel not in present:
            report.missing.append(rel)
            continue
        size = present[rel]
        found = digest(rel) if size == want["bytes"] else None
        if size != want["bytes"] or found != want["sha256"]:
            report.changed.append(Changed(rel, want["sha256"], want["bytes"], found, size))
    report.unlisted = sorted(rel for rel in present if rel not in listed and rel not in UNLISTED)
    report.commit_record = METADATA_RELPATH.as_posix() in present


def _verify_local(path: Path) -> VerifyReport:
    if not path.is_dir():
        raise ManifestError(f"{path} is not a folder (a version folder was expected)")
    try:
        data = (path / MANIFEST_RELPATH).read_bytes()
    except FileNotFoundError:
        raise _no_manifest(str(path)) from None
    manifest = parse_manifest(data, str(path / MANIFEST_RELPATH))
    files = _regular_files(path)
    report = VerifyReport(
        str(path), len(manifest["files"]), checkpoint=manifest.get("checkpoint") or {}
    )
    present = {rel: p.stat().st_size for rel, p in files.items()}
    _compare(report, manifest["files"], present, lambda rel: sha256_file(files[rel])[0])
    return report


def _verify_remote(url: ObjectURL, store: ObjectStore | None) -> VerifyReport:
    from daemon.objectstore.client import ObjectStoreError
    from daemon.objectstore.clients import client_for

    if store is None:
        store = client_for(url)
    folder = url.folder_key()
    try:
        data = store.get(url.key(MANIFEST_RELPATH.as_posix()))
    except ObjectStoreError as e:
        if e.kind == "not_found":
            raise _no_manifest(str(url)) from None
        raise
    manifest = parse_manifest(data, f"{url}/{MANIFEST_RELPATH.as_posix()}")
    objects = {
        o.key[len(folder) :]: o
        for o in store.list(folder, delimiter=False).objects
        if not o.key.endswith("/")  # folder markers some tools write
    }
    report = VerifyReport(
        str(url), len(manifest["files"]), checkpoint=manifest.get("checkpoint") or {}
    )
    with tempfile.TemporaryDirectory(prefix="ckpt-exporter-verify-") as tmp:
        local = Path(tmp) / "object"

        def digest(rel: str) -> str:
            # Downloaded to disk and hashed in chunks: a large variables shard
            # is never held in memory whole. One file at a time.
            store.download(objects[rel].key, local)
            try:
                return sha256_file(local)[0]
            finally:
                local.unlink(missing_ok=True)

        _compare(report, manifest["files"], {rel: o.size for rel, o in objects.items()}, digest)
    return report


def verify_version(location: Location, *, store: ObjectStore | None = None) -> VerifyReport:
    """Re-hash every file the manifest of the version at ``location`` lists; report differences.

    ``location`` is a local version folder or a version's prefix in a bucket
    (``s3://bucket/models/m/7``; ``store`` overrides the client
    :func:`~daemon.objectstore.clients.client_for` picks). Reports files
    changed (size or SHA-256), missing, and present but not listed.
    Raises :class:`ManifestError` when there is no manifest or it is not
    one this daemon reads (or a local ``location`` is not a folder),
    ``OSError`` (:class:`~daemon.objectstore.client.ObjectStoreError` on a
    store) when the version cannot be read.
    """
    if isinstance(location, Path):
        return _verify_local(location)
    return _verify_remote(location, store)
