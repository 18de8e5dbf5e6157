"""Linked incremental exports (:func:`daemon.children.incremental.link`) on real checkpoints.

The decisive properties: the SavedModel written without TensorFlow serves the
new checkpoint's weights exactly (read back by TensorFlow's reader and by
TF2's loader); a trainer's checkpoint that holds little else than the model is
linked, not copied; anything the weights map does not vouch for falls back and
leaves the export folder empty.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import mapped_export, train

from daemon.children import incremental
from daemon.formats import bundle

pytestmark = pytest.mark.e2e


def _template(tmp_path: Path, prefix: Path, code_files: dict[str, list[int]] | None = None) -> Path:
    return mapped_export(tmp_path / "template", prefix, code_files)


def _model_outputs(prefix: Path, x: Any) -> Any:
    import tensorflow as tf

    from daemon.demo.model import build_model

    model = build_model()
    tf.train.Checkpoint(model=model).read(str(prefix)).expect_partial()
    return model(x).numpy()


def _served(saved_model: Path, x: Any) -> Any:
    import tensorflow as tf

    fn = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    return next(iter(fn(features=tf.constant(x)).values())).numpy()


X = np.linspace(-2, 2, 12, dtype="float32").reshape(3, 4)


def test_a_trainers_checkpoint_is_copied_tensor_by_tensor_and_serves_its_weights(
    tmp_path: Path,
) -> None:
    train(tmp_path / "ckpts", 2)  # ckpt-5, ckpt-10; Adam slots make most of each shard
    template = _template(tmp_path, tmp_path / "ckpts" / "ckpt-5")
    out = tmp_path / "out"
    out.mkdir()
    new = tmp_path / "ckpts" / "ckpt-10"
    assert incremental.link(str(template), str(new), "model", str(out), need_warmup=False) == {
        "weights": "copied",
        "variables": 8,
    }
    assert (out / "saved_model.pb").read_bytes() == (template / "saved_model.pb").read_bytes()
    assert sorted(p.name for p in (out / "variables").iterdir()) == [
        "variables.data-00000-of-00001",
        "variables.index",
    ]
    # Only the variables' tensors and the SavedModel's object graph: no optimizer state.
    record = json.loads((out / incremental.WEIGHTS_MAP_RELPATH).read_text())
    assert record == json.loads((template / incremental.WEIGHTS_MAP_RELPATH).read_text())
    source, saved = (
        bundle.read_index(str(new)),
        bundle.read_index(str(template / "variables" / "variables")),
    )
    graph = saved.entries["_CHECKPOINTABLE_OBJECT_GRAPH"].size
    used = sum(source.entries[k].size for k in record["variables"].values())
    assert (out / "variables" / "variables.data-00000-of-00001").stat().st_size == used + graph
    np.testing.assert_allclose(_served(out, X), _model_outputs(new, X), rtol=1e-6)
    assert not np.allclose(_served(out, X), _served(template, X))


def test_a_checkpoint_of_the_model_alone_is_linked_not_copied(tmp_path: Path) -> None:
    import tensorflow as tf

    from daemon.demo.model import build_model

    model = build_model()
    ckpt = tf.train.Checkpoint(model=model)
    first = ckpt.write(str(tmp_path / "ckpts" / "a"))
    for v in model.trainable_variables:
        v.assign(v + 0.5)
    second = Path(ckpt.write(str(tmp_path / "ckpts" / "b")))
    template = _template(tmp_path, Path(first))
    out = tmp_path / "out"
    out.mkdir()
    result = incremental.link(str(template), str(second), "model", str(out), need_warmup=False)
    assert result == {"weights": "linked", "variables": 8}
    # The checkpoint's own shard, not a copy of it; the object graph in a shard of its own.
    assert os.path.samefile(
        out / "variables" / "variables.data-00000-of-00002",
        second.parent / "b.data-00000-of-00001",
    )
    assert (out / "variables" / "variables.data-00001-of-00002").stat().st_size > 0
    np.testing.assert_allclose(_served(out, X), _model_outputs(second, X), rtol=1e-6)
    reader = tf.train.load_checkpoint(str(out / "variables" / "variables"))
    assert len(reader.get_variable_to_shape_map()) == 9
    # A shard that only its owner's group may read is copied: the server may be another user.
    os.chmod(second.parent / "b.data-00000-of-00001", 0o640)
    again = tmp_path / "again"
    again.mkdir()
    result = incremental.link(str(template), str(second), "model", str(again), need_warmup=False)
    assert result["weights"] == "copied"
    np.testing.assert_allclose(_served(again, X), _model_outputs(second, X), rtol=1e-6)


def test_what_the_weights_map_does_not_vouch_for_falls_back_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    import tensorflow as tf

    from daemon.demo.model import build_model

    train(tmp_path / "ckpts", 2)
    helper = tmp_path / "helper.py"
    helper.write_text("ACTIVATION = 'relu'\n")
    st = helper.stat()
    template = _template(
        tmp_path, tmp_path / "ckpts" / "ckpt-5", {str(helper): [st.st_mtime_ns, st.st_size]}
    )
    new = str(tmp_path / "ckpts" / "ckpt-10")
    alone = tf.train.Checkpoint(model=build_model()).write(str(tmp_path / "alone" / "c"))
    out = tmp_path / "out"
    out.mkdir()

    def falls_back(match: str, checkpoint: str = new, key: str = "model", **kw: Any) -> None:
        with pytest.raises(incremental.Fallback, match=match):
            incremental.link(
                str(template), checkpoint, key, str(out), **{"need_warmup": False, **kw}
            )
        assert os.listdir(out) == []

    falls_back("object graph differs", checkpoint=alone)
    # A shard cut short: left to the TensorFlow path, which calls it corrupt.
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in (tmp_path / "ckpts").glob("ckpt-10.*"):
        data = f.read_bytes()
        (cut / f.name).write_bytes(data[: len(data) - 200] if ".data-" in f.name else data)
    # (The object graph is stored last, so it is the first thing found missing.)
    falls_back("shorter than its index says", checkpoint=str(cut / "ckpt-10"))
    falls_back("another checkpoint_key", key="net")
    falls_back("no warmup records", need_warmup=True)
    helper.write_text("ACTIVATION = 'tanh'\n")
    falls_back(f"{helper}, imported by the builder, changed")
    helper.write_text("ACTIVATION = 'relu'\n")
    os.utime(helper, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert incremental.link(str(template), new, "model", str(out), need_warmup=False)["variables"]
    shutil.rmtree(out)
    out.mkdir()
    (template / incremental.WEIGHTS_MAP_RELPATH).unlink()
    falls_back("has no assets.extra/ckpt_exporter_weights.json")
    assert bundle.read_index(new).num_shards == 1


def test_the_weights_map_covers_the_plain_tf_variables_of_a_tf_module(tmp_path: Path) -> None:
    """A tf.Module holds tf.Variable objects: their ``value`` is a method, not a wrapper."""
    import tensorflow as tf

    def module(kernel: float, bias: float) -> tf.Module:
        m = tf.Module()
        m.w = tf.Variable(tf.fill([3], kernel), name="dense/kernel")
        m.b = tf.Variable(tf.fill([2], bias), name="dense/bias")
        return m

    prefix = tf.train.Checkpoint(model=module(1.0, 2.0)).write(str(tmp_path / "ckpt"))
    fresh = module(0.0, 0.0)
    status = tf.train.Checkpoint(model=fresh).read(prefix)
    status.assert_existing_objects_matched()
    assert incremental.restored_from(status, prefix) == {
        "dense/kernel": "model/w/.ATTRIBUTES/VARIABLE_VALUE",
        "dense/bias": "model/b/.ATTRIBUTES/VARIABLE_VALUE",
    }
