"""The saved_model source: its scanner on real directories, and the daemon on real SavedModels."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, run_script, version_dirs, write_config

from daemon.config.loading import ConfigError, parse_config
from daemon.sources.saved_model import SavedModelSource

HOUR_AGO = time.time() - 3600


def saved_model(
    root: Path, name: str, *, age: float | None = HOUR_AGO, index: bytes = b"i"
) -> Path:
    """A folder shaped like a SavedModel; ``age`` None leaves the mtimes at now."""
    folder = root / name
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "variables.index").write_bytes(index)
    (folder / "variables" / "variables.data-00000-of-00001").write_bytes(b"data")
    if age is not None:
        for path in folder.rglob("*"):
            os.utime(path, (age, age))
    return folder


def test_settled_savedmodel_folders_are_candidates_in_write_order(tmp_path: Path) -> None:
    saved_model(tmp_path, "1700000200", age=HOUR_AGO + 10)
    saved_model(tmp_path, "1700000100", age=HOUR_AGO)
    saved_model(tmp_path, "epoch-7", age=HOUR_AGO + 20)
    result = SavedModelSource().scan(tmp_path)
    assert [c.name for c in result.checkpoints] == ["1700000100", "1700000200", "epoch-7"]
    assert [c.step for c in result.checkpoints] == [1700000100, 1700000200, 7]
    first = result.checkpoints[0]
    assert sorted(p.relative_to(first.prefix).as_posix() for p in first.files) == [
        "saved_model.pb",
        "variables/variables.data-00000-of-00001",
        "variables/variables.index",
    ]
    assert result.incomplete == [] and result.problems == []


def test_a_tree_still_changing_waits_for_the_settle_time(tmp_path: Path) -> None:
    saved_model(tmp_path, "1", age=None)
    result = SavedModelSource({"settle_seconds": 30}).scan(tmp_path)
    assert result.checkpoints == [] and result.incomplete == ["1"]
    assert result.recheck_at is not None and 25 < result.recheck_at - time.time() <= 30
    assert [c.name for c in SavedModelSource({"settle_seconds": 0}).scan(tmp_path).checkpoints] == [
        "1"
    ]


def test_with_a_marker_only_marked_folders_count(tmp_path: Path) -> None:
    saved_model(tmp_path, "1")
    marked = saved_model(tmp_path, "2", age=None)
    (marked / "commit_success.txt").write_text("")
    result = SavedModelSource({"marker": "commit_success.txt"}).scan(tmp_path)
    assert [c.name for c in result.checkpoints] == ["2"]  # the marker, not the age, decides
    assert result.incomplete == ["1"] and result.recheck_at is None


def test_temporary_hidden_and_foreign_entries_are_not_candidates(tmp_path: Path) -> None:
    saved_model(tmp_path, "temp-1700000000")  # TensorFlow's exporters rename these when done
    saved_model(tmp_path, ".partial")
    (tmp_path / "logs").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"a file at the top is not a folder")
    result = SavedModelSource().scan(tmp_path)
    assert result.checkpoints == [] and result.incomplete == [] and result.problems == []
    assert SavedModelSource().scan(tmp_path / "absent").directory_exists is False


def test_the_fingerprint_follows_the_contents(tmp_path: Path) -> None:
    a = saved_model(tmp_path / "a", "1", index=b"one")
    saved_model(tmp_path / "b", "1", index=b"one")
    saved_model(tmp_path / "c", "1", index=b"two")
    source = SavedModelSource()
    fp = {d: source.scan(tmp_path / d).checkpoints[0].fingerprint for d in "abc"}
    assert fp["a"] == fp["b"] != fp["c"]
    # Rewritten in place with new weights of the same size: a new candidate.
    (a / "variables" / "variables.index").write_bytes(b"new")
    os.utime(a / "variables" / "variables.index", (HOUR_AGO + 5, HOUR_AGO + 5))
    assert source.scan(tmp_path / "a").checkpoints[0].fingerprint != fp["a"]


def _model(**keys: object) -> dict[str, object]:
    return {"name": "m", "checkpoint_dir": "/train/m", "base_path": "/serve/m", **keys}


def test_config_takes_its_options_and_refuses_a_builder() -> None:
    cfg = parse_config(
        {"models": [_model(source="saved_model", saved_model={"marker": "_SUCCESS"})]},
        "t.toml",
        Path("/"),
    )
    assert cfg.models[0].options == {"marker": "_SUCCESS", "settle_seconds": 5.0}
    with pytest.raises(ConfigError) as e:
        parse_config(
            {"models": [_model(source="saved_model", builder="x:y", saved_model={"settle": 1})]},
            "t.toml",
            Path("/"),
        )
    text = "\n".join(e.value.problems)
    assert "models[0] (m).saved_model.settle: unknown key" in text


#: Two SavedModels of the demo model, as a trainer exporting per epoch would
#: write them: "1" with Keras' model.export() (serves), "2" with
#: tf.saved_model.save (loads in TF2, fails in TF Serving: tensorflow/serving#2250).
_WRITE = """
import sys, keras, tensorflow as tf
from daemon.demo.model import build_model
model = build_model()
model.export(sys.argv[1] + "/1", verbose=False)
@tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
def serve(x):
    return {"y": model(x)}
tf.saved_model.save(model, sys.argv[1] + "/2", signatures={"serving_default": serve})
"""


@pytest.mark.e2e
def test_published_when_tf_serving_can_load_it_rejected_when_only_tf2_can(
    tmp_path: Path, daemons: Any
) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    run_script(_WRITE, str(ckpts))
    config = write_config(tmp_path, builder="", source="saved_model")
    config.write_text(config.read_text() + "\n[models.saved_model]\nsettle_seconds = 1\n")
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    d.wait_for(
        lambda ev: (
            any(e["event"] == "published" for e in ev)
            and any(e["event"] == "export_rejected" for e in ev)
        ),
        what="one published, one rejected",
    )
    base = tmp_path / "serving" / "m"
    versions = version_dirs(base)
    assert sorted(versions) == [1]
    assert (versions[1] / "saved_model.pb").read_bytes() == (
        ckpts / "1" / "saved_model.pb"
    ).read_bytes()
    rejected = next(e for e in d.events() if e["event"] == "export_rejected")
    assert rejected["checkpoint"] == str(ckpts / "2") and rejected["phase"] == "validate"
    assert "Could not find variable" in rejected["error"], rejected
    assert d.stop() == 0
    # The trainer's folders are untouched.
    assert not (ckpts / "1" / "assets.extra").exists()
