"""The keras source: its scanner on real files, and the daemon on real Keras saves."""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, run_script, version_dirs, write_config

from daemon.config.loading import ConfigError, parse_config
from daemon.sources.keras_file import KerasFileSource

HOUR_AGO = time.time() - 3600


def archive(path: Path, *, age: float | None = HOUR_AGO, payload: str = "{}") -> Path:
    """A zip shaped like a .keras archive; ``age`` None leaves its mtime at now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", payload)
        z.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    if age is not None:
        os.utime(path, (age, age))
    return path


def test_settled_archives_are_candidates_with_the_step_from_their_name(tmp_path: Path) -> None:
    archive(tmp_path / "model-epoch-12.keras", age=HOUR_AGO + 10)
    archive(tmp_path / "model-epoch-3.keras", age=HOUR_AGO)
    (tmp_path / "notes.txt").write_text("not matched by the pattern")
    result = KerasFileSource().scan(tmp_path)
    assert [(c.name, c.step) for c in result.checkpoints] == [
        ("model-epoch-3.keras", 3),
        ("model-epoch-12.keras", 12),
    ]
    assert result.checkpoints[0].files == (tmp_path / "model-epoch-3.keras",)
    custom = KerasFileSource({"step_regex": r"epoch-(\d+)", "pattern": "*-12.keras"})
    assert [c.step for c in custom.scan(tmp_path).checkpoints] == [12]


def test_a_file_being_written_is_waited_for_and_a_corrupt_one_is_named(tmp_path: Path) -> None:
    # A whole archive counts at once, without settle_seconds; one cut short is waited for.
    archive(tmp_path / "whole.keras", age=None)
    data = (tmp_path / "whole.keras").read_bytes()
    (tmp_path / "new.keras").write_bytes(data[: len(data) - 1])
    (tmp_path / "broken.keras").write_bytes(b"PK\x03\x04 truncated")
    os.utime(tmp_path / "broken.keras", (HOUR_AGO, HOUR_AGO))
    result = KerasFileSource({"settle_seconds": 30}).scan(tmp_path)
    assert [c.name for c in result.checkpoints] == ["whole.keras"]
    assert result.incomplete == ["new.keras"]
    assert result.recheck_at is not None and 25 < result.recheck_at - time.time() <= 30
    (problem,) = result.problems
    assert problem.startswith(f"{tmp_path / 'broken.keras'}: not a readable .keras archive")


def test_h5_files_need_the_hdf5_signature(tmp_path: Path) -> None:
    good = tmp_path / "w-1.weights.h5"
    good.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    (tmp_path / "w-2.weights.h5").write_bytes(b"garbage")
    for p in tmp_path.iterdir():
        os.utime(p, (HOUR_AGO, HOUR_AGO))
    result = KerasFileSource({"pattern": "*.weights.h5"}).scan(tmp_path)
    assert [c.name for c in result.checkpoints] == ["w-1.weights.h5"]
    assert result.problems == [f"{tmp_path / 'w-2.weights.h5'}: not an HDF5 file; skipped"]


def test_the_fingerprint_follows_the_contents(tmp_path: Path) -> None:
    a = archive(tmp_path / "a" / "best.keras", payload="one")
    archive(tmp_path / "b" / "best.keras", payload="one")
    source = KerasFileSource()
    fp_a = source.scan(tmp_path / "a").checkpoints[0].fingerprint
    assert fp_a == KerasFileSource().scan(tmp_path / "b").checkpoints[0].fingerprint
    archive(a, payload="two", age=HOUR_AGO + 1)  # save_best_only overwrote it
    assert source.scan(tmp_path / "a").checkpoints[0].fingerprint != fp_a


def _model(**keys: object) -> dict[str, object]:
    return {"name": "m", "checkpoint_dir": "/t", "base_path": "/s", "source": "keras", **keys}


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        (
            _model(keras={"pattern": "*.weights.h5"}),
            "keras.pattern: .weights.h5 files hold weights only; set builder",
        ),
        (_model(keras={"step_regex": "epoch-"}), "keras.step_regex: needs a group"),
        (_model(keras={"step_regex": "("}), "keras.step_regex: not a regular expression"),
        (_model(keras={"custom_objects": ["MyLayer"]}), 'entries must be "module:attribute"'),
    ],
)
def test_bad_options_are_named(model: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [model]}, "t.toml", Path("/"))
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_options_have_defaults_and_a_builder_is_optional() -> None:
    cfg = parse_config({"models": [_model()]}, "t.toml", Path("/"))
    assert cfg.models[0].options == {
        "pattern": "*.keras",
        "step_regex": r"(\d+)",
        "settle_seconds": 5.0,
        "safe_mode": True,
        "custom_objects": [],
    }


#: Written by the real writers: ModelCheckpoint during fit (a whole-model
#: archive and weights only, per epoch), and model.save for the legacy format.
_SAVE = """
import sys, keras, numpy as np
from daemon.demo.model import build_model
out = sys.argv[1]
model = build_model()
model.compile(optimizer="adam", loss="mse")
x, y = np.random.rand(64, 4).astype("float32"), np.random.rand(64, 1).astype("float32")
model.fit(x, y, epochs=2, verbose=0, callbacks=[
    keras.callbacks.ModelCheckpoint(out + "/model-{epoch}.keras"),
    keras.callbacks.ModelCheckpoint(out + "/model-{epoch}.weights.h5", save_weights_only=True),
])
for epoch in (1, 2):
    model.fit(x, y, epochs=1, verbose=0)
    model.save(f"{out}/model-{epoch}.h5")
"""


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("pattern", "builder"),
    [
        ("*.keras", ""),
        ("*.weights.h5", "daemon.demo.model:build_model"),
        ("model-?.h5", ""),
    ],
    ids=["keras_archive", "weights_with_builder", "legacy_h5"],
)
def test_keras_saves_become_validated_versions(
    tmp_path: Path, daemons: Any, pattern: str, builder: str
) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    run_script(_SAVE, str(ckpts))
    config = write_config(tmp_path, builder=builder, source="keras")
    config.write_text(
        config.read_text() + f'\n[models.keras]\npattern = "{pattern}"\nsettle_seconds = 1\n'
    )
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 2, what="two versions")
    published = [e for e in ev if e["event"] == "published"]
    suffix = pattern.split("*")[-1].split("?")[-1]
    assert [(Path(e["checkpoint"]).name, e["step"]) for e in published] == [
        (f"model-1{suffix}", 1),
        (f"model-2{suffix}", 2),
    ]
    assert sorted(version_dirs(tmp_path / "serving" / "m")) == [1, 2]
    validated = [e for e in ev if e["event"] == "validated"]
    assert all(e["signatures"]["serving_default"].startswith("ok") for e in validated)
    assert d.stop() == 0
