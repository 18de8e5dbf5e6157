"""Fault rows 2 and 3: the worker or validator is SIGKILLed, or an export hangs.

Both are transient failures: counted by reason in the log and the metrics,
the export folder removed, the checkpoint retried with doubling backoff, the
daemon itself unaffected.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import pid_gone, train, version_dirs, write_config
from faultkit import Kit, kit_for, metric_value, temp_dirs, wait_children

pytestmark = pytest.mark.faults
BUILDERS = str(Path(__file__).resolve().parent.parent / "builders")


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    with kit_for(tmp_path) as k:
        yield k


def _ts(event: dict[str, object]) -> float:
    return datetime.datetime.fromisoformat(str(event["timestamp"])).timestamp()


def test_killed_worker_and_crashed_validator_are_retried_with_backoff_then_published(
    tmp_path: Path, kit: Kit
) -> None:
    train(tmp_path / "ckpts", 1)
    base = tmp_path / "serving" / "m"
    config = write_config(tmp_path, export_policy="latest")
    d = kit.daemon(config)

    # 1. kill -9 the worker while it exports.
    worker = d.wait_event("child_started", phase="export")["pid"]
    assert worker in wait_children(base, "daemon.children.worker")
    assert list((base / ".ckpt-exporter" / "staging").glob("*/export.request.json"))
    os.kill(worker, signal.SIGKILL)
    f1 = d.wait_event("export_failed")
    assert (f1["phase"], f1["reason"], f1["permanent"]) == ("export", "child_crashed", False)
    assert "killed by SIGKILL" in f1["error"] and f1["attempt"] == 1
    assert f1["retry_in_seconds"] == 1
    assert temp_dirs(base) == []

    # 2. The retry exports; the validator segfaults (SIGSEGV, as a crash in
    #    TensorFlow's C++ would; the kernel's OOM killer sends SIGKILL, as above).
    retry = d.wait_event("export_started", n=2)
    assert _ts(retry) >= _ts(f1) + f1["retry_in_seconds"] - 0.05  # waited the backoff
    validator = d.wait_event("child_started", phase="validate")["pid"]
    assert validator in wait_children(base, "daemon.children.validator")
    os.kill(validator, signal.SIGSEGV)
    f2 = d.wait_event("export_failed", n=2)
    assert (f2["phase"], f2["reason"], f2["permanent"]) == ("validate", "child_crashed", False)
    assert "SIGSEGV" in f2["error"], f2
    assert f2["attempt"] == 2 and f2["retry_in_seconds"] == 2  # doubled
    assert temp_dirs(base) == []

    # 3. The third attempt publishes; the daemon itself never noticed a thing.
    third = d.wait_event("export_started", n=3)
    assert _ts(third) >= _ts(f2) + f2["retry_in_seconds"] - 0.05
    pub = d.wait_event("published")
    assert pub["version"] == 1 and sorted(version_dirs(base)) == [1]
    assert d.proc.poll() is None and d.count("started") == 1
    assert d.count("export_rejected") == 0 and d.count("export_failed") == 2
    assert pid_gone(worker) and pid_gone(validator)

    text = d.metrics()

    def m(name: str, **labels: str) -> float | None:
        return metric_value(text, name, model="m", **labels)

    failures = "ckpt_exporter_export_failures_total"
    assert m(failures, phase="export", reason="child_crashed") == 1
    assert m(failures, phase="validate", reason="child_crashed") == 1
    assert m("ckpt_exporter_worker_restarts_total", role="export") == 1
    assert m("ckpt_exporter_worker_restarts_total", role="validate") == 1
    assert m("ckpt_exporter_exports_total", outcome="failed") == 2
    assert m("ckpt_exporter_exports_total", outcome="published") == 1
    assert m("ckpt_exporter_validations_total", outcome="failed") == 1
    assert d.stop() == 0
    assert temp_dirs(base) == []


def test_hanging_export_is_killed_at_the_timeout_and_retried_with_backoff(
    tmp_path: Path, kit: Kit
) -> None:
    train(tmp_path / "ckpts", 1)
    base = tmp_path / "serving" / "m"
    config = write_config(
        tmp_path,
        builder="models_for_tests:slow",  # sleeps 120 s before building
        python_path=[BUILDERS],
        export_policy="latest",
        daemon={"export_timeout_seconds": 3},
    )
    d = kit.daemon(config)
    workers = []
    for n in (1, 2):
        # The PID from the log, not from /proc: a warm child shows in /proc as
        # working for the base path only once it has imported TensorFlow, and
        # the 3 s timeout may kill it before that.
        workers.append(d.wait_event("child_started", n=n, phase="export")["pid"])
        assert len(temp_dirs(base)) == 1
        f = d.wait_event("export_failed", n=n)
        assert (f["phase"], f["reason"], f["permanent"]) == ("export", "timeout", False)
        assert "export did not finish within 3 s (export_timeout_seconds)" in f["error"]
        assert (f["attempt"], f["retry_in_seconds"]) == (n, 2 ** (n - 1))
        # The hung worker is gone (killed with its process group) and so is its
        # folder: moved out of the base path into failed/ (keep_failed), not published.
        assert pid_gone(workers[-1])
        assert temp_dirs(base) == []
        assert f["kept_at"].startswith(str(base / ".ckpt-exporter" / "failed")), f
    assert workers[0] != workers[1]
    assert version_dirs(base) == {}
    assert d.proc.poll() is None
    # Metrics agree with the log (a third timeout may be under way: bracket the read).
    before = d.count("export_failed", reason="timeout")
    text = d.metrics()
    after = d.count("export_failed", reason="timeout")
    for name, labels in (
        ("ckpt_exporter_export_failures_total", {"phase": "export", "reason": "timeout"}),
        ("ckpt_exporter_worker_restarts_total", {"role": "export"}),
    ):
        value = metric_value(text, name, model="m", **labels)
        assert value is not None and before <= value <= after, (name, value, before, after)
    assert d.stop() == 0
    assert temp_dirs(base) == []
