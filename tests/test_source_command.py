"""The command source: an external exporter run on each checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, train, version_dirs, write_config

from daemon.basepath.catalog import read_metadata
from daemon.config.loading import ConfigError, parse_config

EXPORTER = str(Path(__file__).parent / "builders" / "external_exporter.py")


def _model(**command: object) -> dict[str, object]:
    return {"name": "m", "checkpoint_dir": "/t", "base_path": "/s", "source": "command", **command}


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        (_model(), "models[0] (m).command.argv: missing (required)"),
        (_model(command={"argv": []}), "command.argv: must not be empty"),
        (
            _model(command={"argv": ["x", "--in={checkpoints}"]}),
            "command.argv: unknown placeholder {checkpoints} in '--in={checkpoints}'; "
            "known: {checkpoint}, {checkpoint_dir}, {output_dir}",
        ),
        (_model(command={"argv": ["x", "{"]}), "bad braces in '{'"),
        (
            _model(command={"argv": ["x"], "saved_model_subdir": "/abs"}),
            "saved_model_subdir: must be a path inside {output_dir}",
        ),
        (_model(builder="a:b", command={"argv": ["x"]}), "builder: not used by source"),
    ],
)
def test_bad_commands_are_named(model: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [model]}, "t.toml", Path("/"))
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_literal_braces_are_doubled() -> None:
    cfg = parse_config(
        {"models": [_model(command={"argv": ["x", '{{"a": 1}}', "{output_dir}"]})]},
        "t.toml",
        Path("/"),
    )
    assert cfg.models[0].options["argv"] == ["x", '{{"a": 1}}', "{output_dir}"]


def _config(tmp_path: Path, *extra: str) -> Path:
    config = write_config(tmp_path, builder="", source="command")
    argv = [sys.executable, EXPORTER, "--checkpoint_dir", "{checkpoint_dir}"]
    argv += ["--output", "{output_dir}", *extra]
    table = f'\n[models.command]\nargv = {json.dumps(argv)}\nsaved_model_subdir = "saved_model"\n'
    config.write_text(config.read_text() + table)
    return config


@pytest.mark.e2e
def test_each_checkpoint_is_exported_by_the_command_validated_and_published(
    tmp_path: Path, daemons: Any
) -> None:
    train(tmp_path / "ckpts", 2)
    d: Daemon = daemons(_config(tmp_path), tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 2, what="2 versions")
    assert [e["step"] for e in ev if e["event"] == "published"] == [5, 10]
    versions = version_dirs(tmp_path / "serving" / "m")
    assert sorted(versions) == [1, 2]
    meta = read_metadata(versions[2])
    assert meta is not None and meta["export"]["kind"] == "command"
    assert meta["checkpoint"]["prefix"] == str(tmp_path / "ckpts" / "ckpt-10")
    assert d.stop() == 0


@pytest.mark.e2e
def test_a_failing_command_pauses_the_model_with_its_output(tmp_path: Path, daemons: Any) -> None:
    train(tmp_path / "ckpts", 1)
    d: Daemon = daemons(_config(tmp_path, "--fail"), tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: any(e["event"] == "model_paused" for e in ev), what="the pause")
    paused = next(e for e in ev if e["event"] == "model_paused")
    assert paused["reason"] == "command_failed" and "exited with status 3" in paused["error"]
    assert "the pipeline config has no such field" in paused["output_tail"]
    assert version_dirs(tmp_path / "serving" / "m") == {}
    assert d.stop() == 0
