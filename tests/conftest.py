"""Shared helpers for the end-to-end tests: real trainers, real daemons, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists or is a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def niceness(pid: int) -> int:
    """The nice value of ``pid`` from /proc (field 19; the name, field 2, may hold spaces)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def child_env() -> dict[str, str]:
    env = dict(os.environ, **QUIET_TF)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``ckpt-exporter ARGS...`` (as ``python -m daemon``), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_script(script: str, *args: str) -> None:
    """Run a Python snippet with real TensorFlow in a subprocess (``sys.argv[1:]`` = ``args``)."""
    r = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def train(
    ckpt_dir: Path,
    checkpoints: int,
    *,
    seed: int = 0,
    interval: float = 0.0,
    max_to_keep: int = 10,
    wait: bool = True,
) -> subprocess.Popen[bytes]:
    """Run the demo trainer: a real Keras model saved with tf.train.CheckpointManager."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.demo.trainer",
            str(ckpt_dir),
            "--checkpoints",
            str(checkpoints),
            "--steps-per-checkpoint",
            "5",
            "--interval",
            str(interval),
            "--max-to-keep",
            str(max_to_keep),
            "--seed",
            str(seed),
        ],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode(errors="replace")
    return proc


def write_config(
    tmp: Path,
    *,
    builder: str = "daemon.demo.model:build_model",
    python_path: list[str] | None = None,
    daemon: dict[str, Any] | None = None,
    **model: Any,
) -> Path:
    """A config for one model named "m" under ``tmp``; keyword args override model keys.

    ``daemon`` adds or overrides ``[daemon]`` keys.
    """
    keys: dict[str, Any] = {
        "name": "m",
        "checkpoint_dir": str(tmp / "ckpts"),
        "base_path": str(tmp / "serving" / "m"),
        "builder": builder,
        "export_policy": "all",
        "keep_versions": 10,
    }
    if python_path is not None:
        keys["python_path"] = python_path
    keys.update(model)
    daemon_keys: dict[str, Any] = {
        "metrics_address": "127.0.0.1:0",
        "log_format": "json",
        "rescan_interval_seconds": 1,
        "retry_backoff_seconds": 1,
    }
    daemon_keys.update(daemon or {})
    lines = ["[daemon]"] + [f"{k} = {_toml(v)}" for k, v in daemon_keys.items()]
    lines += ["", "[[models]]"] + [f"{k} = {_toml(v)}" for k, v in keys.items()]
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    """A TOML value: JSON's spelling, except tables (inline: ``{ "k" = v }``)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


class Daemon:
    """``ckpt-exporter run`` as a real subprocess, with its JSON log readable."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config)],
            env=child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def wait_for(
        self,
        pred: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 120,
        what: str = "condition",
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.events()
            if pred(ev):
                return ev
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) waiting for {what}:"
                    f"\n{self.log_path.read_text()[-4000:]}"
                )
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log_path.read_text()[-4000:]}")

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code


@pytest.fixture
def daemons() -> Iterator[Callable[[Path, Path], Daemon]]:
    """Start daemons; any still running at the end of the test is killed."""
    started: list[Daemon] = []

    def start(config: Path, log_path: Path) -> Daemon:
        d = Daemon(config, log_path)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def version_dirs(base: Path) -> dict[int, Path]:
    from daemon.basepath.catalog import scan_base_path

    return {e.version: base / e.name for e in scan_base_path(base) if e.is_dir}


def mapped_export(out: Path, prefix: Path, code_files: dict[str, list[int]] | None = None) -> Path:
    """The demo model restored from checkpoint ``prefix``, exported to ``out`` with its weights map.

    Restored as the worker restores, written by Keras' ``model.export()``
    (which saves each variable twice, under ``variables`` and
    ``_all_variables``: 8 in all), mapped by
    :func:`daemon.children.incremental.record_weights_map`, in this process.
    """
    import tensorflow as tf

    from daemon.children import incremental
    from daemon.demo.model import build_model

    model = build_model()
    status = tf.train.Checkpoint(model=model).read(str(prefix))
    status.assert_existing_objects_matched()
    model.export(str(out), verbose=False)
    restored = incremental.restored_from(status, str(prefix))
    assert len(restored) == 4, restored  # two kernels, two biases
    why_not = incremental.record_weights_map(
        str(out), restored, str(prefix), "model", code_files or {}
    )
    assert why_not is None, why_not
    return out


# -- object stores: real servers on 127.0.0.1 (tests/objectstores.py) --------

#: The bucket the session's servers start with.
OBJECT_STORE_BUCKET = "ckpt-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """moto's S3 on 127.0.0.1 with bucket ``ckpt-test``, stopped at the end of the session."""
    from objectstores import S3Server, create_bucket

    server = S3Server(tmp_path_factory.mktemp("moto")).start()
    try:
        create_bucket("s3", server.url, OBJECT_STORE_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """fake-gcs-server on 127.0.0.1 with bucket ``ckpt-test``, stopped at the end of the session."""
    from objectstores import GCSServer, create_bucket

    server = GCSServer(tmp_path_factory.mktemp("fake-gcs")).start()
    try:
        create_bucket("gs", server.url, OBJECT_STORE_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["s3", "gs"])
def object_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``(store, bucket, url)``: a client of each backend and a fresh, empty prefix.

    The endpoint variables (``AWS_ENDPOINT_URL_S3`` with dummy credentials,
    or ``STORAGE_EMULATOR_HOST``) are set for this test only, so a client a
    test builds itself (``S3Store(bucket)``, ``GCSStore(bucket)``) reaches
    the same server; the client cache is emptied before and after.
    """
    import uuid

    from objectstores import DUMMY_AWS_ENV

    from daemon.objectstore.clients import client_for, reset_clients
    from daemon.objectstore.url import ObjectURL

    scheme = str(request.param)
    if scheme == "s3":
        server = request.getfixturevalue("s3_server")
        for name, value in DUMMY_AWS_ENV.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.url)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    else:
        server = request.getfixturevalue("gcs_server")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    url = ObjectURL(scheme, OBJECT_STORE_BUCKET, f"t-{uuid.uuid4().hex[:12]}")
    reset_clients()
    try:
        yield client_for(url), OBJECT_STORE_BUCKET, url
    finally:
        reset_clients()
