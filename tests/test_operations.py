"""Operator commands on real directories: rollback, pins, status.

Versions are built by hand (a folder with ``saved_model.pb`` and this daemon's
metadata), checkpoints as the files the TF2 source reads (``.index`` plus one
data shard, with chosen mtimes), so no TensorFlow is needed. The CLI runs as a
real ``python -m daemon`` subprocess, and the competing lock holder is a real
second process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import child_env, write_config
from conftest import cli as run_cli

from daemon.basepath import storage as operations
from daemon.basepath.catalog import scan_base_path
from daemon.basepath.layout import METADATA_RELPATH
from daemon.basepath.operations import (
    LockBusy,
    OperationError,
    apply_rolled_back,
    highest_rolled_back_version,
    pin_version,
    read_pins,
    read_rolled_back,
    rollback,
    rolled_back_problem,
    unpin_version,
)
from daemon.rules.planner import History, plan
from daemon.rules.versions import plan_retention
from daemon.sources import Checkpoint, TFCheckpointSource

#: A recent, fixed write time (ns) so checkpoints and versions order predictably.
T0 = 1_700_000_000 * 10**9
#: The footer magic a complete ``.index`` ends with (TensorFlow's ``kTableMagicNumber``).
TABLE_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")


def make_version(
    base: Path,
    version: int | str,
    model: str | None = "m",
    *,
    fingerprint: str | None = None,
    written_ns: int | None = None,
    step: int | None = None,
    prefix: str | None = None,
    published_at: float | None = None,
) -> Path:
    """A version folder; with ``model``, this daemon's metadata (defaults derived from N)."""
    path = base / str(version)
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"pb" * 50)
    (path / "variables" / "variables.index").write_bytes(b"i" * 10)
    if model is not None:
        n = int(version)
        meta = {
            "tool": "ckpt-exporter",
            "model": model,
            "version": n,
            "published_at": published_at if published_at is not None else 1_700_000_000 + n,
            "checkpoint": {
                "fingerprint": fingerprint if fingerprint is not None else f"fp{n}",
                "written_ns": written_ns if written_ns is not None else n * 1000,
                "step": step if step is not None else n * 10,
                "prefix": prefix if prefix is not None else f"/x/ckpt-{n}",
            },
        }
        (path / METADATA_RELPATH).parent.mkdir()
        (path / METADATA_RELPATH).write_text(json.dumps(meta))
    return path


