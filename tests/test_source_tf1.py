"""The tf1_checkpoint source: Saver checkpoints, their .meta graph, tensor-name signatures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, run_script, version_dirs, write_config

from daemon.basepath.catalog import read_metadata
from daemon.config.loading import ConfigError, parse_config
from daemon.sources.tf1_checkpoint import TF1CheckpointSource

#: A TF1 graph with a lookup table (filled by a table initializer) and two
#: Saver checkpoints, as an Estimator-era trainer writes them.
_TRAIN = """
import sys, tensorflow as tf
v1 = tf.compat.v1
v1.disable_eager_execution()
out = sys.argv[1]
x = v1.placeholder(tf.float32, [None, 4], name="x")
w = v1.get_variable("w", [4, 2])
b = v1.get_variable("b", [2], initializer=v1.zeros_initializer())
table = tf.lookup.StaticHashTable(
    tf.lookup.KeyValueTensorInitializer(tf.constant(["a", "b"]), tf.constant([1.0, 2.0])), -1.0
)
y = tf.identity((tf.matmul(x, w) + b) * table.lookup(tf.constant("b")), name="y")
step = v1.train.get_or_create_global_step()
bump = [w.assign_add(tf.ones([4, 2])), step.assign_add(100)]
saver = v1.train.Saver()
with v1.Session() as s:
    s.run([v1.global_variables_initializer(), v1.tables_initializer()])
    for _ in range(2):
        s.run(bump)
        saver.save(s, out + "/model.ckpt", global_step=step)
"""


@pytest.fixture(scope="module")
def tf1_ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tf1") / "ckpts"
    out.mkdir()
    run_script(_TRAIN, str(out))
    return out


@pytest.mark.e2e
def test_the_meta_graph_is_part_of_the_checkpoint(tf1_ckpts: Path, tmp_path: Path) -> None:
    result = TF1CheckpointSource().scan(tf1_ckpts)
    assert [(c.name, c.step) for c in result.checkpoints] == [
        ("model.ckpt-100", 100),
        ("model.ckpt-200", 200),
    ]
    assert tf1_ckpts / "model.ckpt-200.meta" in result.checkpoints[1].files
    # Without its graph a checkpoint is not complete yet (Saver writes it last).
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in tf1_ckpts.glob("model.ckpt-200.*"):
        if f.suffix != ".meta":
            (partial / f.name).write_bytes(f.read_bytes())
    result = TF1CheckpointSource().scan(partial)
    assert result.checkpoints == [] and result.incomplete == ["model.ckpt-200"]


def _model(**keys: object) -> dict[str, object]:
    return {
        "name": "m",
        "checkpoint_dir": "/t",
        "base_path": "/s",
        "source": "tf1_checkpoint",
        **keys,
    }


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        (_model(), "models[0] (m).tf1_checkpoint.inputs: missing (required)"),
        (
            _model(tf1_checkpoint={"inputs": {"x": "x"}, "outputs": {"y": "y:0"}}),
            'tf1_checkpoint.inputs: values must be tensor names like "x:0"',
        ),
        (
            _model(
                tf1_checkpoint={"inputs": {"x": "x:0"}, "outputs": {"y": "y:0"}, "method_name": "p"}
            ),
            "tf1_checkpoint.method_name: must be one of",
        ),
    ],
)
def test_bad_signature_maps_are_named(model: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [model]}, "t.toml", Path("/"))
    assert any(problem in p for p in e.value.problems), e.value.problems


@pytest.mark.e2e
def test_saver_checkpoints_become_versions_with_their_tables(
    tf1_ckpts: Path, tmp_path: Path, daemons: Any
) -> None:
    config = write_config(
        tmp_path, builder="", source="tf1_checkpoint", checkpoint_dir=str(tf1_ckpts)
    )
    config.write_text(
        config.read_text()
        + '\n[models.tf1_checkpoint]\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
        + 'signature_name = "scores"\n'
    )
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 2, what="2 versions")
    assert [e["step"] for e in ev if e["event"] == "published"] == [100, 200]
    validated = [e for e in ev if e["event"] == "validated"]
    # Both names answer; the table was filled at load (else the lookup would fail);
    # w, b and global_step proven to come from the checkpoint.
    assert [sorted(e["signatures"]) for e in validated] == [["scores", "serving_default"]] * 2
    assert [e["weights_matched"] for e in validated] == [3, 3]
    versions = version_dirs(tmp_path / "serving" / "m")
    meta = read_metadata(versions[2])
    assert meta is not None and meta["export"]["kind"] == "tf1_checkpoint"
    assert d.stop() == 0
