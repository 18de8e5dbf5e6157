"""TF Serving's model config file (daemon/tfserving/model_config.py) and its [serving_config] table.

The text is checked with TF Serving's own protos (``tensorflow-serving-api``).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from daemon.config.loading import ConfigError, parse_config
from daemon.rules.labels import ModelEntry
from daemon.tfserving.model_config import parse_entries, render, write_config

BASE = """
model_config_list {
  config { name: "other" base_path: "/srv/other" model_platform: "tensorflow" }
}
"""


def _parsed(text: str) -> Any:
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse(text, config)
    return config


def test_render_is_a_model_server_config_with_versions_and_labels() -> None:
    text = render(
        {
            "b": ("/srv/serving/b", ModelEntry(versions=(7,), labels={})),
            "a": ("gs://bucket/a", ModelEntry(versions=(3, 4), labels={"canary": 4, "stable": 3})),
        }
    )
    config = _parsed(text)
    (a, b) = config.model_config_list.config
    assert (a.name, a.base_path, a.model_platform) == ("a", "gs://bucket/a", "tensorflow")
    assert list(a.model_version_policy.specific.versions) == [3, 4]
    assert dict(a.version_labels) == {"canary": 4, "stable": 3}
    assert (b.name, list(b.model_version_policy.specific.versions), dict(b.version_labels)) == (
        "b",
        [7],
        {},
    )
    assert parse_entries(text)["a"] == (
        "gs://bucket/a",
        ModelEntry((3, 4), {"canary": 4, "stable": 3}),
    )


def test_the_base_config_models_are_kept_unchanged_first() -> None:
    text = render({"m": ("/srv/m", ModelEntry((1,), {"stable": 1}))}, BASE)
    names = [c.name for c in _parsed(text).model_config_list.config]
    assert names == ["other", "m"]
    assert _parsed(text).model_config_list.config[0] == _parsed(BASE).model_config_list.config[0]


@pytest.mark.parametrize(
    ("base", "fragment"),
    [
        ("model_config_list { config { name: 'm' } }", "also lists m"),
        ("not a proto {", "not a ModelServerConfig text proto"),
        ("custom_model_config { }", "must use model_config_list"),
    ],
)
def test_a_base_config_that_cannot_be_merged_is_refused(base: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        render({"m": ("/srv/m", ModelEntry((1,), {}))}, base)


def test_a_local_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "models.config"
    small = render({"m": ("/srv/m", ModelEntry((1,), {}))})
    big = render({f"m{i}": (f"/srv/m{i}", ModelEntry((1, 2), {"stable": 1})) for i in range(300)})
    assert write_config(path, small) is None
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # the server runs as another user
    seen: set[str] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(50):
            write_config(path, big if i % 2 else small)
    finally:
        stop.set()
        reader.join()
    assert seen <= {small, big}  # never a mix or a truncated file
    assert not [p for p in os.listdir(path.parent) if p != "models.config"]  # no temporary left


def _serving(tmp_path: Path, **table: Any) -> Any:
    data = {
        "models": [
            {
                "name": "m",
                "checkpoint_dir": str(tmp_path / "c"),
                "base_path": str(tmp_path / "b"),
                "builder": "x:y",
                "promote": table.pop("promote", "immediately"),
                **table.pop("model", {}),
            }
        ],
        "serving_config": table,
    }
    return parse_config(data, "test.toml", tmp_path)


def test_the_serving_config_table(tmp_path: Path) -> None:
    (tmp_path / "base.config").write_text(BASE)
    cfg = _serving(
        tmp_path,
        path="serving/models.config",
        base_config="base.config",
        load_wait_seconds=5,
        server_address="http://127.0.0.1:8501/",
        promote="after:30m",
    )
    assert cfg.serving.path == tmp_path / "serving" / "models.config"
    assert cfg.serving.base_config == tmp_path / "base.config"
    assert (cfg.serving.canary_label, cfg.serving.stable_label) == ("canary", "stable")
    assert cfg.serving.server_address == "http://127.0.0.1:8501"
    assert cfg.models[0].promote == "after:30m"
    assert (
        parse_config(
            {"models": [{"name": "m", "checkpoint_dir": "c", "base_path": "b", "builder": "x:y"}]},
            "t",
            tmp_path,
        ).serving
        is None
    )


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({}, "serving_config.path: missing"),
        ({"path": "p", "stable_label": "canary"}, "must differ from canary_label"),
        ({"path": "p", "canary_label": "1x"}, "serving_config.canary_label"),
        ({"path": "p", "base_config": "missing.config"}, "serving_config.base_config"),
        ({"path": "hdfs://x/p"}, "serving_config.path: unsupported URL scheme"),
        ({"path": "p", "server_address": "localhost:8501"}, "serving_config.server_address"),
        ({"path": "p", "promote": "soon"}, "promote: must be"),
        ({"path": "p", "promote": "command"}, "promote_command: missing"),
    ],
)
def test_bad_serving_config_tables_name_the_key(
    tmp_path: Path, table: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as e:
        _serving(tmp_path, **table)
    assert any(fragment in p for p in e.value.problems), e.value.problems
