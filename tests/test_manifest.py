"""The provenance manifest (:mod:`daemon.basepath.manifest`) and ``ckpt-exporter verify``.

Versions are published by the daemon's own publish step
(:meth:`daemon.supervisor.publishing.Publisher.publish`) from a small
SavedModel-shaped export (no TensorFlow: the files' bytes are what is
hashed), into a local base path or a bucket (the ``object_store`` fixture:
moto's S3 and fake-gcs-server on 127.0.0.1). The builder lives in a real
temporary git repository, so the recorded commit and dirtiness are git's
own answers. Verification is driven through the real command line
(:func:`daemon.cli.main`), exit codes included.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon import __version__, cli
from daemon.basepath.layout import MANIFEST_RELPATH, METADATA_RELPATH
from daemon.basepath.manifest import (
    CHUNK_BYTES,
    ManifestError,
    builder_provenance,
    config_sha256,
    git_provenance,
    sha256_file,
    verify_version,
)
from daemon.basepath.publish import new_temp_dir
from daemon.config.loading import parse_config
from daemon.objectstore.client import Listing, ObjectInfo, ObjectStore
from daemon.objectstore.url import Location, ObjectURL
from daemon.sources.base import Checkpoint
from daemon.supervisor import Supervisor
from daemon.supervisor.publishing import Published
from daemon.supervisor.state import Job

MANIFEST = MANIFEST_RELPATH.as_posix()
COMMIT = METADATA_RELPATH.as_posix()
DATA_SHARD = "variables/variables.data-00000-of-00001"
GIT_ID = ["-c", "user.name=ckpt-test", "-c", "user.email=ckpt-test@example.invalid"]


# --- helpers -----------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    r = subprocess.run(
        ["git", *GIT_ID, "-C", str(repo), *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=30,
    )
    return r.stdout


@pytest.fixture
def builder_repo(tmp_path: Path) -> Path:
    """A git checkout with one commit holding the builder module and a helper it imports."""
    repo = tmp_path / "trainer-code"
    repo.mkdir()
    (repo / "mybuilder.py").write_text("import helper\n\ndef build():\n    return helper.model()\n")
    (repo / "helper.py").write_text("def model():\n    return None\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "builder")
    return repo


def supervisor(tmp_path: Path, base_path: str, repo: Path) -> Supervisor:
    data = {
        "daemon": {"metrics_address": ""},
        "models": [
            {
                "name": "m",
                "checkpoint_dir": str(tmp_path / "ckpts"),
                "base_path": base_path,
                "builder": "mybuilder:build",
                "python_path": [str(repo)],
                "keep_versions": 10,
            }
        ],
    }
    return Supervisor(parse_config(data, "test", tmp_path), structlog.get_logger())


def fill_export(export: Path) -> None:
    """A SavedModel-shaped export as the worker and validator leave it (bytes only)."""
    (export / "variables").mkdir()
    (export / "assets.extra").mkdir()
    (export / "saved_model.pb").write_bytes(b"graph" * 100)
    (export / "fingerprint.pb").write_bytes(b"fp")
    (export / "variables" / "variables.index").write_bytes(b"index" * 10)
    (export / DATA_SHARD).write_bytes(bytes(range(256)) * 64)
    (export / "assets.extra" / "ckpt_exporter_validation.json").write_text('{"ok": true}')


def job_for(sup: Supervisor, repo: Path, *, gate_value: float | None = 0.25) -> Job:
    """A job whose export is complete and validated: what the pipeline hands the publisher."""
    st = sup.models["m"]
    ckpt = Checkpoint(
        prefix=Path("/ckpts/ckpt-1200"),
        step=1200,
        files=(),
        written_ns=1,
        fingerprint="fp-1200",
    )
    job = Job(model=st, ckpt=ckpt)
    job.temp_dir = new_temp_dir(st.cfg.base_path)
    fill_export(job.temp_dir)
    job.export_result = {
        "ok": True,
        "kind": "keras",
        "variables": 2,
        "saved_counters": {},
        "durations": {},
        # What the worker reports: the builder's modules and one of the standard library.
        "code_files": {
            str(repo / "mybuilder.py"): [1, 1],
            str(repo / "helper.py"): [1, 1],
            json.__file__: [1, 1],
        },
    }
    job.validation = {
        "ok": True,
        "saved_model": str(job.temp_dir),
        "signatures": {},
        "checks": [],
        "durations": {},
    }
    if gate_value is not None:
        job.gate["metric"] = {
            "metric": "val_loss",
            "value": gate_value,
            "mode": "min",
            "better_than": None,
        }
    return job


def publish(sup: Supervisor, repo: Path) -> Published:
    outcome = sup.publisher.publish(job_for(sup, repo))
    assert isinstance(outcome, Published), outcome
    return outcome


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_verify(
    capsys: pytest.CaptureFixture[str], location: Location | str, *extra: str
) -> tuple[int, str, str]:
    code = cli.main(["verify", str(location), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def verify_json(capsys: pytest.CaptureFixture[str], location: Location) -> tuple[int, Any]:
    code, out, _ = run_verify(capsys, location, "--json")
    return code, json.loads(out)


# --- the manifest a publish writes ---------------------------------------------------------


def test_publish_writes_a_manifest_of_every_file_and_the_provenance(
    tmp_path: Path, builder_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sup = supervisor(tmp_path, str(tmp_path / "serving" / "m"), builder_repo)
    version = publish(sup, builder_repo)
    assert isinstance(version.path, Path)
    manifest = json.loads((version.path / MANIFEST_RELPATH).read_text())

    # Every file of the version as published, but itself and the commit record
    # (written by the storage after it, with the version number).
    on_disk = {
        p.relative_to(version.path).as_posix(): p.read_bytes()
        for p in version.path.rglob("*")
        if p.is_file()
    }
    assert COMMIT in on_disk and MANIFEST in on_disk
    assert manifest["files"] == {
        rel: {"sha256": sha256(data), "bytes": len(data)}
        for rel, data in on_disk.items()
        if rel not in (COMMIT, MANIFEST)
    }
    assert DATA_SHARD in manifest["files"]
    assert "assets.extra/ckpt_exporter_validation.json" in manifest["files"]
    assert sorted(manifest["not_listed"]) == sorted([COMMIT, MANIFEST])

    assert manifest["checkpoint"] == {
        "fingerprint": "fp-1200",
        "step": 1200,
        "prefix": "/ckpts/ckpt-1200",
    }
    builder = manifest["builder"]
    assert builder["spec"] == "mybuilder:build"
    assert builder["file"] == str(builder_repo / "mybuilder.py")
    # The builder's own module and what it imported, not the standard library's files.
    assert builder["files"] == {
        str(builder_repo / name): {
            "sha256": sha256((builder_repo / name).read_bytes()),
            "bytes": (builder_repo / name).stat().st_size,
        }
        for name in ("helper.py", "mybuilder.py")
    }
    assert builder["git"] == {
        "commit": git(builder_repo, "rev-parse", "HEAD").strip(),
        "dirty": False,
    }

    cfg = sup.models["m"].cfg
    assert manifest["config_sha256"] == config_sha256(cfg)
    assert manifest["libraries"]["ckpt-exporter"] == __version__
    assert "tensorflow" in manifest["libraries"] or "tensorflow-cpu" in manifest["libraries"]
    assert manifest["gate"] == {"metric": "val_loss", "value": 0.25}
    # The commit record still says what it always said.
    meta = json.loads((version.path / METADATA_RELPATH).read_text())
    assert meta["version"] == version.version == 1

    code, out, err = run_verify(capsys, version.path)
    assert code == 0, out + err
    assert "intact" in out and "ckpt-1200" in out


def test_no_gate_no_builder_file_and_the_config_digest(tmp_path: Path, builder_repo: Path) -> None:
    sup = supervisor(tmp_path, str(tmp_path / "serving" / "m"), builder_repo)
    outcome = sup.publisher.publish(job_for(sup, builder_repo, gate_value=None))
    assert isinstance(outcome, Published) and isinstance(outcome.path, Path)
    manifest = json.loads((outcome.path / MANIFEST_RELPATH).read_text())
    assert manifest["gate"] is None
    assert builder_provenance("", None, ["/x.py"]) is None  # formats without a builder

    # The digest covers what shapes the export, not where the model lives.
    cfg = sup.models["m"].cfg
    other_place = supervisor(tmp_path / "elsewhere", str(tmp_path / "b2"), builder_repo)
    assert config_sha256(other_place.models["m"].cfg) == config_sha256(cfg)
    changed = parse_config(
        {
            "daemon": {"metrics_address": ""},
            "models": [
                {
                    "name": "m",
                    "checkpoint_dir": str(tmp_path / "ckpts"),
                    "base_path": str(tmp_path / "serving" / "m"),
                    "builder": "mybuilder:build",
                    "python_path": [str(builder_repo)],
                    "input_type": "tf_example",
                }
            ],
        },
        "test",
        tmp_path,
    )
    assert config_sha256(changed.models[0]) != config_sha256(cfg)


# --- git provenance ----------------------------------------------------------------------


def test_git_provenance_of_a_clean_and_a_dirty_checkout(builder_repo: Path, tmp_path: Path) -> None:
    head = git(builder_repo, "rev-parse", "HEAD").strip()
    assert git_provenance(builder_repo) == {"commit": head, "dirty": False}
    # Bytecode next to the module (the worker imported it) is ignored by the checkout.
    (builder_repo / "__pycache__").mkdir()
    (builder_repo / "__pycache__" / "mybuilder.cpython-311.pyc").write_bytes(b"x")
    assert git_provenance(builder_repo) == {"commit": head, "dirty": False}

    (builder_repo / "mybuilder.py").write_text("def build():\n    return 2\n")  # uncommitted edit
    assert git_provenance(builder_repo) == {"commit": head, "dirty": True}
    prov = builder_provenance("mybuilder:build", builder_repo / "mybuilder.py")
    assert prov is not None and prov["git"] == {"commit": head, "dirty": True}
    assert prov["files"][str(builder_repo / "mybuilder.py")]["sha256"] == sha256(
        b"def build():\n    return 2\n"
    )

    git(builder_repo, "commit", "-q", "-am", "edit")
    new_head = git(builder_repo, "rev-parse", "HEAD").strip()
    assert new_head != head
    assert git_provenance(builder_repo) == {"commit": new_head, "dirty": False}
    (builder_repo / "new_module.py").write_text("")  # untracked: the checkout is not what HEAD says
    assert git_provenance(builder_repo) == {"commit": new_head, "dirty": True}


def test_git_provenance_is_null_outside_a_checkout_and_without_git(
    builder_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_provenance(plain) is None
    assert git_provenance(tmp_path / "does-not-exist") is None
    empty = tmp_path / "no-commit-yet"
    empty.mkdir()
    git(empty, "init", "-q")
    assert git_provenance(empty) is None
    # A GIT_DIR in the daemon's environment does not redirect the question.
    monkeypatch.setenv("GIT_DIR", str(builder_repo / ".git"))
    assert git_provenance(plain) is None
    # No git installed: null, never an error.
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert git_provenance(builder_repo) is None
    prov = builder_provenance("mybuilder:build", builder_repo / "mybuilder.py")
    assert prov is not None and prov["git"] is None


def test_a_slow_git_gives_null_within_the_timeout(
    builder_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slow = bin_dir / "git"
    slow.write_text(f"#!/bin/sh\nexec {sleep} 30\n")
    slow.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    started = time.monotonic()
    assert git_provenance(builder_repo, timeout=0.5) is None
    assert time.monotonic() - started < 5  # killed at the timeout, not waited for


# --- verify on a local version ----------------------------------------------------------------


def test_verify_catches_a_flipped_byte_a_missing_file_and_an_extra_file(
    tmp_path: Path, builder_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sup = supervisor(tmp_path, str(tmp_path / "serving" / "m"), builder_repo)
    path = publish(sup, builder_repo).path
    assert isinstance(path, Path)
    assert verify_json(capsys, path) == (
        0,
        {
            "location": str(path),
            "intact": True,
            "listed": 5,
            "changed": [],
            "missing": [],
            "unlisted": [],
            "commit_record": True,
            "checkpoint": {"fingerprint": "fp-1200", "step": 1200, "prefix": "/ckpts/ckpt-1200"},
        },
    )

    shard = path / DATA_SHARD
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[1000] ^= 0x01  # one bit of one byte: the size stays
    shard.write_bytes(bytes(flipped))
    code, report = verify_json(capsys, path)
    assert code == cli.NOT_INTACT == 65
    assert report["intact"] is False
    assert report["changed"] == [
        {
            "path": DATA_SHARD,
            "expected_sha256": sha256(original),
            "expected_bytes": len(original),
            "found_sha256": sha256(bytes(flipped)),
            "found_bytes": len(original),
        }
    ]
    assert report["missing"] == [] and report["unlisted"] == []
    code, out, _ = run_verify(capsys, path)
    assert code == 65
    assert f"changed: {DATA_SHARD}" in out and "NOT INTACT: 1 changed, 0 missing" in out
    shard.write_bytes(original)
    assert run_verify(capsys, path)[0] == 0

    (path / "variables" / "variables.index").unlink()
    code, report = verify_json(capsys, path)
    assert code == 65
    assert report["missing"] == ["variables/variables.index"] and report["changed"] == []

    (path / "variables" / "variables.index").write_bytes(b"index" * 10)
    (path / "assets").mkdir()
    (path / "assets" / "vocab.txt").write_text("added later")
    code, report = verify_json(capsys, path)
    assert code == 65
    assert report["unlisted"] == ["assets/vocab.txt"]
    assert report["changed"] == [] and report["missing"] == []
    code, out, _ = run_verify(capsys, path)
    assert "not listed: assets/vocab.txt" in out


def test_verify_without_a_manifest_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "base" / "3"
    (old / "variables").mkdir(parents=True)
    (old / "saved_model.pb").write_bytes(b"g")
    code, out, err = run_verify(capsys, old)
    assert code == cli.REFUSED == 1 and out == ""
    assert f"has no {MANIFEST}" in err and "before" in err and "Traceback" not in err
    code, _, err = run_verify(capsys, tmp_path / "nowhere")
    assert code == 1 and "not a folder" in err
    code, _, err = run_verify(capsys, "s3://Bad_Bucket/x")
    assert code == 1 and "not a valid bucket name" in err


def test_a_manifest_that_is_not_ours_or_points_outside_is_refused(tmp_path: Path) -> None:
    version = tmp_path / "7"
    (version / "assets.extra").mkdir(parents=True)
    (version / MANIFEST_RELPATH).write_text("{not json")
    with pytest.raises(ManifestError, match="not a JSON manifest"):
        verify_version(version)
    (version / MANIFEST_RELPATH).write_text(json.dumps({"tool": "other", "files": {}}))
    with pytest.raises(ManifestError, match="not a ckpt-exporter manifest"):
        verify_version(version)
    outside = {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}
    (version / MANIFEST_RELPATH).write_text(
        json.dumps({"tool": "ckpt-exporter", "format": 1, "files": outside})
    )
    with pytest.raises(ManifestError, match="not a relative path"):
        verify_version(version)


def test_files_are_hashed_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * CHUNK_BYTES + 17)
    big = tmp_path / "big"
    big.write_bytes(data)
    reads: list[int] = []
    real_open = Path.open

    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def read(self, n: int = -1) -> bytes:
            reads.append(n)
            chunk: bytes = self.inner.read(n)
            return chunk

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Counting(real_open(self, *a, **k)))
    assert sha256_file(big) == (sha256(data), len(data))
    assert reads and all(n == CHUNK_BYTES for n in reads)


# --- verify on a version in a bucket ----------------------------------------------------


class Recording:
    """The real client, recording which keys were read whole (``get``) or downloaded."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.gets: list[str] = []
        self.downloads: list[str] = []

    @property
    def scheme(self) -> str:
        return self.inner.scheme

    @property
    def bucket(self) -> str:
        return self.inner.bucket

    def list(self, prefix: str, *, delimiter: bool = True, start_after: str = "") -> Listing:
        return self.inner.list(prefix, delimiter=delimiter, start_after=start_after)

    def head(self, key: str) -> ObjectInfo | None:
        return self.inner.head(key)

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.inner.get_range(key, start, length)

    def download(self, key: str, dest: Path) -> int:
        self.downloads.append(key)
        return self.inner.download(key, dest)

    def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_token: str | None = None
    ) -> ObjectInfo:
        return self.inner.put(key, data, if_absent=if_absent, if_token=if_token)

    def upload(self, key: str, source: Path, *, if_absent: bool = False) -> ObjectInfo:
        return self.inner.upload(key, source, if_absent=if_absent)

    def verify(self, key: str, source: Path) -> None:
        self.inner.verify(key, source)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def copy(self, source_key: str, dest_key: str) -> None:
        self.inner.copy(source_key, dest_key)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The object-store backend's local folders go under the test's tmp_path."""
    path = tmp_path / "scratch"
    monkeypatch.setenv("CKPT_EXPORTER_SCRATCH_DIR", str(path))
    yield path


@pytest.mark.objectstore
def test_verify_a_version_in_a_bucket_and_a_flipped_object(
    object_store: tuple[ObjectStore, str, ObjectURL],
    scratch: Path,
    tmp_path: Path,
    builder_repo: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, _, url = object_store
    sup = supervisor(tmp_path, str(url), builder_repo)
    published = publish(sup, builder_repo)
    version = published.path
    assert isinstance(version, ObjectURL) and version == url / "1"
    manifest = json.loads(store.get(version.key(MANIFEST)))
    assert manifest["checkpoint"]["fingerprint"] == "fp-1200"
    assert DATA_SHARD in manifest["files"] and COMMIT not in manifest["files"]
    assert manifest["builder"]["git"]["dirty"] is False

    # Every listed object downloaded and hashed from disk; only the manifest read whole.
    recording = Recording(store)
    report = verify_version(version, store=recording)
    assert report.intact and report.commit_record and report.listed == len(manifest["files"])
    assert recording.gets == [version.key(MANIFEST)]
    assert sorted(recording.downloads) == sorted(version.key(rel) for rel in manifest["files"])
    code, out, err = run_verify(capsys, version)
    assert code == 0, out + err

    # Another writer replaces one object with one flipped byte.
    key = version.key(DATA_SHARD)
    original = store.get(key)
    flipped = bytearray(original)
    flipped[5] ^= 0xFF
    store.put(key, bytes(flipped))
    code, report_json = verify_json(capsys, version)
    assert code == 65
    assert [c["path"] for c in report_json["changed"]] == [DATA_SHARD]
    assert report_json["changed"][0]["found_sha256"] == sha256(bytes(flipped))

    # A missing object and an extra one.
    store.put(key, original)
    store.delete(version.key("fingerprint.pb"))
    store.put(version.key("assets/extra.txt"), b"late")
    code, report_json = verify_json(capsys, version)
    assert code == 65
    assert report_json["changed"] == []
    assert report_json["missing"] == ["fingerprint.pb"]
    assert report_json["unlisted"] == ["assets/extra.txt"]

    # A prefix that is no version of ours.
    code, _, err = run_verify(capsys, url / "99")
    assert code == 1 and f"has no {MANIFEST}" in err
