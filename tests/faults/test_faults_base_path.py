"""Fault rows 5, 6, 9 and 10: what can happen to the base path (and the checkpoint dir).

- ``version_policy = "step"`` and a trainer restarted from scratch: refused,
  never a lower version; odd names in the base path: the next version is the
  one TF Serving would compute, and nothing foreign is touched (row 5);
- two daemons on one base path: one publisher at a time, no number or
  checkpoint twice (row 6);
- a full disk during an export (row 9);
- folders that cannot be read or written, or are removed and recreated (row 10).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import child_env, train, version_dirs, write_config
from faultkit import (
    Kit,
    copy_checkpoint,
    drop_dac_capabilities,
    kit_for,
    metadata,
    state_children,
    temp_dirs,
    tree_digest,
)

from daemon import exitcodes
from daemon.basepath.catalog import scan_base_path
from daemon.rules.versions import next_version
from daemon.sources.tf_checkpoint import TFCheckpointSource

pytestmark = pytest.mark.faults


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    with kit_for(tmp_path) as k:
        yield k


def _fingerprints(base: Path) -> dict[int, str]:
    return {v: metadata(p)["checkpoint"]["fingerprint"] for v, p in version_dirs(base).items()}


# --- row 5 ---------------------------------------------------------------------


def test_step_policy_refuses_a_restarted_trainer_and_never_goes_lower(
    tmp_path: Path, kit: Kit
) -> None:
    ckpts = tmp_path / "ckpts"
    base = tmp_path / "serving" / "m"
    train(ckpts, 1)  # ckpt-5
    d = kit.daemon(write_config(tmp_path, version_policy="step", export_policy="all"))
    assert d.wait_event("published")["version"] == 5
    first = _fingerprints(base)[5]

    train(ckpts, 2, seed=1)  # from scratch: a new ckpt-5 (new weights), then ckpt-10
    refused = d.wait_event("export_rejected")
    assert (refused["reason"], refused["phase"], refused["permanent"]) == (
        "version_refused",
        "publish",
        True,
    )
    assert refused["checkpoint"] == str(ckpts / "ckpt-5")
    assert "step 5 is not above the highest version 5" in refused["error"]
    assert 'version_policy = "increment"' in refused["error"]  # says what to do
    assert d.wait_event("published", n=2)["version"] == 10
    assert [e["version"] for e in d.named("published")] == [5, 10]
    assert sorted(version_dirs(base)) == [5, 10]
    assert _fingerprints(base)[5] == first  # the old version 5 is untouched
    assert temp_dirs(base) == []
    assert d.stop() == 0


def test_odd_names_count_as_tf_serving_reads_them_and_are_never_touched(
    tmp_path: Path, kit: Kit
) -> None:
    base = tmp_path / "serving" / "m"
    base.mkdir(parents=True)
    for name in ("001", "+7", " 12", "-5", "1e3", "7.tmp"):
        (base / name).mkdir()
        (base / name / "saved_model.pb").write_text(f"foreign {name!r}\n")
    (base / "9").write_text("a file named 9\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "saved_model.pb").write_text("not ours\n")
    (base / "3").symlink_to(elsewhere, target_is_directory=True)
    before = {**tree_digest(base), **tree_digest(elsewhere)}
    foreign = sorted(p.name for p in base.iterdir())

    # absl::SimpleAtoi: 001 -> 1, +7 -> 7, " 12" -> 12, -5 -> -5, 9 -> 9, 3 -> 3;
    # "1e3" and "7.tmp" are not versions. Highest 12, so the next is 13.
    assert sorted(e.version for e in scan_base_path(base)) == [-5, 1, 3, 7, 9, 12]
    assert next_version(e.version for e in scan_base_path(base)) == 13

    train(tmp_path / "ckpts", 2)
    d = kit.daemon(write_config(tmp_path, export_policy="all", keep_versions=1))
    d.wait_event("published", n=2)
    assert [e["version"] for e in d.named("published")] == [13, 14]
    d.wait_event("version_removed")  # retention runs right after the second one
    assert d.stop() == 0
    assert [e["version"] for e in d.named("version_removed")] == [13]  # its own, only

    after = {**tree_digest(base), **tree_digest(elsewhere)}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing foreign changed
    assert set(before) <= set(after)  # nor deleted
    assert sorted(p.name for p in base.iterdir()) == sorted([*foreign, "14", ".ckpt-exporter"])


# --- row 6 ---------------------------------------------------------------------


def test_two_daemons_on_one_base_path_publish_each_checkpoint_once(
    tmp_path: Path, kit: Kit
) -> None:
    ckpts = tmp_path / "ckpts"
    base = tmp_path / "serving" / "m"
    train(ckpts, 1)
    config = write_config(tmp_path, export_policy="all", keep_versions=0)

    # Hold the publication lock ourselves: neither daemon may publish meanwhile.
    lock = base / ".ckpt-exporter" / "lock"
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    a = kit.daemon(config, "a")
    a.wait_event("export_started")
    b = kit.daemon(config, "b")  # starts while a exports: must not disturb it
    for d in (a, b):
        waiting = d.wait_event("waiting_for_lock", timeout=120)
        assert waiting["held_by_pid"] == str(os.getpid()) and waiting["lock"] == str(lock)
    assert version_dirs(base) == {}
    os.close(fd)  # releases the lock

    def counts(*names: str) -> int:
        return sum(d.count(n) for d in (a, b) for n in names)

    a.wait_for(lambda _ev: counts("published", "already_published") == 2, what="both done")
    assert counts("published") == 1 and counts("already_published") == 1
    assert sorted(version_dirs(base)) == [1]

    # Now a race with no help: a restarted trainer writes a new ckpt-5.
    train(ckpts, 1, seed=1)
    wanted = {c.fingerprint for c in TFCheckpointSource().scan(ckpts).checkpoints}
    wanted |= set(_fingerprints(base).values())
    assert len(wanted) == 2
    a.wait_for(lambda _ev: set(_fingerprints(base).values()) == wanted, what="all published")
    for d in (a, b):
        d.wait_for(
            lambda _ev, d=d: d.metric("ckpt_exporter_pending_checkpoints", model="m") == 0,
            what="the daemon idle",
        )
    assert a.stop() == 0 and b.stop() == 0

    versions = [e["version"] for d in (a, b) for e in d.named("published")]
    assert sorted(versions) == [1, 2]  # no number used twice
    assert sorted(_fingerprints(base)) == [1, 2]
    assert len(set(_fingerprints(base).values())) == 2  # no checkpoint twice
    for d in (a, b):  # the second daemon's start did not break the first one's export
        assert d.count("export_failed") == 0 and d.count("export_rejected") == 0
    assert temp_dirs(base) == [] and state_children(base, "staging") == []


# --- row 9 ---------------------------------------------------------------------


def _mount_tmpfs(kit: Kit, where: Path, size: str) -> None:
    where.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {r.stderr}")
    kit.mounts.append(where)


def _fill(fs: Path, leave: int) -> Path:
    """A file that leaves about ``leave`` bytes free on the filesystem of ``fs``."""
    st = os.statvfs(fs)
    filler = fs / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave))
    return filler


def test_disk_full_during_export_is_retried_when_space_returns(tmp_path: Path, kit: Kit) -> None:
    train(tmp_path / "ckpts", 1)
    mount = tmp_path / "serving"
    _mount_tmpfs(kit, mount, "8m")
    base = mount / "m"
    (base / ".ckpt-exporter").mkdir(parents=True)
    # Enough for pinning the checkpoint and the request, not for the SavedModel.
    filler = _fill(mount, 40 * 1024)
    d = kit.daemon(write_config(tmp_path, export_policy="latest"))
    failures = [d.wait_event("export_failed", n=n) for n in (1, 2)]
    for n, f in enumerate(failures, 1):
        assert (f["phase"], f["reason"], f["permanent"]) == ("export", "no_space", False), f
        assert str(base) in f["error"], f  # names where space is missing
        assert (f["attempt"], f["retry_in_seconds"]) == (n, 2 ** (n - 1))
        assert "kept_at" not in f  # a half-written export is not kept on a full disk
    assert version_dirs(base) == {}
    assert temp_dirs(base) == [] and state_children(base, "failed") == []

    filler.unlink()
    pub = d.wait_event("published")
    assert pub["version"] == 1
    # One error line per failed attempt, nothing else at error level.
    errors = [e for e in d.events() if e.get("level") == "error"]
    assert [e["event"] for e in errors] == ["export_failed"] * len(errors)
    assert len(errors) == d.count("export_started") - 1
    assert d.count("export_rejected") == 0
    assert d.stop() == 0
    assert temp_dirs(base) == []


def test_worker_reports_a_full_disk_as_transient_naming_the_file(tmp_path: Path, kit: Kit) -> None:
    """TensorFlow raises ResourceExhaustedError, not OSError, for ENOSPC: still transient."""
    ckpts = tmp_path / "ckpts"
    train(ckpts, 1)
    mount = tmp_path / "full"
    _mount_tmpfs(kit, mount, "1m")
    _fill(mount, 8 * 1024)
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "builder": "daemon.demo.model:build_model",
                "python_path": [],
                "checkpoint_key": "model",
                "checkpoint": str(ckpts / "ckpt-5"),
                "export_dir": str(mount / "export"),
                "reference": str(tmp_path / "reference.npz"),
                "allow_gpu": False,
                "signature": [],
                "result": str(tmp_path / "result.json"),  # on a disk with space
            }
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "daemon.children.worker", str(request)],
        env=child_env(),
        capture_output=True,
        timeout=300,
        check=False,
    )
    result = json.loads((tmp_path / "result.json").read_text())
    assert r.returncode == exitcodes.TRANSIENT_FAILURE, result
    assert (result["reason"], result["permanent"]) == ("no_space", False), result
    assert str(mount / "export") in result["error"], result


# --- row 10 --------------------------------------------------------------------


def test_unreadable_unwritable_and_recreated_folders(tmp_path: Path, kit: Kit) -> None:
    # As root, file modes bind nobody: run the daemon without the capabilities that
    # bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), as a normal user would be.
    preexec = drop_dac_capabilities if os.geteuid() == 0 else None
    source = tmp_path / "trained"
    train(source, 3)  # ckpt-5, ckpt-10, ckpt-15, fed in one by one
    ckpts = tmp_path / "ckpts"
    base = tmp_path / "serving" / "m"
    copy_checkpoint(source, "ckpt-5", ckpts)
    kit.chmod(ckpts, 0o000)
    config = write_config(tmp_path, export_policy="all", keep_versions=0)
    try:
        d = kit.daemon(config, preexec_fn=preexec)
    except subprocess.SubprocessError as e:  # root without CAP_SETPCAP (a locked container)
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE for the daemon: {e}")

    # 1. The checkpoint dir cannot be read: one clear error, the daemon keeps scanning.
    err = d.wait_event("scan_failed")
    assert err["path"] == str(ckpts) and "Permission denied" in err["error"], err
    d.wait_for(
        lambda _ev: (d.metric("ckpt_exporter_scan_errors_total", model="m") or 0) >= 3,
        what="three failed scans",
    )
    assert d.count("scan_failed") == 1
    ckpts.chmod(0o755)
    assert d.wait_event("published")["version"] == 1

    # 2. The base path cannot be read, then cannot be written: each attempt fails
    #    naming it and is retried; fixed, the checkpoint is published.
    kit.chmod(base, 0o000)
    copy_checkpoint(source, "ckpt-10", ckpts)
    f = d.wait_event("export_failed", n=1)
    base.chmod(0o555)  # well before the retry, 1 s later
    assert (f["reason"], f["permanent"]) == ("pin_failed", False), f
    assert str(base) in f["error"] and "Permission denied" in f["error"], f
    f = d.wait_event("export_failed", n=2)
    base.chmod(0o755)
    assert (f["reason"], f["permanent"]) == ("temp_dir_failed", False), f
    assert str(base) in f["error"] and "Permission denied" in f["error"], f
    assert d.wait_event("published", n=2)["version"] == 2
    assert d.count("export_failed") == 2 and d.count("export_rejected") == 0

    # 3. Both folders removed, then recreated: the daemon waits, then carries on.
    shutil.rmtree(ckpts)
    shutil.rmtree(base)
    gone = d.wait_event("waiting_for_checkpoint_dir")
    assert gone["path"] == str(ckpts)
    copy_checkpoint(source, "ckpt-15", ckpts)
    pub = d.wait_event("published", n=3)
    assert pub["checkpoint"] == str(ckpts / "ckpt-15")
    assert sorted(version_dirs(base)) == [pub["version"]]
    assert d.proc.poll() is None and d.count("started") == 1
    assert d.stop() == 0
    assert temp_dirs(base) == []
