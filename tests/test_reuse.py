"""What an export may reuse (daemon.supervisor.reuse): graph keys, templates, worker keys."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from daemon.basepath.catalog import Published
from daemon.basepath.layout import OBJECT_GRAPH_TENSOR, WEIGHTS_MAP_RELPATH
from daemon.config.loading import DaemonConfig, ModelConfig, parse_config
from daemon.protocol import ExportRequest
from daemon.supervisor import reuse


def _model(tmp_path: Path, **keys: Any) -> ModelConfig:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "bld.py").write_text("def build():\n    return None\n")
    model = {
        "name": "m",
        "checkpoint_dir": "ckpts",
        "base_path": "serving/m",
        "builder": "bld:build",
        "python_path": [str(code)],
        **keys,
    }
    return parse_config({"models": [model]}, "test", tmp_path).models[0]


def _request(**fields: Any) -> ExportRequest:
    request: dict[str, Any] = {
        "result": "/s/1/export.result.json",
        "source": "tf_checkpoint",
        "options": {},
        "builder": "bld:build",
        "python_path": ["/code"],
        "checkpoint_key": "model",
        "checkpoint": "/s/1/ckpt-5",
        "export_dir": "/b/.tmp-1",
        "reference": "/s/1/reference.npz",
        "allow_gpu": False,
        "signature": [],
        "input_type": "default",
        "model": "m",
        "sample_inputs": None,
        "warmup_records": 0,
        "template": None,
        **fields,
    }
    return request  # type: ignore[return-value]


def test_the_worker_key_ignores_what_belongs_to_one_checkpoint() -> None:
    d = DaemonConfig()
    first = reuse.worker_key(d, "tf_checkpoint", _request())
    second = reuse.worker_key(
        d,
        "tf_checkpoint",
        _request(
            result="/s/2/export.result.json",
            checkpoint="/s/2/ckpt-7",
            export_dir="/b/.tmp-2",
            reference="/s/2/reference.npz",
            template="/b/1",
        ),
    )
    assert first is not None and first == second
    # Anything about the model makes another worker.
    assert reuse.worker_key(d, "tf_checkpoint", _request(builder="other:build")) != first
    assert reuse.worker_key(d, "tf_checkpoint", _request(input_type="image_tensor")) != first


def test_no_worker_key_where_workers_are_single_use() -> None:
    request = _request()
    assert reuse.worker_key(DaemonConfig(warm_workers=False), "tf_checkpoint", request) is None
    single = DaemonConfig(exporter_max_exports=1)
    assert reuse.worker_key(single, "tf_checkpoint", request) is None
    assert reuse.worker_key(DaemonConfig(), "keras", request) is None  # no reusable exporter


def test_the_graph_key_follows_the_builders_bytes_and_settings(tmp_path: Path) -> None:
    cfg = _model(tmp_path)
    key = reuse.graph_key(cfg)
    assert key is not None and key == reuse.graph_key(cfg)
    assert reuse.graph_key(dataclasses.replace(cfg, input_type="image_tensor")) != key
    (tmp_path / "code" / "bld.py").write_text("def build():\n    return 1\n")
    assert reuse.graph_key(cfg) != key
    assert reuse.graph_key(dataclasses.replace(cfg, incremental_export=False)) is None


def test_the_template_is_the_newest_version_with_the_same_graph_key(tmp_path: Path) -> None:
    def version(v: int, key: str | None) -> Published:
        return Published(version=v, path=tmp_path / str(v), metadata={"export_key": key})

    published = [version(1, "a"), version(3, "a"), version(4, "b"), version(2, "a")]
    for v in published:
        (tmp_path / str(v.version)).mkdir()
    assert reuse.template(tmp_path, published, "a") == str(tmp_path / "3")
    assert reuse.template(tmp_path, published, "c") is None
    assert reuse.template(tmp_path, published, None) is None
    # A version gone from the disk meanwhile (removed by hand) is no template.
    (tmp_path / "3").rmdir()
    assert reuse.template(tmp_path, published, "a") is None


def test_needed_tensors_are_the_weights_map_and_the_object_graph(tmp_path: Path) -> None:
    template = tmp_path / "7"
    assert reuse.needed_tensors(None) is None
    assert reuse.needed_tensors(str(template)) is None  # no weights map: everything
    (template / WEIGHTS_MAP_RELPATH).parent.mkdir(parents=True)
    (template / WEIGHTS_MAP_RELPATH).write_text(
        json.dumps({"variables": {"v/.ATTRIBUTES/VARIABLE_VALUE": "model/dense/kernel/x"}})
    )
    assert reuse.needed_tensors(str(template)) == {"model/dense/kernel/x", OBJECT_GRAPH_TENSOR}
    (template / WEIGHTS_MAP_RELPATH).write_text(json.dumps({"variables": {"a": 3}}))
    assert reuse.needed_tensors(str(template)) is None  # not a map: everything
    (template / WEIGHTS_MAP_RELPATH).write_text("{not json")
    assert reuse.needed_tensors(str(template)) is None
