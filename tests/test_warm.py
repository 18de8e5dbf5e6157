"""Warm children: started ahead of time with TensorFlow imported; kept export workers.

Real processes throughout: the pool's children really import TensorFlow, the
daemon really hands them its requests, and /proc says what they are.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import child_env, niceness, pid_gone, train, version_dirs, write_config

import daemon.supervisor.warm_pool
import daemon.supervisor.zygote_handle
from daemon.basepath.layout import REPORT_RELPATH
from daemon.supervisor.warm_pool import WARM_MODULES, WarmChild, WarmPool, code_changed

LIMITS = {"nice": 3, "io_class": "default", "threads": 1}


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the name: [0] state, [1] ppid, [3] session."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_the_pool_forks_fresh_children_from_one_zygote_with_the_limits_applied_once(
    tmp_path: Path,
) -> None:
    pool = WarmPool(enabled=True, env=child_env())
    settings = {m: WarmPool.settings(m, LIMITS, allow_gpu=False) for m in WARM_MODULES}
    try:
        # Worker and validator have the same limits here: one zygote serves both.
        (zygote,) = pool.refill(settings)
        assert pool.refill(settings) == []  # already there: nothing new
        want = min(19, os.nice(0) + 3)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and niceness(zygote.proc.pid) != want:
            time.sleep(0.05)
        assert niceness(zygote.proc.pid) == want  # applied before TensorFlow is imported

        validator = pool.take("daemon.children.validator", settings["daemon.children.validator"])
        assert validator is not None and validator.done is None
        pid = validator.proc.pid
        fields = _stat(pid)
        # The zygote's child, in a session of its own, named for its role; the
        # niceness came with the fork and was not added a second time.
        assert (int(fields[1]), int(fields[3])) == (zygote.proc.pid, pid)
        assert _comm(pid) == "ckpt-validate" and niceness(pid) == want
        autogroup = Path(f"/proc/{pid}/autogroup")
        if autogroup.exists():
            assert autogroup.read_text().split()[-1] == str(want - os.nice(0))
        # Its exit code travels back through the zygote: a request file that is
        # not there ends the child with the software-error code.
        validator.hand(str(tmp_path / "missing.json"))
        assert validator.proc.wait(timeout=60) == 70
        assert pid_gone(pid)

        # A reusable exporter gets its done pipe; killed, it reports the signal.
        worker = pool.take(
            "daemon.children.worker",
            WarmPool.settings("daemon.children.worker", LIMITS, False, max_exports=3),
        )
        assert worker is not None and worker.done is not None
        assert _comm(worker.proc.pid) == "ckpt-worker"
        os.killpg(worker.proc.pid, signal.SIGKILL)
        assert worker.proc.wait(timeout=30) == -signal.SIGKILL
        assert worker.wait_done() is False  # the pipe ended with the process

        # The config changed (another niceness): a new zygote; the old one
        # lives until the child it forked has exited, then goes by itself.
        busy = pool.take("daemon.children.validator", settings["daemon.children.validator"])
        assert busy is not None
        other = {m: WarmPool.settings(m, {**LIMITS, "nice": 5}, allow_gpu=False) for m in settings}
        (second,) = pool.refill(other)
        assert pool.take("daemon.children.validator", settings["daemon.children.validator"]) is None
        assert pool.retiring == [zygote]
        time.sleep(0.5)
        assert zygote.alive() and not pid_gone(busy.proc.pid)
        busy.proc.stdin.close()  # type: ignore[union-attr]  # EOF: exit without work
        assert busy.proc.wait(timeout=30) == 0
        zygote.proc.wait(timeout=30)
        assert not zygote.alive()

        # Once TensorFlow is in, the zygote holds real memory and it is reported.
        assert (
            pool.take("daemon.children.validator", other["daemon.children.validator"]) is not None
        )
        assert pool.rss_bytes() >= 200 * 2**20
    finally:
        pool.close()
    assert pool.zygotes == {} and pid_gone(second.proc.pid)


def test_a_disabled_pool_starts_nothing() -> None:
    pool = WarmPool(enabled=False)
    assert pool.refill({"daemon.children.worker": "{}"}) == []
    assert pool.zygotes == {} and pool.rss_bytes() == 0


def test_children_die_with_their_zygote_and_a_dead_zygote_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if it had lived long (the OOM killer, an operator's kill): replaced at once.
    monkeypatch.setattr(daemon.supervisor.warm_pool, "ZYGOTE_QUICK_EXIT_SECONDS", 0.0)
    pool = WarmPool(enabled=True, env=child_env())
    settings = WarmPool.settings("daemon.children.validator", LIMITS, allow_gpu=False)
    try:
        (zygote,) = pool.refill({"daemon.children.validator": settings})
        child = pool.take("daemon.children.validator", settings)
        assert child is not None
        os.kill(zygote.proc.pid, signal.SIGKILL)
        # The child was waiting for its request: it goes with its zygote
        # (PR_SET_PDEATHSIG), and the pool says so as a Popen would.
        assert child.proc.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while not pid_gone(child.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_gone(child.proc.pid)
        assert pool.take("daemon.children.validator", settings) is None  # nobody to fork it
        (again,) = pool.refill({"daemon.children.validator": settings})
        assert again is not zygote
        assert pool.take_exits() == [
            {"pid": zygote.proc.pid, "code": -signal.SIGKILL, "retry_in": 0.0}
        ]
        assert pool.take("daemon.children.validator", settings) is not None
    finally:
        pool.close()


def test_a_zygote_that_exits_at_once_is_restarted_after_a_growing_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TensorFlow that cannot be imported, as after a broken upgrade.
    (tmp_path / "tensorflow.py").write_text("raise ImportError('broken on purpose')\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    monkeypatch.setattr(daemon.supervisor.warm_pool, "ZYGOTE_BACKOFF_SECONDS", (0.5, 1.0))
    pool = WarmPool(enabled=True, env=env)
    settings = {
        "daemon.children.validator": WarmPool.settings(
            "daemon.children.validator", LIMITS, allow_gpu=False
        )
    }
    try:
        waits = []
        for _ in range(3):
            (zygote,) = pool.refill(settings)
            assert zygote.proc.wait(timeout=60) != 0
            assert pool.refill(settings) == []  # found dead: not started again at once
            (gone,) = pool.take_exits()
            assert gone["pid"] == zygote.proc.pid and gone["code"] == zygote.proc.returncode
            waits.append(gone["retry_in"])
            assert (
                pool.take("daemon.children.validator", settings["daemon.children.validator"])
                is None
            )
            assert pool.refill(settings) == [] and pool.take_exits() == []
            time.sleep(gone["retry_in"] + 0.1)
        assert waits == [0.5, 1.0, 1.0]  # doubled, up to the longest
    finally:
        pool.close()


def test_a_fork_request_the_zygote_refuses_is_answered_and_the_zygote_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = WarmPool(enabled=True, env=child_env())
    settings = WarmPool.settings("daemon.children.validator", LIMITS, allow_gpu=False)
    try:
        (zygote,) = pool.refill({"daemon.children.validator": settings})
        # Still importing TensorFlow, and no time to wait: the caller starts cold.
        with monkeypatch.context() as m:
            m.setattr(daemon.supervisor.zygote_handle, "READY_WAIT_SECONDS", 0.0)
            assert pool.take("daemon.children.validator", settings) is None
        assert zygote.fork("daemon.not_a_child", settings) is None  # "error ...", not a fork
        assert zygote.fork("daemon.children.validator", "not json") is None
        assert zygote.alive()
        child = zygote.fork("daemon.children.validator", settings)
        assert child is not None and _comm(child.pid) == "ckpt-validate"
        assert child.stdin is not None
        child.stdin.close()  # EOF before any request: exit 0
        assert child.wait(timeout=30) == 0
    finally:
        pool.close()


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


# --- kept export workers ----------------------------------------------------------


def _sleeper() -> WarmChild:
    """A real process standing in for a kept exporter (the pool only starts and stops it)."""
    proc = subprocess.Popen(["sleep", "300"], stdin=subprocess.PIPE, start_new_session=True)
    return WarmChild("daemon.children.worker", proc, "{}")


def test_code_changed_names_a_file_whose_time_or_size_changed_or_that_is_gone(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("X = 1\n")
    b.write_text("Y = 2\n")
    files = {str(p): [p.stat().st_mtime_ns, p.stat().st_size] for p in (a, b)}
    assert code_changed(files) is None
    # Same size, one second newer: what an edit of "relu" to "tanh" looks like.
    b.write_text("Y = 3\n")
    st = b.stat()
    os.utime(b, ns=(st.st_atime_ns, files[str(b)][0] + 10**9))
    assert code_changed(files) == str(b)
    files[str(b)] = [b.stat().st_mtime_ns, b.stat().st_size]
    a.write_text("X = 10\n")
    os.utime(a, ns=(files[str(a)][0], files[str(a)][0]))  # same time, other size
    assert code_changed(files) == str(a)
    a.unlink()
    assert code_changed({str(a): [0, 0]}) == str(a)


def test_the_pool_keeps_exporters_by_key_evicts_the_longest_idle_and_expires_idle_ones(
    tmp_path: Path,
) -> None:
    pool = WarmPool(enabled=True)
    first, second, third = _sleeper(), _sleeper(), _sleeper()
    try:
        assert pool.keep(first, "k1", {}, limit=2) == []
        assert pool.keep(second, "k2", {}, limit=2) == []
        # A third key over the limit of two: the one idle longest goes.
        assert pool.keep(third, "k3", {}, limit=2) == [first]
        assert pid_gone(first.proc.pid) and sorted(pool.kept) == ["k2", "k3"]
        assert pool.rss_bytes() > 0

        # Handed out only for its own key and with the settings it was started with.
        assert pool.take_kept("k1", "{}") == (None, None)
        assert pool.take_kept("k2", '{"other": 1}') == (None, (second, "config_changed"))
        assert pid_gone(second.proc.pid)
        child, why = pool.take_kept("k3", "{}")
        assert child is third and why is None and pool.kept == {}

        # Code it imported changed on disk: retired, not handed out.
        src = tmp_path / "bld.py"
        src.write_text("x = 1\n")
        pool.keep(third, "k3", {str(src): [0, 1]}, limit=2)
        assert pool.take_kept("k3", "{}") == (None, (third, f"code_changed: {src}"))
        assert pid_gone(third.proc.pid)

        # Idle for longer than allowed.
        fourth = _sleeper()
        pool.keep(fourth, "k4", {}, limit=2)
        assert pool.expire(3600) == []
        fourth.idle_since -= 10
        assert pool.expire(5) == [fourth] and pid_gone(fourth.proc.pid)
    finally:
        pool.close()
    assert all(pid_gone(c.proc.pid) for c in (first, second, third))


def _pids(ev: list[dict[str, Any]], phase: str) -> list[int]:
    return [e["pid"] for e in ev if e["event"] == "child_started" and e["phase"] == phase]


@pytest.mark.e2e
def test_one_export_worker_serves_successive_exports_until_its_count_is_reached(
    tmp_path: Path, daemons: Any
) -> None:
    train(tmp_path / "ckpts", 3)
    config = write_config(tmp_path, daemon={"exporter_max_exports": 2})
    d = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 3, what="3 versions")
    assert d.stop() == 0
    exported = [e for e in ev if e["event"] == "exported"]
    pids = _pids(ev, "export")
    # The first worker made versions 1 and 2 (the second restored into the model
    # it had built, and reused version 1's graph), then exited: a new one made 3.
    assert pids[0] == pids[1] != pids[2], pids
    assert [e["reused"] for e in exported] == [0, 1, 0]
    assert [bool(e["incremental_from"]) for e in exported] == [False, True, True]
    assert pid_gone(pids[0])
    # Validators are kept the same way, under the graph key: the first passed
    # version 1, kept its session and validated version 2 (same graph) by
    # restoring 2's variables into it, then exited by count; a new one took 3.
    # None of them is an exporter.
    validators = _pids(ev, "validate")
    assert validators[0] == validators[1] != validators[2], validators
    assert not set(validators) & set(pids)
    reports = [
        json.loads((v / REPORT_RELPATH).read_text())
        for _, v in sorted(version_dirs(tmp_path / "serving" / "m").items())
    ]
    loads = [next(c for c in r["checks"] if c["check"] == "serving_load") for r in reports]
    assert [c["kept"] for c in loads] == [False, True, False]
    # Each version holds its own checkpoint's weights: weight parity proved all
    # 8 saved variables (Keras' export saves each of the 4 weights twice) against
    # the checkpoint the version was made from, and the trainer changes them all.
    validated = [e for e in ev if e["event"] == "validated"]
    assert [e["weights_matched"] for e in validated] == [4, 4, 4]
    assert sorted(version_dirs(tmp_path / "serving" / "m")) == [1, 2, 3]


@pytest.mark.e2e
def test_an_idle_kept_export_worker_exits_and_single_use_workers_are_never_kept(
    tmp_path: Path, daemons: Any
) -> None:
    train(tmp_path / "ckpts", 1)
    config = write_config(tmp_path, daemon={"exporter_idle_seconds": 1})
    d = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(
        lambda ev: any(e["event"] == "exporter_retired" for e in ev), what="the idle worker retired"
    )
    (retired,) = [e for e in ev if e["event"] == "exporter_retired"]
    (pid,) = _pids(ev, "export")
    assert retired["pid"] == pid and retired["reason"] == "idle" and retired["exports"] == 1
    deadline = time.monotonic() + 30
    while not pid_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_gone(pid)
    assert d.stop() == 0

    # exporter_max_exports = 1: every export in a process of its own.
    tmp2 = tmp_path / "single"
    train(tmp2 / "ckpts", 2)
    d = daemons(write_config(tmp2, daemon={"exporter_max_exports": 1}), tmp2 / "daemon.log")
    ev = d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 2, what="2 versions")
    assert d.stop() == 0
    pids = _pids(ev, "export")
    assert len(set(pids)) == 2 and all(pid_gone(p) for p in pids)
    assert [e["reused"] for e in ev if e["event"] == "exported"] == [0, 0]
    # Single-use validators too: the second, started with its incremental export,
    # imported version 1's graph while the weights were written.
    validators = _pids(ev, "validate")
    assert len(set(validators)) == 2
    loads = [
        json.loads((v / REPORT_RELPATH).read_text())["checks"][0]
        for _, v in sorted(version_dirs(tmp2 / "serving" / "m").items())
    ]
    assert [(c["preloaded"], c["kept"]) for c in loads] == [(False, False), (True, False)]
