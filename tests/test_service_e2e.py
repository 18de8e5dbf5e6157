"""The service with real exports: grace period, reload mid-export, Prometheus, health.

These run TensorFlow in the worker and validator, so they are marked e2e.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, child_env, train, version_dirs, write_config

pytestmark = pytest.mark.e2e
BUILDERS = str(Path(__file__).parent / "builders")


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _port(d: Daemon) -> int:
    ev = d.wait_for(lambda ev: any(e["event"] == "metrics_listening" for e in ev))
    address = next(e["address"] for e in ev if e["event"] == "metrics_listening")
    return int(address.rsplit(":", 1)[1])


def _event(d: Daemon, name: str) -> dict[str, Any]:
    return next(e for e in reversed(d.events()) if e["event"] == name)


def test_reload_and_sigterm_during_an_export_let_it_finish_and_publish(
    tmp_path: Path, daemons: Any
) -> None:
    train(tmp_path / "ckpts", 1)
    config = write_config(tmp_path, builder="models_for_tests:slowish", python_path=[BUILDERS])
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    d.wait_for(lambda ev: any(e["event"] == "export_started" for e in ev), what="export start")

    # Change the exporting model and add another one while the export runs.
    text = config.read_text().replace("keep_versions = 10", "keep_versions = 4")
    text += '\n[[models]]\nname = "n"\ncheckpoint_dir = "later"\nbase_path = "serving/n"\n'
    text += 'builder = "daemon.demo.model:build_model"\n'
    config.write_text(text)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda ev: any(e["event"] == "reloaded" for e in ev), what="reload")
    reloaded = _event(d, "reloaded")
    assert (reloaded["added"], reloaded["changed"], reloaded["deferred"]) == (["n"], ["m"], ["m"])

    # Stop: no new work, but the running export may finish within the grace period.
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=120) == 0
    base = tmp_path / "serving" / "m"
    assert sorted(version_dirs(base)) == [1]
    assert d.count("published") == 1 and d.count("export_abandoned") == 0
    assert _event(d, "stop_requested")["grace_seconds"] == 60
    assert not list(base.glob(".ckpt-exporter-tmp-*"))
    assert (tmp_path / "serving" / "n").is_dir()  # the added model was set up


def test_a_model_failing_every_export_turns_healthz_503(tmp_path: Path, daemons: Any) -> None:
    train(tmp_path / "ckpts", 1)
    config = write_config(
        tmp_path,
        builder="models_for_tests:raises",
        python_path=[BUILDERS],
        daemon={"health_failing_seconds": 1},
    )
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    port = _port(d)
    assert _get(port, "/healthz")[0] == 200
    # A builder that raises pauses the model: failing, and /healthz says so.
    d.wait_for(lambda ev: any(e["event"] == "model_paused" for e in ev), what="the pause")
    deadline = time.monotonic() + 30
    while (status := _get(port, "/healthz"))[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status[0] == 503, status
    body = json.loads(status[1])
    assert body["problems"][0]["problem"] == "exports_failing"
    assert body["problems"][0]["model"] == "m"
    _, metrics = _get(port, "/metrics")
    assert (
        b'ckpt_exporter_export_failures_total{model="m",phase="export",reason="builder_error"} 1.0'
        in metrics
    )
    assert d.stop() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """Start Debian's Prometheus on loopback scraping the given port every second."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (Debian package 'prometheus'; .ci/run installs it)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> int:
        port = _free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: ckpt-exporter\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return port

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            data = json.loads(r.read())
    except (urllib.error.URLError, ConnectionError):
        return []
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def test_prometheus_scrapes_the_published_version(
    tmp_path: Path, daemons: Any, prometheus: Any
) -> None:
    train(tmp_path / "ckpts", 2)
    d: Daemon = daemons(write_config(tmp_path), tmp_path / "daemon.log")
    daemon_port = _port(d)
    d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 2, what="2 versions")
    newest = max(version_dirs(tmp_path / "serving" / "m"))

    # The exposition after real exports still passes promtool without a warning.
    _, body = _get(daemon_port, "/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout + check.stderr
    )

    prom_port = prometheus(daemon_port)
    deadline = time.monotonic() + 60
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = _query(prom_port, 'ckpt_exporter_latest_version{model="m"}')
        if result:
            break
        time.sleep(0.5)
    assert result, (tmp_path / "prometheus.log").read_text()[-3000:]
    assert float(result[0]["value"][1]) == newest
    assert result[0]["metric"]["job"] == "ckpt-exporter"
    published = _query(prom_port, 'ckpt_exporter_exports_total{model="m",outcome="published"}')
    assert float(published[0]["value"][1]) == 2
    up = _query(prom_port, 'up{job="ckpt-exporter"}')
    assert float(up[0]["value"][1]) == 1
    assert d.stop() == 0


def test_rollback_and_pin_while_the_daemon_runs(tmp_path: Path, daemons: Any) -> None:
    ckpts = tmp_path / "ckpts"
    train(ckpts, 2)  # ckpt-5, ckpt-10
    config = write_config(tmp_path, keep_versions=2)
    base = tmp_path / "serving" / "m"
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 2, what="2 versions")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=120,
        )

    r = cli("rollback")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TF Serving will serve version 1" in r.stdout
    assert sorted(version_dirs(base)) == [1]
    r = cli("pin", "1")
    assert r.returncode == 0, r.stdout + r.stderr

    # Several rescans later the running daemon has not exported the
    # rolled-back checkpoint again.
    time.sleep(4)
    assert d.count("export_started") == 2 and sorted(version_dirs(base)) == [1]

    # A new checkpoint gets a new number (3: 2 is never reused), and retention
    # (keep_versions = 2) keeps the pinned version 1 even past the limit.
    train(ckpts, 2, seed=3)  # a restarted trainer: ckpt-5, ckpt-10 with new weights
    d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 4, what="2 more")
    assert sorted(version_dirs(base)) == [1, 3, 4]
    assert d.stop() == 0

    # After a restart the rollback still holds.
    d2: Daemon = daemons(config, tmp_path / "daemon2.log")
    d2.wait_for(lambda ev: any(e["event"] == "started" for e in ev), what="restart")
    time.sleep(3)
    assert d2.count("export_started") == 0
    assert d2.stop() == 0
