"""Warm children: started ahead of time with TensorFlow imported, used once, replaced.

Real processes throughout: the pool's children really import TensorFlow, the
daemon really hands them its requests, and /proc says what they are.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import child_env, niceness, train, write_config

from daemon.warm import WARM_MODULES, WarmPool

LIMITS = {"nice": 3, "io_class": "default", "threads": 1}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it has exited all the same.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_pool_starts_one_child_per_module_replaces_stale_ones_and_stops_them() -> None:
    pool = WarmPool(enabled=True, env=child_env())
    settings = {m: WarmPool.settings(m, LIMITS, allow_gpu=False) for m in WARM_MODULES}
    try:
        assert sorted(pool.refill(settings)) == sorted(WARM_MODULES)
        assert pool.refill(settings) == []  # already warm: nothing new
        first = {m: c.proc.pid for m, c in pool.children.items()}
        # Limits are applied as the child starts, before TensorFlow is imported.
        want = min(19, os.nice(0) + 3)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(niceness(p) != want for p in first.values()):
            time.sleep(0.05)
        assert [niceness(p) for p in first.values()] == [want, want]

        # The config changed (another niceness): the waiting worker no longer fits.
        other = WarmPool.settings("daemon.worker", {**LIMITS, "nice": 5}, allow_gpu=False)
        assert pool.take("daemon.worker", other) is None
        assert _gone(first["daemon.worker"])
        assert pool.refill({"daemon.worker": other}) == ["daemon.worker"]
        assert pool.children["daemon.worker"].proc.pid != first["daemon.worker"]

        # Once TensorFlow is in, the waiting children hold real memory and it is reported.
        deadline = time.monotonic() + 120
        while pool.rss_bytes() < 200 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pool.rss_bytes() >= 200 * 2**20
    finally:
        pids = [c.proc.pid for c in pool.children.values()]
        pool.close()
    assert pool.children == {}
    assert all(_gone(pid) for pid in pids)


def test_a_disabled_pool_starts_nothing() -> None:
    pool = WarmPool(enabled=False)
    assert pool.refill({"daemon.worker": "{}"}) == []
    assert pool.children == {} and pool.rss_bytes() == 0


def test_a_warm_child_that_died_waiting_is_not_handed_work() -> None:
    pool = WarmPool(enabled=True, env=child_env())
    settings = WarmPool.settings("daemon.validate", LIMITS, allow_gpu=False)
    pool.refill({"daemon.validate": settings})
    proc = pool.children["daemon.validate"].proc
    proc.kill()
    proc.wait()
    assert pool.take("daemon.validate", settings) is None
    assert pool.children == {}


def _metric(port: str, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{name} (\S+)$", body, re.M)
    assert m, body
    return float(m.group(1))


@pytest.mark.e2e
@pytest.mark.parametrize("warm", [True, False])
def test_exports_run_in_warm_children_only_when_enabled(
    tmp_path: Path, daemons: Any, warm: bool
) -> None:
    train(tmp_path / "ckpts", 2)
    config = write_config(tmp_path, daemon={"warm_workers": warm})
    d = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 2, what="two versions")
    exported = [e for e in ev if e["event"] == "exported"]
    validated = [e for e in ev if e["event"] == "validated"]
    assert [e["warm"] for e in exported + validated] == [warm] * 4
    port = next(e["address"] for e in ev if e["event"] == "metrics_listening").split(":")[1]
    resident = _metric(port, "ckpt_exporter_warm_children_resident_bytes")
    assert (resident > 0) if warm else (resident == 0)
    assert d.stop() == 0
