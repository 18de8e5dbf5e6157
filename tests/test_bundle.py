"""The checkpoint index reader and writer, against TensorFlow's own reader on real checkpoints.

Weight parity compares stored bytes found through this reader; if it read an
offset wrong, parity would compare the wrong bytes. So every entry of real
checkpoints (a trainer's, a SavedModel's variables, one holding strings and
integers) is checked here against ``tf.train.load_checkpoint``: names, dtypes,
shapes and the bytes themselves. Indexes written here (linked incremental
exports) must read back in TensorFlow with the same values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import mapped_export, train

from daemon.children import runtime, validator
from daemon.formats import bundle, crc32c

pytestmark = pytest.mark.e2e


def _export(tmp_path: Path, prefix: Path, name: str, change: str = "") -> Path:
    """A Keras export of the demo model restored from ``prefix`` (then ``change`` run)."""
    import tensorflow as tf

    from daemon.demo.model import build_model

    model = build_model()
    tf.train.Checkpoint(model=model).read(str(prefix)).assert_existing_objects_matched()
    if change:
        exec(change, {"model": model, "tf": tf})
    out = tmp_path / name
    model.export(str(out), verbose=False)
    return out


def _agree(prefix: str) -> int:
    import numpy as np
    import tensorflow as tf

    b = bundle.read_index(prefix)
    reader = tf.train.load_checkpoint(prefix)
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    assert set(b.entries) == set(shapes)
    for key, e in b.entries.items():
        assert e.shape == tuple(shapes[key]), key
        assert e.dtype == dtypes[key].as_datatype_enum, key
        assert not e.sliced
        value = reader.get_tensor(key)
        if dtypes[key] == tf.string:
            # Strings are stored length-prefixed; every one of them is in the bytes.
            data = b.read(key)
            assert all(s in data for s in np.asarray(value).reshape(-1)), key
        else:
            assert b.read(key) == np.ascontiguousarray(value).tobytes(), key
    return len(b.entries)


def test_the_index_reader_agrees_with_tensorflows_reader(tmp_path: Path) -> None:
    import tensorflow as tf

    train(tmp_path / "ckpts", 1)
    trained = tmp_path / "ckpts" / "ckpt-5"
    saved = _export(tmp_path, trained, "sm") / "variables" / "variables"
    mixed = tf.train.Checkpoint(
        text=tf.Variable([b"checkpoint", b"", b"\x00\xff bytes"]),
        step=tf.Variable(1234, dtype=tf.int64),
        flags=tf.Variable([True, False, True]),
        half=tf.Variable([[1.5, -2.0]], dtype=tf.float16),
        empty=tf.Variable(tf.zeros([0, 3])),
    ).write(str(tmp_path / "mixed" / "ckpt"))
    # Optimizer slots, step and object graph; each weight twice; and every dtype above.
    assert _agree(str(trained)) > 8
    assert _agree(str(saved)) == 9
    assert _agree(mixed) == 6
    assert bundle.read_index(str(trained)).num_shards == 1


def test_damaged_or_foreign_indexes_are_refused(tmp_path: Path) -> None:
    train(tmp_path / "ckpts", 1)
    index = (tmp_path / "ckpts" / "ckpt-5.index").read_bytes()
    cut = tmp_path / "cut"
    (tmp_path / "cut.index").write_bytes(index[:-1])
    with pytest.raises(bundle.BundleFormatError, match="not a complete table"):
        bundle.read_index(str(cut))
    # The footer is intact but a block points past the end of the file.
    (tmp_path / "short.index").write_bytes(index[:10] + index[-48:])
    with pytest.raises(bundle.BundleFormatError):
        bundle.read_index(str(tmp_path / "short"))
    (tmp_path / "text.index").write_text("model_checkpoint_path: 'ckpt-5'\n")
    with pytest.raises(bundle.BundleFormatError):
        bundle.read_index(str(tmp_path / "text"))
    with pytest.raises(FileNotFoundError):
        bundle.read_index(str(tmp_path / "absent"))


@pytest.mark.parametrize(
    ("source", "change", "unmatched"),
    [
        ("ckpt-10", "", 0),
        # Another checkpoint of the same run: every weight changed in between.
        ("ckpt-5", "", 8),
        # One kernel altered after the restore: its two saved copies are named.
        ("ckpt-10", "model.layers[-1].kernel.assign(model.layers[-1].kernel * 2.0)", 2),
    ],
    ids=["same_checkpoint", "other_checkpoint", "one_variable_altered"],
)
def test_weight_parity_by_bytes_and_by_tensorflows_reader_agree(
    tmp_path: Path, source: str, change: str, unmatched: int
) -> None:
    train(tmp_path / "ckpts", 2)  # ckpt-5, ckpt-10
    sm = _export(tmp_path, tmp_path / "ckpts" / "ckpt-10", "sm", change)
    prefix, checkpoint = str(sm / "variables" / "variables"), str(tmp_path / "ckpts" / source)
    by_bytes = validator._unmatched_by_bytes(
        bundle.read_index(prefix), bundle.read_index(checkpoint)
    )
    by_reader = validator._unmatched_by_reader(str(sm), prefix, checkpoint)
    assert by_bytes == by_reader
    names, missing = by_bytes
    assert len(names) == 8 and len(missing) == unmatched
    outcome: Any
    try:
        outcome = validator.weight_parity(str(sm), checkpoint)
    except runtime.ChildFailure as e:
        outcome = e.reason
    expected = {
        "ok": True,
        "variables": 8,
        "checkpoint": checkpoint,
        "matched_by": "value",
        "matched": 8,
    }
    assert outcome == ("weight_mismatch" if unmatched else expected)


def test_crc32c_matches_the_castagnoli_check_value() -> None:
    assert crc32c.crc32c(b"123456789") == 0xE3069283
    assert crc32c.crc32c(b"") == 0


def _mixed(path: Path) -> str:
    import tensorflow as tf

    return str(
        tf.train.Checkpoint(
            text=tf.Variable([b"checkpoint", b"", b"\x00\xff bytes"]),
            step=tf.Variable(1234, dtype=tf.int64),
            half=tf.Variable([[1.5, -2.0]], dtype=tf.float16),
            empty=tf.Variable(tf.zeros([0, 3])),
        ).write(str(path))
    )


def test_an_index_written_here_reads_back_in_tensorflow_across_shards(tmp_path: Path) -> None:
    """The entries of two checkpoints in one bundle of two shards: TensorFlow reads every value."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    train(tmp_path / "ckpts", 1)
    first = bundle.read_index(str(tmp_path / "ckpts" / "ckpt-5"))
    second = bundle.read_index(_mixed(tmp_path / "mixed" / "ckpt"))
    out = tmp_path / "out" / "both"
    out.parent.mkdir()
    entries = dict(first.entries)
    for key, e in second.entries.items():
        entries["mixed/" + key] = bundle.Entry(
            e.dtype, e.shape, 1, e.offset, e.size, e.crc32c, False
        )
    os.link(first.data_file(0), f"{out}.data-00000-of-00002")
    os.link(second.data_file(0), f"{out}.data-00001-of-00002")
    (tmp_path / "out" / "both.index").write_bytes(bundle.encode_index(2, entries))

    assert bundle.read_index(str(out)).entries == entries
    reader = tf.train.load_checkpoint(str(out))
    assert set(reader.get_variable_to_shape_map()) == set(entries)
    for name, source in [(first.prefix, ""), (second.prefix, "mixed/")]:
        original = tf.train.load_checkpoint(name)
        for key in original.get_variable_to_shape_map():
            np.testing.assert_array_equal(reader.get_tensor(source + key), original.get_tensor(key))
    # The object graph, read as a string without TensorFlow, parses.
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(first.read_string("_CHECKPOINTABLE_OBJECT_GRAPH"))
    assert {c.local_name for c in graph.nodes[0].children} >= {"model", "optimizer"}
    with pytest.raises(bundle.BundleFormatError, match="not a scalar string"):
        second.read_string("step/.ATTRIBUTES/VARIABLE_VALUE")


