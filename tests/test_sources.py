"""The TF2 checkpoint source on real ``tf.train.CheckpointManager`` output.

TensorFlow runs once per session in a subprocess to write the checkpoints;
each test works on its own copy (mtimes preserved) and breaks it the way
trainers and disks do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env

from daemon.sources.tf_checkpoint import (
    STATE_FILE,
    TFCheckpointSource,
    parse_state_file,
    step_from_prefix,
)

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("written")
    subprocess.run(
        [sys.executable, str(HERE / "builders" / "write_checkpoints.py"), str(root)],
        env=child_env(),
        check=True,
        timeout=120,
    )
    return root


@pytest.fixture
def managed(written: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "managed"
    shutil.copytree(written / "managed", dst)
    return dst


def names(directory: Path) -> list[str]:
    return [c.name for c in TFCheckpointSource().scan(directory).checkpoints]


def test_finds_every_complete_checkpoint_in_write_order(managed: Path) -> None:
    result = TFCheckpointSource().scan(managed)
    assert [c.name for c in result.checkpoints] == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert [c.step for c in result.checkpoints] == [1, 2, 3]
    assert result.incomplete == [] and result.problems == []
    first = result.checkpoints[0]
    assert {p.name for p in first.files} == {"ckpt-1.index", "ckpt-1.data-00000-of-00001"}
    assert first.prefix == managed / "ckpt-1"
    assert len({c.fingerprint for c in result.checkpoints}) == 3


def test_missing_data_shard_means_incomplete(managed: Path) -> None:
    (managed / "ckpt-2.data-00000-of-00001").unlink()
    result = TFCheckpointSource().scan(managed)
    assert [c.name for c in result.checkpoints] == ["ckpt-1", "ckpt-3"]
    assert result.incomplete == ["ckpt-2"]


def test_shards_written_but_index_not_yet_merged_means_incomplete(managed: Path) -> None:
    # TensorFlow writes the shards first and the merged .index last.
    (managed / "ckpt-3.index").unlink()
    result = TFCheckpointSource().scan(managed)
    assert [c.name for c in result.checkpoints] == ["ckpt-1", "ckpt-2"]
    assert "ckpt-3" in result.incomplete


def test_missing_shard_of_a_multi_shard_checkpoint(managed: Path) -> None:
    os.rename(managed / "ckpt-3.data-00000-of-00001", managed / "ckpt-3.data-00000-of-00002")
    assert "ckpt-3" not in names(managed)
    (managed / "ckpt-3.data-00001-of-00002").write_bytes(b"")
    assert "ckpt-3" in names(managed)


def test_shards_disagreeing_on_their_count_are_a_problem(managed: Path) -> None:
    (managed / "ckpt-3.data-00001-of-00002").write_bytes(b"")
    result = TFCheckpointSource().scan(managed)
    assert "ckpt-3" not in [c.name for c in result.checkpoints]
    assert any("ckpt-3" in p and "disagree" in p for p in result.problems)


def test_bare_index_files_without_a_state_file(managed: Path) -> None:
    (managed / STATE_FILE).unlink()
    assert names(managed) == ["ckpt-1", "ckpt-2", "ckpt-3"]


def test_state_file_naming_a_deleted_checkpoint(managed: Path) -> None:
    # max_to_keep: the state file can still list a prefix whose files are gone.
    for f in managed.glob("ckpt-1.*"):
        f.unlink()
    result = TFCheckpointSource().scan(managed)
    assert [c.name for c in result.checkpoints] == ["ckpt-2", "ckpt-3"]
    assert result.incomplete == ["ckpt-1"]


def test_garbage_files_and_directories_are_ignored(managed: Path) -> None:
    (managed / "notes.txt").write_text("hello")
    (managed / "ckpt-9.tmp").mkdir()
    (managed / "events.out.tfevents.1").write_bytes(b"\0" * 10)
    (managed / "orphan.data-00000-of-00001").write_bytes(b"x")
    assert names(managed) == ["ckpt-1", "ckpt-2", "ckpt-3"]


def test_directory_that_does_not_exist_yet(tmp_path: Path) -> None:
    result = TFCheckpointSource().scan(tmp_path / "not-yet")
    assert result.directory_exists is False
    assert result.checkpoints == [] and result.problems == []


def test_a_file_instead_of_a_directory_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    result = TFCheckpointSource().scan(tmp_path / "f")
    assert result.checkpoints == []
    assert result.problems and "not a directory" in result.problems[0]


def test_fingerprint_is_stable_and_follows_the_contents(written: Path, managed: Path) -> None:
    source = TFCheckpointSource()
    before = {c.name: c.fingerprint for c in source.scan(managed).checkpoints}
    again = {c.name: c.fingerprint for c in source.scan(managed).checkpoints}
    fresh = {c.name: c.fingerprint for c in TFCheckpointSource().scan(managed).checkpoints}
    assert before == again == fresh

    # A trainer restarted from scratch writes a new ckpt-1 with other values:
    # same name, different fingerprint, so it is a new checkpoint.
    for f in managed.glob("ckpt-1.*"):
        f.unlink()
    for f in (written / "restarted").glob("ckpt-1.*"):
        shutil.copy2(f, managed / f.name)
    after = {c.name: c.fingerprint for c in source.scan(managed).checkpoints}
    assert after["ckpt-1"] != before["ckpt-1"]
    assert after["ckpt-2"] == before["ckpt-2"]


def test_write_time_orders_checkpoints_not_the_step(managed: Path) -> None:
    # A restarted trainer's ckpt-1 is newer than the old ckpt-3.
    newest = max(p.stat().st_mtime_ns for p in managed.iterdir()) + 10**9
    for f in managed.glob("ckpt-1.*"):
        os.utime(f, ns=(newest, newest))
    assert names(managed) == ["ckpt-2", "ckpt-3", "ckpt-1"]


def test_plain_write_without_suffix_or_state_file(written: Path) -> None:
    result = TFCheckpointSource().scan(written / "plain")
    assert [(c.name, c.step) for c in result.checkpoints] == [("model", None)]


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("ckpt-1200", 1200),
        ("ckpt-0", 0),
        ("model.ckpt-7", 7),
        ("ckpt", None),
        ("ckpt-", None),
        ("ckpt-12a", None),
        ("ckpt-1-2", 2),
        ("weights_5", None),
    ],
)
def test_step_from_prefix(name: str, step: int | None) -> None:
    assert step_from_prefix(name) == step


def test_parse_state_file() -> None:
    text = (
        'model_checkpoint_path: "ckpt-3"\n'
        'all_model_checkpoint_paths: "ckpt-1"\n'
        'all_model_checkpoint_paths: "ckpt-2"\n'
        'all_model_checkpoint_paths: "ckpt-3"\n'
        "all_model_checkpoint_timestamps: 1700000000.5\n"
        "last_preserved_timestamp: 1699999999.0\n"
        'all_model_checkpoint_paths: "dir with \\"quotes\\"/ckpt-4"\n'
        "garbage line\n"
    )
    assert parse_state_file(text) == ["ckpt-3", "ckpt-1", "ckpt-2", 'dir with "quotes"/ckpt-4']


def test_state_file_entries_in_other_directories_are_not_ours(managed: Path) -> None:
    (managed / STATE_FILE).write_text(
        'model_checkpoint_path: "/elsewhere/ckpt-50"\n'
        f'all_model_checkpoint_paths: "{managed}/ckpt-3"\n'
    )
    result = TFCheckpointSource().scan(managed)
    assert [c.name for c in result.checkpoints] == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert "ckpt-50" not in result.incomplete


def test_an_index_still_being_written_is_incomplete(managed: Path) -> None:
    # A restarted trainer rewrites ckpt-3.index in place: a prefix of the file
    # has no table footer yet.
    index = managed / "ckpt-3.index"
    whole = index.read_bytes()
    index.write_bytes(whole[: len(whole) // 2])
    result = TFCheckpointSource().scan(managed)
    assert [c.name for c in result.checkpoints] == ["ckpt-1", "ckpt-2"]
    assert result.incomplete == ["ckpt-3"]
    index.write_bytes(whole)
    assert names(managed) == ["ckpt-1", "ckpt-2", "ckpt-3"]
