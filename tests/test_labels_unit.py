"""The supervisor's labels unit (daemon/supervisor/labels.py) on real folders and real processes.

Promotion by command (a real subprocess decides), operator requests left in
the base path, the state kept in ``labels.json``, retention's protected set;
and the model config file written to a bucket, a second writer noticed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from test_operations import make_version

from daemon.basepath.catalog import published_versions
from daemon.basepath.label_requests import read_labels, request_move
from daemon.basepath.layout import LABEL_REQUESTS_NAME, STATE_DIRNAME
from daemon.config.loading import Config, ModelConfig
from daemon.config.serving import ServingConfig
from daemon.objectstore.client import ObjectStore
from daemon.objectstore.url import ObjectURL
from daemon.rules.labels import ModelEntry
from daemon.sources import SOURCES
from daemon.supervisor.context import Context
from daemon.supervisor.labels import Labels
from daemon.supervisor.metrics import Metrics
from daemon.supervisor.state import ModelState
from daemon.tfserving.model_config import ConfigConflict, parse_entries, write_config


def _unit(tmp_path: Path, **model: Any) -> tuple[Labels, ModelState, Path]:
    base = tmp_path / "serving" / "m"
    cfg = ModelConfig(name="m", checkpoint_dir=tmp_path / "c", base_path=base, **model)
    path = tmp_path / "models.config"
    config = Config(path=None, models=(cfg,), serving=ServingConfig(path=path, load_wait_seconds=0))
    ctx = Context(config=config, log=structlog.get_logger(), metrics=Metrics())
    st = ModelState(cfg=cfg, source=SOURCES["tf_checkpoint"].scanner({}))
    ctx.models["m"] = st
    return Labels(ctx), st, path


def _publish(labels: Labels, st: ModelState, version: int) -> None:
    make_version(st.cfg.base_path, version)  # type: ignore[arg-type]
    st.published = published_versions(st.cfg.base_path, "m")
    labels.published(st, version)


def _entry(path: Path) -> ModelEntry:
    return parse_entries(path.read_text())["m"][1]


def _settle(labels: Labels, st: ModelState, until: float = 10.0) -> None:
    """Turn the loop until nothing changes (a promote command runs in between)."""
    deadline, last = time.monotonic() + until, None
    while time.monotonic() < deadline:
        labels.tick({"m": st})
        state = labels.states["m"]
        if state == last and not labels._promoting:
            return
        last = state
        time.sleep(0.05)
    raise AssertionError("labels did not settle")


def test_a_promote_command_decides_once_per_canary_version(tmp_path: Path) -> None:
    # Approves every version but 2.
    labels, st, path = _unit(
        tmp_path, promote="command", promote_command=("sh", "-c", "test {version} != 2")
    )
    _publish(labels, st, 1)
    _settle(labels, st)
    assert _entry(path).labels == {"canary": 1, "stable": 1}  # the first is stable at once
    _publish(labels, st, 2)
    _settle(labels, st)
    assert _entry(path) == ModelEntry(versions=(1, 2), labels={"canary": 2, "stable": 1})
    assert 2 in labels.states["m"].decided  # refused, and never asked again
    _publish(labels, st, 3)
    _settle(labels, st)
    assert _entry(path) == ModelEntry(versions=(3,), labels={"canary": 3, "stable": 3})
    # Kept in the base path: a restart starts from there.
    assert read_labels(st.cfg.base_path) == labels.states["m"]
    # Retention keeps what the file lists or a label wants.
    assert st.serving_versions == {3}
    assert st.stable_version == 3


def test_operator_requests_are_taken_once_and_checked_when_made(tmp_path: Path) -> None:
    labels, st, path = _unit(tmp_path, promote="manual")
    for v in (1, 2, 3):
        _publish(labels, st, v)
        _settle(labels, st)
    assert _entry(path).labels == {"canary": 3, "stable": 1}  # manual: nothing promoted
    request_move(st.cfg.base_path, "m", "promote", 3)
    labels.take_requests(st)
    _settle(labels, st)
    assert _entry(path).labels == {"canary": 3, "stable": 3}
    assert not (st.cfg.base_path / STATE_DIRNAME / LABEL_REQUESTS_NAME).exists()  # taken once
    request_move(st.cfg.base_path, "m", "rollback", 1)
    labels.take_requests(st)
    _settle(labels, st)
    assert _entry(path) == ModelEntry(versions=(1,), labels={"canary": 1, "stable": 1})
    assert (st.cfg.base_path / "3").is_dir()  # nothing deleted
    from daemon.basepath.operations import OperationError

    with pytest.raises(OperationError, match="available: 1, 2, 3"):
        request_move(st.cfg.base_path, "m", "promote", 7)


@pytest.mark.objectstore
def test_the_config_file_in_a_bucket_is_replaced_whole_and_a_second_writer_noticed(
    object_store: tuple[ObjectStore, str, ObjectURL],
) -> None:
    store, _, url = object_store
    target = url / "models.config"
    one = "model_config_list { config { name: 'a' base_path: '/a' } }\n"
    two = "model_config_list { config { name: 'b' base_path: '/b' } }\n"
    token = write_config(target, one)
    assert token and store.get(target.prefix).decode() == one
    token = write_config(target, two, token)
    assert store.get(target.prefix).decode() == two
    store.put(target.prefix, b"# edited by hand\n")  # another writer
    with pytest.raises(ConfigConflict, match="changed since this daemon last wrote it"):
        write_config(target, one, token)
    assert store.get(target.prefix) == b"# edited by hand\n"  # not overwritten blindly
    assert write_config(target, one)  # unconditional again, as on the daemon's next turn
    assert store.get(target.prefix).decode() == one


def test_versions_published_by_someone_else_get_labels_too(tmp_path: Path) -> None:
    labels, st, path = _unit(tmp_path)
    for v in (1, 2):  # before [serving_config] was set
        make_version(st.cfg.base_path, v)
    st.published = published_versions(st.cfg.base_path, "m")
    _settle(labels, st)
    assert _entry(path) == ModelEntry(versions=(2,), labels={"canary": 2, "stable": 2})
    make_version(st.cfg.base_path, 3)  # `ckpt-exporter export`, not this daemon's loop
    st.published = published_versions(st.cfg.base_path, "m")
    _settle(labels, st)
    assert _entry(path) == ModelEntry(versions=(3,), labels={"canary": 3, "stable": 3})