def make_checkpoint(ckpt_dir: Path, step: int, written_ns: int) -> Checkpoint:
    """Files the TF2 source takes for a complete checkpoint, written at ``written_ns``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    files = [ckpt_dir / f"ckpt-{step}.index", ckpt_dir / f"ckpt-{step}.data-00000-of-00001"]
    files[0].write_bytes(f"index of step {step}".encode() + TABLE_MAGIC)
    files[1].write_bytes(b"d" * step)
    for f in files:
        os.utime(f, ns=(written_ns, written_ns))
    (found,) = [c for c in TFCheckpointSource().scan(ckpt_dir).checkpoints if c.step == step]
    return found


def version_of(base: Path, ckpt: Checkpoint, version: int) -> Path:
    """The version this daemon would have published for ``ckpt``."""
    return make_version(
        base,
        version,
        fingerprint=ckpt.fingerprint,
        written_ns=ckpt.written_ns,
        step=ckpt.step,
        prefix=str(ckpt.prefix),
    )


def visible(base: Path) -> list[str]:
    """The names TF Serving takes for versions, sorted by version."""
    return [e.name for e in scan_base_path(base)]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes, to prove something was not touched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "serving" / "m"
    path.mkdir(parents=True)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=60)


# --- rollback ---------------------------------------------------------------


def test_default_rollback_moves_the_newest_version_aside_and_nothing_else(base: Path) -> None:
    for v in (1, 2, 3, 4):
        make_version(base, v)
    make_version(base, "0", model=None)  # by hand: lower than the target, not ours
    (base / "notes.txt").write_text("keep me")
    foreign_before = snapshot(base / "0")
    kept_before = snapshot(base / "3")

    result = rollback(base, "m")

    assert result.target == 3 and result.highest_remaining == 3
    assert result.warnings == ()
    assert visible(base) == ["0", "1", "2", "3"]
    (moved,) = result.moved
    assert moved.version == 4 and moved.source == base / "4"
    assert moved.destination.parent == base / ".ckpt-exporter" / "rolled-back"
    assert moved.destination.name.startswith("4-")
    assert moved.checkpoint == "/x/ckpt-4" and moved.fingerprint == "fp4"
    # Moved whole, kept for inspection.
    assert (moved.destination / "saved_model.pb").read_bytes() == b"pb" * 50
    assert (moved.destination / METADATA_RELPATH).exists()
    assert snapshot(base / "0") == foreign_before and snapshot(base / "3") == kept_before
    assert (base / "notes.txt").read_text() == "keep me"


def test_rollback_to_moves_every_newer_version_in_ascending_order(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for v in (1, 2, 3, 4, 5):
        make_version(base, v)
    make_version(base, "-3", model=None)  # a foreign negative version stays put
    renamed: list[str] = []
    highest_seen: list[int] = []
    real_rename = operations.rename_noreplace

    def spy(src: Path, dst: Path) -> None:
        real_rename(src, dst)
        renamed.append(src.name)
        # What TF Serving would serve right after this rename.
        highest_seen.append(max(e.version for e in scan_base_path(base)))

    monkeypatch.setattr(operations, "rename_noreplace", spy)

    result = rollback(base, "m", to=2)

    assert renamed == ["3", "4", "5"]
    # The highest version stays 5 until the last rename: one transition, 5 -> 2,
    # and versions 3 and 4 are never the highest (never loaded) in between.
    assert highest_seen == [5, 5, 2]
    assert [m.version for m in result.moved] == [3, 4, 5]
    assert visible(base) == ["-3", "1", "2"]
    kept = sorted(p.name.split("-")[0] for p in (base / ".ckpt-exporter/rolled-back").iterdir())
    assert kept == ["3", "4", "5"]


def test_an_interrupted_rollback_is_recorded_first_and_finished_by_a_rerun(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for v in (1, 2, 3, 4, 5):
        make_version(base, v)
    real_rename = operations.rename_noreplace

    def fail_on_5(src: Path, dst: Path) -> None:
        if src.name == "5":
            raise PermissionError(13, "Permission denied", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(operations, "rename_noreplace", fail_on_5)
    with pytest.raises(OperationError) as e:
        rollback(base, "m", to=3)
    assert "could not move version 5" in str(e.value) and "moved so far: 4" in str(e.value)
    assert "run the same rollback again" in str(e.value)
    assert visible(base) == ["1", "2", "3", "5"]
    # Recorded before anything moved: the daemon will not export 5 again meanwhile.
    assert read_rolled_back(base) == (frozenset({"fp4", "fp5"}), 5000)

    monkeypatch.setattr(operations, "rename_noreplace", real_rename)
    result = rollback(base, "m", to=3)
    assert [m.version for m in result.moved] == [5]
    assert visible(base) == ["1", "2", "3"]
    assert read_rolled_back(base) == (frozenset({"fp4", "fp5"}), 5000)


def test_rollback_records_fingerprints_and_raises_the_floor(base: Path) -> None:
    for v in (1, 2, 3, 4, 5):
        make_version(base, v)
    before = time.time()
    rollback(base, "m", to=3)
    data = json.loads((base / ".ckpt-exporter" / "rolled_back.json").read_text())
    assert set(data["fingerprints"]) == {"fp4", "fp5"}
    assert data["fingerprints"]["fp5"]["version"] == 5
    assert data["fingerprints"]["fp5"]["checkpoint"] == "/x/ckpt-5"
    assert before <= data["fingerprints"]["fp4"]["at"] <= time.time()
    assert data["floor_ns"] == 5000  # written_ns of the newest rolled-back checkpoint
    assert read_rolled_back(base) == (frozenset({"fp4", "fp5"}), 5000)
    assert highest_rolled_back_version(base) == 5

    # A second rollback merges, and the floor never goes down.
    rollback(base, "m")  # 3 -> 2
    fps, floor = read_rolled_back(base)
    assert fps == {"fp3", "fp4", "fp5"} and floor == 5000
    assert highest_rolled_back_version(base) == 5


def test_floor_merges_with_an_existing_higher_floor(base: Path) -> None:
    for v in (1, 2):
        make_version(base, v)
    state = base / ".ckpt-exporter"
    state.mkdir()
    (state / "rolled_back.json").write_text(
        json.dumps({"fingerprints": {"old": {"version": 9}}, "floor_ns": 10**6})
    )
    rollback(base, "m")
    assert read_rolled_back(base) == (frozenset({"old", "fp2"}), 10**6)


def test_rolled_back_record_tolerates_missing_and_garbage_files(base: Path) -> None:
    assert read_rolled_back(base) == (frozenset(), 0)
    state = base / ".ckpt-exporter"
    state.mkdir()
    for text in ("{not json", "[1, 2]", '{"fingerprints": [1], "floor_ns": "high"}'):
        (state / "rolled_back.json").write_text(text)
        assert read_rolled_back(base) == (frozenset(), 0)
    (state / "rolled_back.json").write_text('{"fingerprints": {"a": {}}, "floor_ns": true}')
    assert read_rolled_back(base) == (frozenset({"a"}), 0)

    # Rollback over a garbage record replaces it and says so.
    (state / "rolled_back.json").write_text("{not json")
    for v in (1, 2):
        make_version(base, v)
    result = rollback(base, "m")
    assert any("not valid JSON" in w for w in result.warnings)
    assert read_rolled_back(base) == (frozenset({"fp2"}), 2000)


def test_a_record_that_cannot_be_read_is_never_replaced(base: Path) -> None:
    for v in (1, 2):
        make_version(base, v)
    record = base / ".ckpt-exporter" / "rolled_back.json"
    record.mkdir(parents=True)  # unreadable even as root: reading it is an OSError
    problem = rolled_back_problem(base)
    assert problem is not None and problem.kind == "io" and str(record) in problem.message
    with pytest.raises(OperationError, match="make it readable"):
        rollback(base, "m")
    assert record.is_dir() and (base / "2").is_dir()


@pytest.mark.parametrize(
    ("text", "kind"),
    [("{not json", "corrupt"), ("[1]", "corrupt"), ('"x"', "corrupt"), ("{}", None)],
)
def test_rolled_back_problem_kinds(base: Path, text: str, kind: str | None) -> None:
    assert rolled_back_problem(base) is None  # missing is fine
    record = base / ".ckpt-exporter" / "rolled_back.json"
    record.parent.mkdir()
    record.write_text(text)
    problem = rolled_back_problem(base)
    assert (problem.kind if problem else None) == kind


def test_floor_stops_latest_from_exporting_a_superseded_checkpoint(tmp_path: Path) -> None:
    """Without the floor, ``latest`` would publish ckpt-35 and undo the rollback."""
    base, ckpts = tmp_path / "serving" / "m", tmp_path / "ckpts"
    c3 = make_checkpoint(ckpts, 3, T0 + 3 * 10**9)
    make_checkpoint(ckpts, 35, T0 + 35 * 10**8)  # superseded by ckpt-4, never exported
    c4 = make_checkpoint(ckpts, 4, T0 + 4 * 10**9)
    version_of(base, c3, 1)
    version_of(base, c4, 2)

    rollback(base, "m")

    checkpoints = TFCheckpointSource().scan(ckpts).checkpoints
    remaining = History(
        published_fingerprints=frozenset({c3.fingerprint}), watermark_ns=c3.written_ns
    )
    # The rolled-back fingerprints alone are not enough: "latest" picks ckpt-35.
    fingerprints_only = History(
        published_fingerprints=remaining.published_fingerprints,
        watermark_ns=remaining.watermark_ns,
        rejected=read_rolled_back(base)[0],
    )
    naive = plan(
        checkpoints, fingerprints_only, export_policy="latest", min_interval_seconds=0, now=0
    )
    assert naive.next is not None and naive.next.step == 35
    history = apply_rolled_back(remaining, base)
    assert c4.fingerprint in history.rejected and history.watermark_ns == c4.written_ns
    for policy in ("latest", "all"):
        decided = plan(checkpoints, history, export_policy=policy, min_interval_seconds=0, now=0)
        assert decided.next is None and decided.pending == 0

    # A checkpoint the trainer writes after the rollback is exported as usual.
    c5 = make_checkpoint(ckpts, 5, T0 + 5 * 10**9)
    checkpoints = TFCheckpointSource().scan(ckpts).checkpoints
    decided = plan(checkpoints, history, export_policy="latest", min_interval_seconds=0, now=0)
    assert decided.next == c5 and decided.pending == 1


def test_apply_rolled_back_without_a_record_changes_nothing(base: Path) -> None:
    history = History(rejected=frozenset({"x"}), watermark_ns=7)
    assert apply_rolled_back(history, base) == history


def _refused(base: Path, to: int | None, model: str = "m") -> str:
    def files() -> dict[str, bytes]:
        return {k: v for k, v in snapshot(base).items() if k != ".ckpt-exporter/lock"}

    before = files()
    with pytest.raises(OperationError) as e:
        rollback(base, model, to=to)
    # Nothing written, nothing moved.
    assert not (base / ".ckpt-exporter" / "rolled_back.json").exists()
    assert not (base / ".ckpt-exporter" / "rolled-back").exists()
    assert files() == before
    return str(e.value)


def test_rollback_refusals_say_why_and_touch_nothing(tmp_path: Path, base: Path) -> None:
    msg = _refused(tmp_path / "nowhere", None)
    assert "no version of model 'm' published by ckpt-exporter" in msg

    make_version(base, 1)
    make_version(base, 2, model="other")  # another model's version is not ours
    make_version(base, 7, model=None)
    msg = _refused(base, None)
    assert "only version 1" in msg and "no older version to roll back to" in msg

    make_version(base, 3)
    msg = _refused(base, 9)
    assert "version 9 is not a version of model 'm'" in msg and "(available: 1, 3)" in msg
    msg = _refused(base, 7)  # foreign: cannot be a target
    assert "version 7 is not a version" in msg and "(available: 1, 3)" in msg
    msg = _refused(base, 2)  # another model's
    assert "(available: 1, 3)" in msg
    msg = _refused(base, 3)
    assert "version 3 is already the newest version of model 'm'" in msg
    msg = _refused(base, None, model="nobody")
    assert "no version of model 'nobody'" in msg


def test_a_foreign_version_above_the_target_is_left_and_named(base: Path) -> None:
    for v in (1, 2, 3):
        make_version(base, v)
    make_version(base, 10, model=None)
    make_version(base, 5, model="other")
    untouched = {n: snapshot(base / n) for n in ("10", "5")}

    result = rollback(base, "m", to=1)

    assert [m.version for m in result.moved] == [2, 3]
    assert visible(base) == ["1", "5", "10"]
    assert {n: snapshot(base / n) for n in ("10", "5")} == untouched
    assert result.highest_remaining == 10
    (warning,) = result.warnings
    assert "TF Serving will serve 10, not 1" in warning


_HOLDER = """
import sys, time
from pathlib import Path
from daemon.basepath.publish import BasePathLock
lock = BasePathLock(Path(sys.argv[1]))
assert lock.try_acquire()
print("locked", flush=True)
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
else:
    sys.stdin.read()
