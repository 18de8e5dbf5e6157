"""Supervisor behaviour that needs no TensorFlow: start-up clean-up and retention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import structlog

from daemon.basepath.layout import METADATA_RELPATH, TEMP_PREFIX
from daemon.config.loading import parse_config
from daemon.supervisor import Supervisor


def _supervisor(tmp_path: Path, keep_versions: int) -> Supervisor:
    data = {
        "daemon": {"metrics_address": ""},
        "models": [
            {
                "name": "m",
                "checkpoint_dir": "ckpts",
                "base_path": "serving/m",
                "builder": "x:y",
                "keep_versions": keep_versions,
            }
        ],
    }
    return Supervisor(parse_config(data, "test", tmp_path), structlog.get_logger())


def _version(base: Path, name: str, model: str | None) -> Path:
    path = base / name
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"x")
    if model is not None:
        (path / METADATA_RELPATH).parent.mkdir()
        meta = {"tool": "ckpt-exporter", "model": model, "checkpoint": {"written_ns": 1}}
        (path / METADATA_RELPATH).write_text(json.dumps(meta))
    return path


def test_retention_keeps_newest_owned_versions_and_never_touches_others(tmp_path: Path) -> None:
    base = tmp_path / "serving" / "m"
    for v in ("1", "2", "3", "4"):
        _version(base, v, "m")
    _version(base, "0005", None)  # made by hand: not ours
    _version(base, "6", "other-model")  # someone else's metadata
    sup = _supervisor(tmp_path, keep_versions=2)
    st = sup.models["m"]
    sup.table.load(st)
    assert sorted(p.version for p in st.published) == [1, 2, 3, 4]
    sup.publisher.retention(st)
    names = sorted(p.name for p in base.iterdir() if not p.name.startswith("."))
    assert names == ["0005", "3", "4", "6"]
    assert list((base / ".ckpt-exporter" / "trash").iterdir()) == []
    assert sorted(p.version for p in st.published) == [3, 4]


def test_start_removes_temp_dirs_of_dead_processes_only(tmp_path: Path) -> None:
    base = tmp_path / "serving" / "m"
    base.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    crashed = base / f"{TEMP_PREFIX}{dead.stdout.strip()}-abc"
    (crashed / "variables").mkdir(parents=True)
    alive = base / f"{TEMP_PREFIX}{os.getppid()}-def"  # a live process: another daemon
    alive.mkdir()
    foreign = base / "temp-123"
    foreign.mkdir()
    sup = _supervisor(tmp_path, keep_versions=2)
    sup.table.load(sup.models["m"])
    assert not crashed.exists()
    assert alive.exists() and foreign.exists()


def test_unreadable_rollback_record_pauses_the_model(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from daemon.formats.bundle import TABLE_MAGIC

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "ckpt-1.index").write_bytes(b"entries" + TABLE_MAGIC)
    (ckpts / "ckpt-1.data-00000-of-00001").write_bytes(b"tensors")
    record = tmp_path / "serving" / "m" / ".ckpt-exporter" / "rolled_back.json"
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    sup = _supervisor(tmp_path, keep_versions=2)
    st = sup.models["m"]
    try:
        with capture_logs() as logs:
            sup._scan_and_plan(st)
            sup._scan_and_plan(st)
        assert st.job is None  # a checkpoint is pending, but nothing may start
        errors = [e for e in logs if e["event"] == "rollback_record_unreadable"]
        assert len(errors) == 1 and errors[0]["path"] == str(record)
        record.write_text('{"fingerprints": {}, "floor_ns": 0}')
        sup._scan_and_plan(st)
        assert st.job is not None and st.job.ckpt.name == "ckpt-1"
    finally:
        sup.shutdown()
