"""The whole daemon on object stores: checkpoints on gs:// or disk, versions on s3:// or gs://.

Real servers on 127.0.0.1 (moto's S3, fake-gcs-server), a real
``ckpt-exporter run`` process, real ``tf.train.CheckpointManager``
checkpoints of the demo model. TensorFlow's own GCS filesystem cannot be
pointed at a local server, so the trainer writes each checkpoint to local
disk and the test uploads its objects the way TensorFlow writes them to a
bucket (each file one object, the data shards first, then the ``.index``,
then the ``checkpoint`` state file), while the daemon runs.

Every version is then downloaded as a downloader would and loaded in a
fresh TensorFlow process, which answers like the model restored from its
checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import OBJECT_STORE_BUCKET, Daemon, child_env, train, write_config
from objectstores import DUMMY_AWS_ENV

from daemon.basepath.layout import METADATA_RELPATH
from daemon.objectstore.client import ObjectStore
from daemon.objectstore.clients import client_for, reset_clients
from daemon.objectstore.url import ObjectURL

pytestmark = [pytest.mark.objectstore, pytest.mark.e2e]

#: Loads a SavedModel and the demo model restored from a checkpoint; prints
#: the largest difference of their outputs on a fixed batch.
_COMPARE = r"""
import json, sys
import numpy as np
import tensorflow as tf
from daemon.demo.model import build_model
saved, prefix = sys.argv[1], sys.argv[2]
loaded = tf.saved_model.load(saved)
fn = loaded.signatures["serving_default"]
(name, spec), = fn.structured_input_signature[1].items()
shape = [2 if d is None else d for d in spec.shape]
x = np.random.default_rng(0).normal(size=shape).astype(spec.dtype.as_numpy_dtype)
served = list(fn(**{name: tf.constant(x)}).values())[0].numpy()
model = build_model()
tf.train.Checkpoint(model=model).read(prefix).expect_partial()
direct = model(x).numpy()
print(json.dumps({"max_diff": float(np.max(np.abs(served - direct)))}))
"""


SECRET = f"secret-{uuid.uuid4().hex}"


@pytest.fixture
def stores(
    s3_server: Any, gcs_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[None]:
    """Both servers reachable through the clients' standard variables, here and in children."""
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    # A secret no file could contain by chance, to look for it in what the daemon wrote.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.url)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    monkeypatch.setenv("CKPT_EXPORTER_SCRATCH_DIR", str(tmp_path / "scratch"))
    reset_clients()
    yield
    reset_clients()


def _url(scheme: str, *parts: str) -> ObjectURL:
    return ObjectURL(scheme, OBJECT_STORE_BUCKET, "/".join(parts))


def upload_checkpoint(local: Path, prefix: str, dest: ObjectURL) -> None:
    """Upload checkpoint ``prefix`` of folder ``local`` in the order TensorFlow writes it."""
    store = client_for(dest)
    shards = sorted(local.glob(f"{prefix}.data-*"))
    for f in [*shards, local / f"{prefix}.index", local / "checkpoint"]:
        store.upload(dest.key(f.name), f)


def committed_versions(store: ObjectStore, base: ObjectURL) -> dict[int, dict[str, Any]]:
    """Versions under ``base`` whose commit record exists, with that record."""
    out = {}
    for folder in store.list(base.folder_key()).folders:
        name = base.name_of(folder).rstrip("/")
        if not name.isdigit():
            continue
        key = base.key(f"{name}/{METADATA_RELPATH.as_posix()}")
        if store.head(key) is not None:
            out[int(name)] = json.loads(store.get(key))
    return out