"""


@pytest.fixture
def lock_holder(base: Path) -> Iterator[subprocess.Popen[str]]:
    """A second process holding the base-path lock until the test ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(base)],
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def test_rollback_waits_for_the_lock_then_names_the_holder(
    base: Path, lock_holder: subprocess.Popen[str]
) -> None:
    for v in (1, 2):
        make_version(base, v)
    started = time.monotonic()
    with pytest.raises(LockBusy) as e:
        rollback(base, "m", lock_timeout=0.5)
    assert time.monotonic() - started >= 0.5
    assert e.value.holder == str(lock_holder.pid)
    assert f"held by PID {lock_holder.pid}" in str(e.value)
    assert visible(base) == ["1", "2"]
    assert read_rolled_back(base) == (frozenset(), 0)

    r = cli("rollback", "--config", str(_config(base)), "--lock-timeout", "0.3")
    assert r.returncode == 75, r.stderr
    assert f"PID {lock_holder.pid}" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == "" and visible(base) == ["1", "2"]

    with pytest.raises(LockBusy):
        pin_version(base, "m", 1, lock_timeout=0.2)
    assert read_pins(base) == frozenset()


def test_rollback_goes_ahead_once_a_publication_releases_the_lock(base: Path) -> None:
    for v in (1, 2):
        make_version(base, v)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(base), "0.5"],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    started = time.monotonic()
    result = rollback(base, "m", lock_timeout=20)
    assert time.monotonic() - started >= 0.2  # it did wait
    assert result.target == 1 and visible(base) == ["1"]
    holder.wait(timeout=30)


