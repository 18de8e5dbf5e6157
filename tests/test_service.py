"""The daemon as a service: notify protocol, watchdog, reload, health, metrics format.

A real ``ckpt-exporter run`` subprocess talks to a real ``NOTIFY_SOCKET``
datagram socket, as it would to systemd. No checkpoints are written, so no
TensorFlow runs and these tests take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import child_env

from daemon.config.loading import parse_config
from daemon.supervisor import Supervisor


def _config(tmp: Path, models: list[str], **daemon: Any) -> Path:
    lines = [
        "[daemon]",
        'metrics_address = "127.0.0.1:0"',
        'log_format = "json"',
        "rescan_interval_seconds = 1",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in daemon.items()]
    for name in models:
        lines += [
            "",
            "[[models]]",
            f'name = "{name}"',
            f'checkpoint_dir = "ckpts/{name}"',
            f'base_path = "serving/{name}"',
            'builder = "daemon.demo.model:build_model"',
        ]
    path = tmp / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Service:
    """``ckpt-exporter run`` under a fake service manager: a notify socket and a log."""

    def __init__(self, tmp: Path, config: Path, watchdog_usec: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(tmp / "notify"))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        env = child_env()
        env["NOTIFY_SOCKET"] = str(tmp / "notify")
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.log_path = tmp / "daemon.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def receive(self, until: str, timeout: float = 30) -> list[str]:
        """Collect datagrams until one holds the line ``until``; return that one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if self.proc.poll() is not None:
                    break
                continue
            lines = data.decode().split("\n")
            self.messages.append((time.monotonic(), lines))
            if until in lines:
                return lines
        raise AssertionError(f"no {until!r} from the daemon; log:\n{self.log_text()[-3000:]}")

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log_text().splitlines() if x.startswith("{")]

    def event(self, name: str) -> dict[str, Any]:
        found = [e for e in self.events() if e["event"] == name]
        assert found, f"no {name} event in:\n{self.log_text()[-3000:]}"
        return found[-1]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def port(self) -> int:
        return int(self.event("metrics_listening")["address"].rsplit(":", 1)[1])

    def get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port()}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self.sock.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Any]:
    started: list[Service] = []

    def start(config: Path, **kw: Any) -> Service:
        s = Service(tmp_path, config, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def test_ready_watchdog_reload_and_stop_over_a_real_notify_socket(
    tmp_path: Path, service: Any
) -> None:
    config = _config(tmp_path, ["a"])
    svc: Service = service(config, watchdog_usec=400_000)

    ready = svc.receive("READY=1")
    # READY only once the metrics listener answers: it is already up.
    status, _ = svc.get("/metrics")
    assert status == 200
    assert any(line.startswith("STATUS=a: v-") for line in ready)

    # WATCHDOG=1 at half of WATCHDOG_USEC (0.2 s), from the main loop.
    svc.receive("WATCHDOG=1")
    first = svc.messages[-1][0]
    for _ in range(4):
        svc.receive("WATCHDOG=1")
    pings = [t for t, lines in svc.messages if "WATCHDOG=1" in lines and t >= first]
    assert len(pings) == 5
    assert 0.1 < (pings[-1] - pings[0]) / 4 < 0.6

    # Reload: add a model. RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    _config(tmp_path, ["a", "b"])
    svc.proc.send_signal(signal.SIGHUP)
    reloading = svc.receive("RELOADING=1")
    usec = [int(x.split("=", 1)[1]) for x in reloading if x.startswith("MONOTONIC_USEC=")]
    assert len(usec) == 1 and abs(usec[0] - time.monotonic_ns() // 1000) < 10_000_000
    after = svc.receive("READY=1")
    assert any("b: v-" in line for line in after if line.startswith("STATUS="))
    assert svc.event("reloaded")["added"] == ["b"]
    _, body = svc.get("/metrics")
    assert b'ckpt_exporter_pending_checkpoints{model="b"} 0.0' in body

    # A broken config is refused; the old one stays in force.
    config.write_text(config.read_text() + "\nbogus_key = 1\n")
    svc.proc.send_signal(signal.SIGHUP)
    svc.receive("RELOADING=1")
    svc.receive("READY=1")
    failed = svc.event("reload_failed")
    assert any("bogus_key" in p and "unknown" in p for p in failed["problems"])
    _, body = svc.get("/metrics")
    assert b'model="b"' in body and svc.proc.poll() is None

    # Remove a model: its gauges go.
    _config(tmp_path, ["b"])
    svc.proc.send_signal(signal.SIGHUP)
    svc.receive("RELOADING=1")
    svc.receive("READY=1")
    assert svc.event("reloaded")["removed"] == ["a"]
    _, body = svc.get("/metrics")
    assert b'ckpt_exporter_pending_checkpoints{model="a"}' not in body

    svc.proc.send_signal(signal.SIGTERM)
    svc.receive("STOPPING=1")
    assert svc.proc.wait(timeout=30) == 0


def test_watchdog_pid_of_another_process_means_no_pings(tmp_path: Path, service: Any) -> None:
    os.environ["WATCHDOG_PID"] = "1"
    try:
        svc: Service = service(_config(tmp_path, ["a"]), watchdog_usec=200_000)
    finally:
        del os.environ["WATCHDOG_PID"]
    svc.receive("READY=1")
    time.sleep(1.0)
    with pytest.raises(AssertionError, match="no 'WATCHDOG=1'"):
        svc.receive("WATCHDOG=1", timeout=0.5)
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(timeout=30) == 0


def test_healthz_answers_ok_with_a_json_body(tmp_path: Path, service: Any) -> None:
    svc: Service = service(_config(tmp_path, ["a"]))
    svc.receive("READY=1")
    status, body = svc.get("/healthz")
    assert status == 200
    data = json.loads(body)
    assert data["status"] == "ok" and data["problems"] == []
    assert svc.get("/nope")[0] == 404
    svc.proc.send_signal(signal.SIGINT)
    assert svc.proc.wait(timeout=30) == 0


def test_healthz_says_503_when_the_main_loop_stops_turning(tmp_path: Path) -> None:
    data = {
        "daemon": {"metrics_address": "127.0.0.1:0", "health_stall_seconds": 0.3},
        "models": [{"name": "m", "checkpoint_dir": "c", "base_path": "b", "builder": "x:y"}],
    }
    sup = Supervisor(parse_config(data, "test", tmp_path), structlog.get_logger())
    sup.start()  # serving, but nobody turns the loop: a hung main loop
    try:
        sup._tick()
        url = f"http://127.0.0.1:{sup.metrics_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200
        time.sleep(0.6)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=5)
        assert err.value.code == 503
        body = json.loads(err.value.read())
        assert body["status"] == "unhealthy"
        assert body["problems"][0]["problem"] == "main_loop_stalled"
    finally:
        sup.shutdown()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_exposition_passes_promtool_without_warnings(tmp_path: Path, service: Any) -> None:
    svc: Service = service(_config(tmp_path, ["a", "b"]))
    svc.receive("READY=1")
    _, body = svc.get("/metrics")
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == b"" and check.stderr.strip() == b"", check.stderr
    text = body.decode()
    # Pre-initialised per model, histogram buckets up to an hour, the backend in use.
    for model in ("a", "b"):
        assert f'ckpt_exporter_exports_total{{model="{model}",outcome="published"}} 0.0' in text
        assert (
            f'ckpt_exporter_export_failures_total{{model="{model}",'
            'phase="validate",reason="output_mismatch"} 0.0'
        ) in text
    assert 'le="3600.0"' in text
    assert 'ckpt_exporter_watch_backend{backend="inotify"} 1.0' in text
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(timeout=30) == 0
