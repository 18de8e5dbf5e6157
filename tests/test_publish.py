"""Publication on real directories: no-replace rename, locks, clean-up, pinning."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.basepath.catalog import read_metadata
from daemon.basepath.layout import state_dir
from daemon.basepath.publish import (
    BasePathLock,
    move_aside,
    new_temp_dir,
    publish,
    remove_stale_temps,
    remove_version,
)
from daemon.durable import rename_noreplace, write_json_atomic
from daemon.rules.versions import VersionError, next_version, parse_version, step_version
from daemon.sources.base import Checkpoint
from daemon.supervisor.staging import CheckpointVanished, stage_checkpoint


def _export(base: Path, payload: str = "model") -> Path:
    tmp = new_temp_dir(base)
    (tmp / "variables").mkdir()
    (tmp / "saved_model.pb").write_text(payload)
    (tmp / "variables" / "variables.index").write_text(payload)
    return tmp


def test_temp_dir_name_is_never_a_version(tmp_path: Path) -> None:
    tmp = new_temp_dir(tmp_path / "base")
    assert tmp.parent == tmp_path / "base" and tmp.is_dir()
    assert parse_version(tmp.name) is None
    assert str(os.getpid()) in tmp.name


def test_rename_noreplace_refuses_an_existing_name(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "empty").mkdir()  # plain rename(2) would silently replace this
    (tmp_path / "file").write_text("")
    for dst in ("empty", "file"):
        with pytest.raises(FileExistsError):
            rename_noreplace(src, tmp_path / dst)
    assert src.is_dir() and (tmp_path / "empty").is_dir()
    rename_noreplace(src, tmp_path / "free")
    assert (tmp_path / "free").is_dir() and not src.exists()


def test_publish_takes_the_next_version_as_tf_serving_reads_names(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "0007").mkdir()  # version 7, made by hand
    (base / " 12").write_text("")  # a *file* that TF Serving still parses as 12
    (base / "1e3").mkdir()  # not a version
    tmp = _export(base)
    version, path = publish(tmp, base, next_version, {"tool": "ckpt-exporter", "model": "m"})
    assert (version, path) == (13, base / "13")
    assert not tmp.exists()
    assert (path / "saved_model.pb").read_text() == "model"
    meta = read_metadata(path)
    assert meta is not None and meta["version"] == 13 and meta["model"] == "m"
    # Nothing foreign was touched.
    assert (base / "0007").is_dir() and (base / " 12").is_file() and (base / "1e3").is_dir()


def test_publish_never_reuses_a_version_taken_meanwhile(tmp_path: Path) -> None:
    base = tmp_path / "base"
    tmp = _export(base)
    calls = []

    def choose(existing: list[int]) -> int:
        calls.append(sorted(existing))
        if len(calls) == 1:
            (base / "1").mkdir()  # someone takes it between the choice and the rename
            return 1
        return next_version(existing)

    version, _ = publish(tmp, base, choose, {})
    assert version == 2
    assert calls == [[], [1]]
    assert list((base / "1").iterdir()) == []


def test_a_refused_version_leaves_the_export_unpublished(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "50").mkdir(parents=True)
    tmp = _export(base)
    with pytest.raises(VersionError, match="refusing to go backwards"):
        publish(tmp, base, lambda existing: step_version(20, existing), {})
    assert tmp.is_dir()
    assert sorted(p.name for p in base.iterdir() if parse_version(p.name) is not None) == ["50"]


def test_write_json_atomic_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "d" / "state.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"b": [1, 2]})
    assert json.loads(target.read_text()) == {"b": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_remove_version_hides_it_before_deleting(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _, path = publish(_export(base), base, next_version, {})
    remove_version(path)
    assert not path.exists()
    assert list((state_dir(base) / "trash").iterdir()) == []


def test_move_aside_keeps_only_the_newest_failures(tmp_path: Path) -> None:
    base = tmp_path / "base"
    kept = []
    for i in range(4):
        dst = move_aside(_export(base, f"try{i}"), base, f"ckpt-{i}", keep=2)
        assert dst is not None
        os.utime(dst, ns=(i * 10**9, i * 10**9))
        kept.append(dst)
    failed = state_dir(base) / "failed"
    assert sorted(failed.iterdir()) == sorted(kept[-2:])
    assert move_aside(_export(base), base, "x", keep=0) is None
    assert not any(p.name.startswith(".ckpt-exporter-tmp-") for p in base.iterdir())


def _holder(args: str) -> subprocess.Popen[str]:
    """A real second process running ``args`` with the package importable."""
    return subprocess.Popen(
        [sys.executable, "-c", args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_stale_temps_removed_only_when_their_process_is_gone(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    live = _holder("import time; time.sleep(60)")
    dead = _holder("pass")
    dead.wait()
    try:
        prefix = ".ckpt-exporter-tmp-"
        (base / f"{prefix}{live.pid}-aaaa").mkdir()
        (base / f"{prefix}{dead.pid}-bbbb" / "variables").mkdir(parents=True)
        (base / f"{prefix}garbage").mkdir()
        (base / "3").mkdir()
        (base / ".tmp-other-tool").mkdir()
        removed = remove_stale_temps(base)
        assert sorted(p.name for p in removed) == [f"{prefix}{dead.pid}-bbbb", f"{prefix}garbage"]
        assert sorted(p.name for p in base.iterdir()) == sorted(
            [f"{prefix}{live.pid}-aaaa", "3", ".tmp-other-tool"]
        )
    finally:
        live.kill()
        live.wait()


def test_base_path_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    base = tmp_path / "base"
    script = (
        "import sys, time; from pathlib import Path;"
        "from daemon.basepath.publish import BasePathLock;"
        f"lock = BasePathLock(Path({str(base)!r})); assert lock.try_acquire();"
        "print('held', flush=True); time.sleep(60)"
    )
    other = _holder(script)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        lock = BasePathLock(base)
        assert lock.try_acquire() is False
        assert lock.holder() == str(other.pid)
        # The kernel drops a flock when its holder dies, even by SIGKILL.
        other.send_signal(signal.SIGKILL)
        other.wait()
        assert lock.try_acquire() is True
        assert lock.holder() == str(os.getpid())
        lock.release()
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


def _checkpoint(directory: Path, name: str = "ckpt-5") -> Checkpoint:
    directory.mkdir(parents=True, exist_ok=True)
    files = (directory / f"{name}.index", directory / f"{name}.data-00000-of-00001")
    for f in files:
        f.write_bytes(os.urandom(64))
    return Checkpoint(
        prefix=directory / name, step=5, files=files, written_ns=time.time_ns(), fingerprint="x"
    )


def test_pinned_files_survive_the_trainer_deleting_them(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpts")
    contents = {f.name: f.read_bytes() for f in ckpt.files}
    pinned, method = stage_checkpoint(ckpt, tmp_path / "staging")
    assert method == "link"
    assert pinned == tmp_path / "staging" / "ckpt-5"
    for f in ckpt.files:
        f.unlink()  # max_to_keep
    for name, data in contents.items():
        assert (tmp_path / "staging" / name).read_bytes() == data


def test_a_file_rewritten_in_place_is_copied_not_linked(tmp_path: Path) -> None:
    """Keras' ModelCheckpoint truncates best.keras and writes it again: a link would change."""
    ckpt = _checkpoint(tmp_path / "ckpts")
    contents = {f.name: f.read_bytes() for f in ckpt.files}
    _, method = stage_checkpoint(ckpt, tmp_path / "staging", copy=True)
    assert method == "copy"
    for f in ckpt.files:
        with f.open("r+b") as out:  # the trainer's next save, into the same inode
            out.truncate(0)
            out.write(b"the next checkpoint")
    for name, data in contents.items():
        assert (tmp_path / "staging" / name).read_bytes() == data


def test_a_file_rewritten_during_its_copy_is_not_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _checkpoint(tmp_path / "ckpts")
    real_copy = shutil.copy2

    def copy_while_the_trainer_writes(src: Path, dst: Path) -> Any:
        done = real_copy(src, dst)
        with open(src, "ab") as f:  # a concurrent writer, mid-pin
            f.write(b"more")
        return done

    monkeypatch.setattr("daemon.supervisor.staging.shutil.copy2", copy_while_the_trainer_writes)
    with pytest.raises(CheckpointVanished, match="rewritten while it was being pinned"):
        stage_checkpoint(ckpt, tmp_path / "staging", copy=True)


def test_pinning_a_checkpoint_already_deleted(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpts")
    ckpt.files[1].unlink()
    with pytest.raises(CheckpointVanished, match=r"ckpt-5\.data"):
        stage_checkpoint(ckpt, tmp_path / "staging")