# --- pins -------------------------------------------------------------------


def test_pin_and_unpin(base: Path) -> None:
    for v in (1, 2, 3):
        make_version(base, v)
    make_version(base, 4, model=None)
    assert read_pins(base) == frozenset()

    assert pin_version(base, "m", 2) == {2}
    assert pin_version(base, "m", 2) == {2}  # again: no-op
    assert pin_version(base, "m", 1) == {1, 2}
    assert json.loads((base / ".ckpt-exporter" / "pins.json").read_text()) == [1, 2]
    assert read_pins(base) == {1, 2}
    # What retention does with them: the newest 1 kept, and the pinned ones.
    assert plan_retention([1, 2, 3], keep=1, protected=read_pins(base)) == []

    with pytest.raises(OperationError, match=r"version 9 is not .*\(available: 1, 2, 3\)"):
        pin_version(base, "m", 9)
    with pytest.raises(OperationError, match="version 4 is not a version of model 'm'"):
        pin_version(base, "m", 4)  # foreign
    with pytest.raises(OperationError, match="no version of model 'm'"):
        pin_version(base.parent / "nowhere", "m", 1)
    assert read_pins(base) == {1, 2}

    assert unpin_version(base, "m", 2) == {1}
    with pytest.raises(
        OperationError, match=r"version 2 of model 'm' is not pinned .*\(pinned: 1\)"
    ):
        unpin_version(base, "m", 2)
    assert unpin_version(base, "m", 1) == frozenset()
    assert json.loads((base / ".ckpt-exporter" / "pins.json").read_text()) == []