def test_a_sliced_entry_or_a_shard_out_of_range_is_not_written() -> None:
    with pytest.raises(ValueError, match="shard 1"):
        bundle.encode_index(1, {"a": bundle.Entry(1, (2,), 1, 0, 8, 0, False)})
    with pytest.raises(ValueError, match="sliced"):
        bundle.encode_index(1, {"a": bundle.Entry(1, (2,), 0, 0, 8, 0, True)})


def test_weight_parity_by_weights_map_names_a_variable_holding_another_tensor(
    tmp_path: Path,
) -> None:
    import json

    from daemon.children import incremental

    train(tmp_path / "ckpts", 2)  # ckpt-5, ckpt-10
    checkpoint = str(tmp_path / "ckpts" / "ckpt-10")
    sm = mapped_export(tmp_path / "sm", tmp_path / "ckpts" / "ckpt-10")
    report = validator.weight_parity(str(sm), checkpoint)
    assert report["matched_by"] == "key" and report["variables"] == 8

    map_file = sm / incremental.WEIGHTS_MAP_RELPATH
    record = json.loads(map_file.read_text())
    # A kernel pointed at its Adam slot: same dtype and shape, other bytes.
    key, ckpt_key = next((k, v) for k, v in sorted(record["variables"].items()) if "0/" in v)
    source = bundle.read_index(checkpoint)
    slot = next(
        k
        for k, e in source.entries.items()
        if k != ckpt_key and "optimizer" in k and e.shape == source.entries[ckpt_key].shape
    )
    map_file.write_text(json.dumps(dict(record, variables={**record["variables"], key: slot})))
    with pytest.raises(runtime.ChildFailure, match=f"{key} \\(differs from {slot}\\)"):
        validator.weight_parity(str(sm), checkpoint)
    # ckpt-5 holds other weights: by map, every variable differs.
    map_file.write_text(json.dumps(record))
    with pytest.raises(runtime.ChildFailure, match="8 of 8 variables"):
        validator.weight_parity(str(sm), str(tmp_path / "ckpts" / "ckpt-5"))
    # A map made for a checkpoint of another structure does not apply.
    map_file.write_text(json.dumps(dict(record, object_graph="sha256:0")))
    with pytest.raises(runtime.ChildFailure, match="object graph differs"):
        validator.weight_parity(str(sm), checkpoint)


def test_scalar_integers_are_read_as_tensorflow_wrote_them(tmp_path: Path) -> None:
    """Step counters, read without TensorFlow for a linked export's metadata."""
    import tensorflow as tf

    ckpt = tf.train.Checkpoint(
        step=tf.Variable(2**40 + 3, dtype=tf.int64),
        small=tf.Variable(-7, dtype=tf.int32),
        byte=tf.Variable(200, dtype=tf.uint8),
        lr=tf.Variable(0.5),
        vec=tf.Variable([1, 2], dtype=tf.int64),
    )
    prefix = ckpt.write(str(tmp_path / "c"))
    b = bundle.read_index(prefix)

    def key(name: str) -> str:
        return f"{name}/.ATTRIBUTES/VARIABLE_VALUE"

    assert b.read_int(key("step")) == 2**40 + 3
    assert b.read_int(key("small")) == -7
    assert b.read_int(key("byte")) == 200
    assert b.read_int(key("lr")) is None  # a float
    assert b.read_int(key("vec")) is None  # not a scalar
    assert b.read_int(key("absent")) is None
