"""The checkpoint index reader, against TensorFlow's own reader on real checkpoints.

Weight parity compares stored bytes found through this reader; if it read an
offset wrong, parity would compare the wrong bytes. So every entry of real
checkpoints (a trainer's, a SavedModel's variables, one holding strings and
integers) is checked here against ``tf.train.load_checkpoint``: names, dtypes,
shapes and the bytes themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import train

from daemon import bundle, child, validate

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
    by_bytes = validate._unmatched_by_bytes(
        bundle.read_index(prefix), bundle.read_index(checkpoint)
    )
    by_reader = validate._unmatched_by_reader(str(sm), prefix, checkpoint)
    assert by_bytes == by_reader
    names, missing = by_bytes
    assert len(names) == 8 and len(missing) == unmatched
    outcome: Any
    try:
        outcome = validate.weight_parity(str(sm), checkpoint)
    except child.ChildFailure as e:
        outcome = e.reason
    assert outcome == (
        "weight_mismatch" if unmatched else {"ok": True, "variables": 8, "checkpoint": checkpoint}
    )