def test_read_pins_tolerates_garbage(base: Path) -> None:
    state = base / ".ckpt-exporter"
    state.mkdir()
    for text in ("", "{oops", '{"1": 2}', "3"):
        (state / "pins.json").write_text(text)
        assert read_pins(base) == frozenset()
    (state / "pins.json").write_text('[3, "4", true, 5.0, 6]')
    assert read_pins(base) == {3, 6}


def test_rollback_drops_the_pins_of_the_versions_it_moves(base: Path) -> None:
    for v in (1, 2, 3):
        make_version(base, v)
    pin_version(base, "m", 1)
    pin_version(base, "m", 3)
    result = rollback(base, "m", to=1)
    assert read_pins(base) == {1}
    assert any("pins removed" in w and "3" in w for w in result.warnings)


# --- the command line -------------------------------------------------------


def _config(base: Path, **model: Any) -> Path:
    tmp = base.parent.parent
    return write_config(tmp, builder="x:y", base_path=str(base), **model)


def test_cli_rollback_pin_unpin(base: Path) -> None:
    for v in (1, 2, 3):
        make_version(base, v)
    config = str(_config(base))

    r = cli("pin", "--config", config, "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "m: version 2 pinned: retention keeps it (pinned: 2)\n"
    r = cli("pin", "--config", config, "--model", "m", "2")
    assert r.returncode == 0 and "version 2 was already pinned" in r.stdout

    r = cli("rollback", "--config", config)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("m: version 3 moved out of sight to ")
    assert "/x/ckpt-3 will not be exported again" in lines[0]
    assert lines[1] == "m: rolled back to version 2; TF Serving will serve version 2"
    assert visible(base) == ["1", "2"]

    r = cli("rollback", "--config", config, "--to", "2")
    assert r.returncode == 1 and r.stdout == ""
    assert "version 2 is already the newest version of model 'm'" in r.stderr
    assert "Traceback" not in r.stderr

    r = cli("unpin", "--config", config, "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "m: version 2 unpinned: retention may remove it (pinned: none)\n"
    r = cli("unpin", "--config", config, "2")
    assert r.returncode == 1 and "is not pinned" in r.stderr and "Traceback" not in r.stderr
    r = cli("pin", "--config", config, "7")
    assert r.returncode == 1 and "(available: 1, 2)" in r.stderr

    r = cli("rollback", "--config", config, "--model", "nope")
    assert r.returncode == 78 and "--model must be one of m" in r.stderr


def test_status_json_and_table(tmp_path: Path) -> None:
    base, ckpts = tmp_path / "serving" / "m", tmp_path / "ckpts"
    c = {s: make_checkpoint(ckpts, s, T0 + s * 10**9) for s in (1, 2, 3, 4)}
    for v in (1, 2, 3):
        version_of(base, c[v], v)
    (base / "3" / "variables" / "variables.data-00000-of-00001").write_bytes(b"w" * 1000)
    make_version(base, 9, model=None)  # foreign: not "newest version" of ours
    state = base / ".ckpt-exporter"
    state.mkdir()
    (state / "rejected.json").write_text(json.dumps({"a": {}, "b": {}}))
    config = str(write_config(tmp_path, builder="x:y", export_policy="latest"))
    pin_version(base, "m", 1)

    r = cli("status", "--config", config, "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    published_at = json.loads((base / "3" / METADATA_RELPATH).read_text())["published_at"]
    assert row == {
        "model": "m",
        "checkpoint_dir": str(ckpts),
        "base_path": str(base),
        "newest_checkpoint": "ckpt-4",
        "newest_checkpoint_step": 4,
        "newest_version": 3,
        "newest_version_step": 3,
        "pending": 1,  # ckpt-4
        "versions_on_disk": 3,
        "last_publish": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(published_at)),
        "pinned": [1],
        "labels": None,  # no [serving_config]: TF Serving serves the highest version
        "rejected": 2,
        "rolled_back": 0,
        "newest_version_bytes": 100 + 10 + 1000 + (base / "3" / METADATA_RELPATH).stat().st_size,
        "scan_error": None,
    }

    rollback(base, "m", to=1)
    r = cli("status", "--config", config, "--json")
    (row,) = json.loads(r.stdout)
    assert row["newest_version"] == 1 and row["newest_version_step"] == 1
    assert row["versions_on_disk"] == 1 and row["rolled_back"] == 2
    # ckpt-4 was written after the rolled-back ckpt-3, so it is still pending;
    # ckpt-2 and ckpt-3 are not, though neither is published any more.
    assert row["pending"] == 1

    r = cli("status", "--config", config)
    assert r.returncode == 0, r.stderr
    header, line = r.stdout.splitlines()
    assert header.split() == [
        "MODEL",
        "CHECKPOINT",
        "STEP",
        "VERSION",
        "VERSION_STEP",
        "PENDING",
        "VERSIONS",
        "LAST_PUBLISH",
        "PINNED",
        "LABELS",
        "REJECTED",
        "ROLLED_BACK",
        "SIZE",
    ]
    cells = line.split()
    assert cells[:7] == ["m", "ckpt-4", "4", "1", "1", "1", "1"]
    assert cells[7] == row["last_publish"]
    assert cells[8:12] == ["1", "-", "2", "2"]
    assert " ".join(cells[12:]) == f"{row['newest_version_bytes']} B"


def test_status_pending_honours_the_rolled_back_floor(tmp_path: Path) -> None:
    """Status agrees with the daemon: nothing written up to the rolled-back one is pending."""
    base, ckpts = tmp_path / "serving" / "m", tmp_path / "ckpts"
    c1 = make_checkpoint(ckpts, 1, T0 + 1 * 10**9)
    make_checkpoint(ckpts, 15, T0 + 15 * 10**8)  # superseded, never exported
    c2 = make_checkpoint(ckpts, 2, T0 + 2 * 10**9)
    version_of(base, c1, 1)
    version_of(base, c2, 2)
    for policy in ("latest", "all"):
        config = str(write_config(tmp_path, builder="x:y", export_policy=policy))
        (row,) = json.loads(cli("status", "--config", config, "--json").stdout)
        assert row["pending"] == 0, policy
    rollback(base, "m")
    for policy in ("latest", "all"):
        config = str(write_config(tmp_path, builder="x:y", export_policy=policy))
        r = cli("status", "--config", config, "--json")
        assert r.returncode == 0, r.stderr
        (row,) = json.loads(r.stdout)
        assert row["newest_version"] == 1 and row["rolled_back"] == 1
        assert row["pending"] == 0, policy
