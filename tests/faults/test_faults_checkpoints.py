"""Fault rows 4, 7 and 8: what the checkpoint directory can hold, lose, or flood.

- broken checkpoints and garbage beside good ones: each bad one is skipped with
  one message, the good ones are exported (row 4);
- the trainer deletes a checkpoint while it is exported: the pinned copy is
  exported anyway (row 7);
- 1,000 checkpoints appear while the daemon is down: ``latest`` exports only
  the newest, ``all`` works through them in order with bounded memory (row 8).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import child_env, train, version_dirs, write_config
from faultkit import HERE, Kit, kit_for, metadata, temp_dirs

from daemon.sources.tf_checkpoint import TFCheckpointSource

pytestmark = pytest.mark.faults


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Kit]:
    with kit_for(tmp_path) as k:
        yield k


def _set_mtime(paths: list[Path], ns: int) -> None:
    for p in paths:
        os.utime(p, ns=(ns, ns))


def test_broken_and_foreign_files_are_skipped_once_and_good_checkpoints_exported(
    tmp_path: Path, kit: Kit
) -> None:
    ckpts = tmp_path / "ckpts"
    train(ckpts, 3)  # ckpt-5, ckpt-10, ckpt-15 and the `checkpoint` state file
    good = {c.name: c for c in TFCheckpointSource().scan(ckpts).checkpoints}
    assert sorted(good) == ["ckpt-10", "ckpt-15", "ckpt-5"]
    t5, t10 = good["ckpt-5"].written_ns, good["ckpt-10"].written_ns

    # A truncated data shard (the index is intact: only restoring can tell).
    shard = ckpts / "ckpt-10.data-00000-of-00001"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    _set_mtime([shard], t10)
    # Garbage under checkpoint names: random bytes, so the index has no table
    # footer and never counts as complete.
    junk = [ckpts / "junk-7.index", ckpts / "junk-7.data-00000-of-00001"]
    for p in junk:
        p.write_bytes(os.urandom(700))
    _set_mtime(junk, (t5 + t10) // 2)
    # An index without its data, a state file naming a deleted checkpoint.
    shutil.copy(ckpts / "ckpt-5.index", ckpts / "orphan-3.index")
    with (ckpts / "checkpoint").open("a") as f:
        f.write('all_model_checkpoint_paths: "ckpt-1"\n')
    # Garbage files and folders, one folder wearing a checkpoint name.
    (ckpts / "notes.txt").write_text("not a checkpoint\n")
    (ckpts / "events.out.tfevents.1.host").write_bytes(os.urandom(64))
    (ckpts / "ckpt-20.data-00000-of-00001").write_bytes(b"")  # data, no index yet
    (ckpts / "tensorboard" / "train").mkdir(parents=True)
    (ckpts / "ckpt-99.index").mkdir()
    (ckpts / "ckpt-30_temp").mkdir()  # what an interrupted TF save leaves
    (ckpts / "ckpt-30_temp" / "part-00000-of-00001.index").write_bytes(b"x")

    base = tmp_path / "serving" / "m"
    config = write_config(tmp_path, export_policy="all")
    d = kit.daemon(config)
    d.wait_event("published", n=2)
    d.wait_for(
        lambda _ev: d.metric("ckpt_exporter_pending_checkpoints", model="m") == 0,
        what="a scan after the last publication",
    )

    # Good checkpoints exported, in write order.
    versions = version_dirs(base)
    assert sorted(versions) == [1, 2]
    assert [metadata(versions[v])["checkpoint"]["prefix"] for v in (1, 2)] == [
        str(ckpts / "ckpt-5"),
        str(ckpts / "ckpt-15"),
    ]
    # The unreadable one: rejected for good, once, naming the checkpoint.
    rejected = {Path(e["checkpoint"]).name: e for e in d.named("export_rejected")}
    assert sorted(rejected) == ["ckpt-10"], d.named("export_rejected")
    for name, e in rejected.items():
        assert e["reason"] == "checkpoint_corrupt", e
        assert name in e["error"] and "cannot be read" in e["error"], e
    # The incomplete ones: skipped with one message each (once they stayed so for
    # INCOMPLETE_REPORT_SECONDS, which the exports may take less than), despite
    # several scans: rescan_interval_seconds is 1, so 3 s more means 3 more scans.
    d.wait_for(lambda _ev: d.count("checkpoint_incomplete") >= 4, what="4 incomplete reports")
    time.sleep(3)
    incomplete = [Path(e["checkpoint"]).name for e in d.named("checkpoint_incomplete")]
    assert sorted(incomplete) == ["ckpt-1", "ckpt-99", "junk-7", "orphan-3"], incomplete
    # Everything else: silently ignored (not a checkpoint), nothing exported twice.
    assert d.count("export_started") == 3
    assert d.count("export_failed") == 0
    assert temp_dirs(base) == []

    # A restart neither retries the rejected nor repeats the published.
    assert d.stop() == 0
    d2 = kit.daemon(config, "daemon2")
    # Reported by a scan at least 5 s after the first one, which would have
    # started any export at once: none was.
    d2.wait_for(lambda _ev: d2.count("checkpoint_incomplete") == 4, what="a later scan")
    assert d2.count("export_started") == 0 and d2.count("export_rejected") == 0
    assert d2.stop() == 0


def test_checkpoint_deleted_during_its_export_is_exported_from_the_pinned_copy(
    tmp_path: Path, kit: Kit
) -> None:
    ckpts = tmp_path / "ckpts"
    train(ckpts, 1)
    (ckpt,) = TFCheckpointSource().scan(ckpts).checkpoints
    base = tmp_path / "serving" / "m"
    d = kit.daemon(write_config(tmp_path, export_policy="latest"))
    started = d.wait_event("export_started")
    assert started["pinned_by"] == "link"
    for p in ckpt.files:  # what the trainer's max_to_keep does
        p.unlink()
    pub = d.wait_event("published")
    assert pub["checkpoint"] == str(ckpt.prefix) and pub["version"] == 1
    assert not any(p.exists() for p in ckpt.files)
    meta = metadata(version_dirs(base)[1])
    assert meta["checkpoint"]["fingerprint"] == ckpt.fingerprint
    assert d.count("export_failed") == 0 and d.count("export_started") == 1
    assert d.stop() == 0
    assert temp_dirs(base) == []


def test_a_burst_of_1000_checkpoints_while_down(tmp_path: Path, kit: Kit) -> None:
    ckpts = tmp_path / "ckpts"
    subprocess.run(
        [sys.executable, str(HERE / "fault_models.py"), str(ckpts), "1000"],
        env=child_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    scan = TFCheckpointSource().scan(ckpts).checkpoints
    assert [c.name for c in scan] == [f"ckpt-{i}" for i in range(1, 1001)]
    assert len({c.fingerprint for c in scan}) == 1000  # 1,000 different checkpoints

    def config(policy: str) -> Path:
        root = tmp_path / policy
        root.mkdir()
        return write_config(
            root,
            checkpoint_dir=str(ckpts),
            builder="fault_models:scale",
            python_path=[str(HERE)],
            export_policy=policy,
            keep_versions=0,
        )

    latest = kit.daemon(config("latest"), "latest")
    every = kit.daemon(config("all"), "all")

    # "latest": one export, of the newest; the other 999 are superseded.
    pub = latest.wait_event("published", timeout=180)
    assert pub["checkpoint"] == str(ckpts / "ckpt-1000") and pub["version"] == 1
    latest.wait_for(
        lambda _ev: latest.metric("ckpt_exporter_pending_checkpoints", model="m") == 0,
        what="a scan after the publication",
    )
    assert [e["checkpoint"] for e in latest.named("export_started")] == [str(ckpts / "ckpt-1000")]
    assert latest.named("checkpoints_superseded")[0]["count"] == 999
    # Idle, it only rescans 2,000 files every second: a CPU budget, not a timing.
    # (Its own reads once made every scan trigger the next: a core burnt while idle.)
    cpu = latest.cpu_seconds()
    time.sleep(3)
    assert latest.cpu_seconds() - cpu < 0.6
    assert latest.stop() == 0

    # "all": in write order, one after another, with bounded memory.
    every.wait_event("export_started")
    rss_first = every.rss_kib()
    every.wait_event("published", n=2, timeout=180)
    rss_later = every.rss_kib()
    # How many more it exported meanwhile depends on the machine's speed;
    # the order does not: write order, no gap, one export at a time.
    started: list[Any] = [Path(e["checkpoint"]).name for e in every.named("export_started")]
    versions = [e["version"] for e in every.named("published")]  # read after: never fewer
    assert started == [f"ckpt-{i}" for i in range(1, len(started) + 1)]
    assert versions == list(range(1, len(versions) + 1)) and len(versions) >= 2
    assert len(started) <= len(versions) + 1
    pending = every.metric("ckpt_exporter_pending_checkpoints", model="m")
    started_by_now = len(every.named("export_started"))  # read after: never fewer
    assert pending is not None and 1000 - started_by_now <= pending <= 999
    print(f"daemon RSS: {rss_first} KiB at the first export, {rss_later} KiB after two")
    assert rss_later < 300 * 1024 and rss_later - rss_first < 64 * 1024
    assert every.stop() == 0  # lets a third export under way finish (grace period)
    base = tmp_path / "all" / "serving" / "m"
    prefixes = [metadata(p)["checkpoint"]["prefix"] for _v, p in sorted(version_dirs(base).items())]
    assert prefixes == [str(ckpts / f"ckpt-{i}") for i in range(1, len(prefixes) + 1)]
    assert len(prefixes) >= len(versions)