def download_version(store: ObjectStore, base: ObjectURL, version: int, dest: Path) -> Path:
    """Every object of a version, as an S3 downloader (list the prefix, fetch each) gets it."""
    folder = base.key(str(version)) + "/"
    for info in store.list(folder, delimiter=False).objects:
        path = dest / info.key[len(folder) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        store.download(info.key, path)
    return dest


def answers_like_its_checkpoint(saved: Path, prefix: Path) -> float:
    r = subprocess.run(
        [sys.executable, "-c", _COMPARE, str(saved), str(prefix)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    diff = float(json.loads(r.stdout.strip().splitlines()[-1])["max_diff"])
    return diff


def _run(
    tmp_path: Path,
    checkpoint_dir: str,
    base: ObjectURL,
    upload_to: ObjectURL | None,
    n: int,
) -> tuple[Daemon, dict[int, dict[str, Any]], Path]:
    """Train ``n`` checkpoints, feed them to a running daemon one by one, wait for each version."""
    local = tmp_path / "ckpts"
    train(local, n, interval=0.0)
    # The trainer ran ahead; hide its state file until each checkpoint is "written".
    config = write_config(
        tmp_path,
        checkpoint_dir=checkpoint_dir,
        base_path=str(base),
        daemon={"object_store_poll_seconds": 0.5},
    )
    daemon = Daemon(config, tmp_path / "daemon.log")
    store = client_for(base)
    try:
        # The demo trainer saves every 5 steps, named by its step.
        for i, step in enumerate(range(5, 5 * n + 1, 5), start=1):
            if upload_to is not None:
                upload_checkpoint(local, f"ckpt-{step}", upload_to)
            daemon.wait_for(
                lambda _ev, want=i: len(committed_versions(store, base)) >= want,
                timeout=180,
                what=f"version {step} committed",
            )
    except BaseException:
        daemon.stop()
        raise
    return daemon, committed_versions(store, base), local


def _check_versions(
    store: ObjectStore, base: ObjectURL, versions: dict[int, dict[str, Any]], local: Path, tmp: Path
) -> None:
    for version, meta in sorted(versions.items()):
        assert meta["version"] == version
        saved = download_version(store, base, version, tmp / "downloaded" / str(version))
        assert (saved / "saved_model.pb").is_file()
        assert any((saved / "variables").glob("variables.data-*"))
        name = meta["checkpoint"]["prefix"].rsplit("/", 1)[-1]
        assert answers_like_its_checkpoint(saved, local / name) < 1e-5, (version, name)


def test_a_trainer_on_gcs_publishes_every_checkpoint_to_s3(tmp_path: Path, stores: None) -> None:
    run = uuid.uuid4().hex[:8]
    ckpts = _url("gs", run, "run")
    base = _url("s3", run, "models", "m")
    daemon, versions, local = _run(tmp_path, str(ckpts), base, ckpts, 3)
    try:
        assert sorted(versions) == [1, 2, 3]
        prefixes = [versions[v]["checkpoint"]["prefix"] for v in (1, 2, 3)]
        assert prefixes == [str(ckpts / f"ckpt-{s}") for s in (5, 10, 15)]
        _check_versions(client_for(base), base, versions, local, tmp_path)
        events = daemon.events()
        fetched = [e for e in events if e.get("event") == "export_started"]
        assert [e["pinned_by"] for e in fetched][:1] == ["fetch"]
        # After the first export the weights map is known: only its tensors
        # (and small ones) are fetched.
        assert [e["pinned_by"] for e in fetched[1:]] == ["fetch-ranges", "fetch-ranges"]
        assert all(e.get("downloaded_bytes", 0) > 0 for e in fetched)
    finally:
        assert daemon.stop() == 0
    # Nothing the daemon wrote holds the credentials it used.
    for info in client_for(base).list(base.folder_key(), delimiter=False).objects:
        body = client_for(base).get(info.key)
        assert SECRET.encode() not in body, info.key


def test_a_local_trainer_publishes_to_gcs(tmp_path: Path, stores: None) -> None:
    base = _url("gs", uuid.uuid4().hex[:8], "models", "m")
    started = time.monotonic()
    daemon, versions, local = _run(tmp_path, str(tmp_path / "ckpts"), base, None, 2)
    try:
        assert sorted(versions) == [1, 2], time.monotonic() - started
        _check_versions(client_for(base), base, versions, local, tmp_path)
        # A version's objects never include directory markers (keys ending in /).
        keys = [o.key for o in client_for(base).list(base.folder_key(), delimiter=False).objects]
        assert not [k for k in keys if k.endswith("/")]
        assert os.path.isdir(tmp_path / "scratch")
    finally:
        assert daemon.stop() == 0
    _operator_commands_on_a_remote_base_path(tmp_path / "config.toml", base)


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "daemon", *args, "--config", str(config)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _operator_commands_on_a_remote_base_path(config: Path, base: ObjectURL) -> None:
    """``status``, ``pin`` and ``rollback`` read and change a base path on a bucket."""
    store = client_for(base)
    (row,) = json.loads(_cli(config, "status", "--json").stdout)
    assert (row["base_path"], row["newest_version"], row["versions_on_disk"]) == (str(base), 2, 2)
    assert row["newest_version_bytes"] > 0
    _cli(config, "pin", "1")
    assert json.loads(store.get(base.key(".ckpt-exporter/pins.json"))) == [1]
    out = _cli(config, "rollback").stdout
    assert "rolled back to version 1" in out
    # Version 2 left the server's sight whole: kept under the state folder, not deleted.
    assert sorted(committed_versions(store, base)) == [1]
    kept = store.list(base.key(".ckpt-exporter/rolled-back") + "/", delimiter=False).objects
    assert any(o.key.endswith("/saved_model.pb") for o in kept)
    (row,) = json.loads(_cli(config, "status", "--json").stdout)
    assert (row["newest_version"], row["rolled_back"], row["pinned"]) == (1, 1, [1])
