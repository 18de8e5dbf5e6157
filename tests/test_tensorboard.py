"""daemon.formats.tensorboard: scalars read from event files without TensorFlow.

The e2e tests write real event files with TensorFlow in a subprocess (this process never imports
it); the others build records by hand to reach what TensorFlow rarely writes: unpacked repeated
fields, torn and corrupt records, files replaced under the reader.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, child_env, run_script

from daemon.formats.tensorboard import EventFileReader, _masked_crc32c, read_scalars

# tf.summary.scalar and keras.callbacks.TensorBoard live in the tensorboard package, which
# TensorFlow 2.21 no longer installs; without it they raise TBNotInstalledError.
needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="tf.summary.scalar and keras.callbacks.TensorBoard need the tensorboard package",
)


def f32(v: float) -> float:
    return float(np.float32(v))


# --- hand-built records: an encoder independent of the module under test ---------------------


def crc32c_masked(data: bytes) -> int:
    """Bitwise CRC32C (no table, unlike the module), masked as TFRecord stores it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", crc32c_masked(length))
        + data
        + struct.pack("<I", crc32c_masked(data))
    )


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative ints are their 64-bit two's complement, as protobuf does
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def event(step: int | None, *values: bytes) -> bytes:
    """An Event with wall_time, step (omitted when None, as proto3 does for 0) and a summary."""
    out = key(1, 1) + struct.pack("<d", 1.7e9)
    if step is not None:
        out += key(2, 0) + varint(step)
    return out + ld(5, b"".join(ld(1, v) for v in values))


def simple(tag: str, value: float) -> bytes:
    return ld(1, tag.encode()) + key(2, 5) + struct.pack("<f", value)


def tensor_value(tag: str, tensor: bytes) -> bytes:
    return ld(1, tag.encode()) + ld(8, tensor)


def shape(*dims: int) -> bytes:
    return ld(2, b"".join(ld(2, key(1, 0) + varint(d)) for d in dims))


def tensor(dtype: int, *fields: bytes, dims: tuple[int, ...] = ()) -> bytes:
    return key(1, 0) + varint(dtype) + shape(*dims) + b"".join(fields)


def write_events(path: Path, *events: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(b"".join(frame(e) for e in events))


def split_records(data: bytes) -> list[bytes]:
    """The framed records of an event file, each with its header and footer."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        out.append(data[pos : pos + 16 + length])
        pos += 16 + length
    assert pos == len(data)
    return out


# --- pure Python ------------------------------------------------------------------------------


def test_crc32c_matches_the_published_check_value() -> None:
    # CRC32C("123456789") is 0xE3069283 (RFC 3720); TFRecord stores it masked.
    crc = 0xE3069283
    masked = ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
    assert _masked_crc32c(b"123456789") == masked == crc32c_masked(b"123456789")
    assert _masked_crc32c(struct.pack("<Q", 300)) == crc32c_masked(struct.pack("<Q", 300))


def test_missing_logdir_empty_dir_and_other_files(tmp_path: Path) -> None:
    assert read_scalars(tmp_path / "nope", "val_loss") == {}
    assert read_scalars(tmp_path, "val_loss") == {}
    # Only names containing "tfevents" count, and subdirectories are not searched.
    write_events(tmp_path / "notes.bin", event(1, simple("val_loss", 1.0)))
    write_events(tmp_path / "sub" / "events.out.tfevents.1.h", event(2, simple("val_loss", 2.0)))
    assert read_scalars(tmp_path, "val_loss") == {}
    write_events(tmp_path / "events.out.tfevents.1.h", event(3, simple("val_loss", 3.0)))
    assert read_scalars(tmp_path, "val_loss") == {3: 3.0}


def test_a_logdir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        read_scalars(tmp_path / "f", "val_loss")


def test_every_scalar_encoding(tmp_path: Path) -> None:
    half_bits = struct.unpack("<H", struct.pack("<e", 0.5))[0]
    cases = {
        # step: (Summary.Value, expected value)
        1: (simple("m", 0.1), f32(0.1)),
        2: (tensor_value("m", tensor(1, ld(4, struct.pack("<f", 2.5)))), 2.5),
        3: (tensor_value("m", tensor(1, key(5, 5) + struct.pack("<f", 3.5))), 3.5),
        4: (tensor_value("m", tensor(1, ld(5, struct.pack("<f", 4.5)))), 4.5),
        5: (tensor_value("m", tensor(2, key(6, 1) + struct.pack("<d", 0.1))), 0.1),
        6: (tensor_value("m", tensor(2, ld(6, struct.pack("<d", 0.2)))), 0.2),
        7: (tensor_value("m", tensor(3, key(7, 0) + varint(-7))), -7.0),
        8: (tensor_value("m", tensor(3, ld(7, varint(8)))), 8.0),
        9: (tensor_value("m", tensor(9, key(10, 0) + varint(-(2**40)))), float(-(2**40))),
        10: (tensor_value("m", tensor(9, ld(4, struct.pack("<q", 10)))), 10.0),
        11: (tensor_value("m", tensor(19, key(13, 0) + varint(half_bits))), 0.5),
        12: (tensor_value("m", tensor(19, ld(4, struct.pack("<e", 0.25)))), 0.25),
        13: (tensor_value("m", tensor(1, ld(4, struct.pack("<f", 13.0)), dims=(1, 1))), 13.0),
        14: (
            tensor_value("m", tensor(1)),
            0.0,
        ),  # no value at all: the dtype's zero, as TF reads it
    }
    write_events(
        tmp_path / "events.out.tfevents.1.h",
        event(None, simple("m", 0.75)),  # step 0 is omitted on the wire
        event(-3, simple("m", -1.0)),
        *(event(step, value) for step, (value, _) in cases.items()),
    )
    expected = {0: 0.75, -3: -1.0} | {step: want for step, (_, want) in cases.items()}
    assert read_scalars(tmp_path, "m") == expected


def test_non_scalars_and_other_tags_are_ignored(tmp_path: Path) -> None:
    vec = struct.pack("<3f", 1, 2, 3)
    write_events(
        tmp_path / "events.out.tfevents.1.h",
        event(1, simple("loss", 9.0), simple("m", 1.0), simple("m_extra", 8.0)),
        event(2, tensor_value("m", tensor(1, ld(4, vec), dims=(3,)))),  # 3 elements
        event(3, tensor_value("m", tensor(1, ld(5, vec)))),  # a scalar shape but 3 values
        event(4, tensor_value("m", tensor(1, ld(4, struct.pack("<f", 4)), dims=(-1, -1)))),
        event(5, tensor_value("m", tensor(7, ld(8, b"text")))),  # DT_STRING
        event(6, tensor_value("m", tensor(1, ld(4, vec[:4]), dims=(0,)))),  # no elements
        event(7, tensor_value("m", tensor(1, ld(4, vec[:6])))),  # content of the wrong size
        event(8, ld(1, b"m") + ld(5, ld(1, struct.pack("<d", 1.0)))),  # a histo
        event(9, tensor_value("m", tensor(14, ld(4, b"\x80\x3f")))),  # DT_BFLOAT16: not read
    )
    assert read_scalars(tmp_path, "m") == {1: 1.0}
    assert read_scalars(tmp_path, "loss") == {1: 9.0}


def test_corrupt_records_are_skipped(tmp_path: Path) -> None:
    write_events(
        tmp_path / "events.out.tfevents.1.h",
        event(1, simple("m", 1.0)),
        b"\xff\xff\xff",  # a varint that never ends
        event(2, simple("m", 2.0))[:-3],  # the summary runs past the end of the event
        key(2, 3) + event(3, simple("m", 3.0)),  # a group (wire type 3)
        event(4, ld(1, b"m") + key(8, 0) + varint(1)),  # a tensor with the wrong wire type
        event(5, tensor_value("m", tensor(1, key(5, 0) + varint(1)))),  # float_val as varint
        event(6, simple("m", 6.0)),
    )
    assert read_scalars(tmp_path, "m") == {1: 1.0, 6: 6.0}


def test_a_torn_trailing_record_is_read_once_complete(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.h"
    write_events(path, event(1, simple("m", 1.0)))
    reader = EventFileReader()
    record = frame(event(2, simple("m", 2.0)))
    for i in range(len(record)):
        assert reader.scalars(tmp_path, "m") == {1: 1.0}, f"after {i} of {len(record)} bytes"
        with path.open("ab") as f:
            f.write(record[i : i + 1])
    assert reader.scalars(tmp_path, "m") == {1: 1.0, 2: 2.0}


def test_a_zero_filled_tail_is_not_taken_for_records(tmp_path: Path) -> None:
    # A crash can leave the file grown with zeros where the data never reached the disk. Zeros
    # frame as an empty record only if the length's CRC is not checked; the reader must wait.
    path = tmp_path / "events.out.tfevents.1.h"
    write_events(path, event(1, simple("m", 1.0)))
    start = path.stat().st_size
    record = frame(event(2, simple("m", 2.0)))
    with path.open("ab") as f:
        f.write(bytes(len(record)))
    reader = EventFileReader()
    assert reader.scalars(tmp_path, "m") == {1: 1.0}
    with path.open("r+b") as f:
        f.seek(start)
        f.write(record)
    assert reader.scalars(tmp_path, "m") == {1: 1.0, 2: 2.0}


def test_the_reader_parses_only_appended_bytes(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.h"
    write_events(path, event(1, simple("m", 1.0)))
    reader = EventFileReader()
    assert reader.scalars(tmp_path, "m") == {1: 1.0}
    # Rewrite step 1's value in place (same size, same inode), then append step 2: a reader that
    # re-parsed from the start would see 5.0; the incremental one still has the 1.0 it read.
    data = path.read_bytes()
    old = struct.pack("<f", 1.0)
    assert data.count(old) == 1
    with path.open("r+b") as f:
        f.write(data.replace(old, struct.pack("<f", 5.0)))
    write_events(path, event(2, simple("m", 2.0)))
    assert reader.scalars(tmp_path, "m") == {1: 1.0, 2: 2.0}
    assert read_scalars(tmp_path, "m") == {1: 5.0, 2: 2.0}


def test_a_replaced_or_truncated_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "events.out.tfevents.1.h"
    write_events(path, event(1, simple("m", 1.0)), event(2, simple("m", 2.0)))
    reader = EventFileReader()
    assert reader.scalars(tmp_path, "m") == {1: 1.0, 2: 2.0}
    # A new inode, larger than the old file: the cached offset must not be reused.
    new = tmp_path / "new"
    write_events(new, *(event(s, simple("m", 10.0 + s)) for s in (3, 4, 5)))
    os.replace(new, path)
    assert reader.scalars(tmp_path, "m") == {3: 13.0, 4: 14.0, 5: 15.0}
    # The same inode, truncated and rewritten shorter than the cached offset.
    with path.open("wb") as f:
        f.write(frame(event(6, simple("m", 6.0))))
    assert reader.scalars(tmp_path, "m") == {6: 6.0}
    path.unlink()
    assert reader.scalars(tmp_path, "m") == {}


def test_later_files_override_earlier_ones(tmp_path: Path) -> None:
    write_events(
        tmp_path / "events.out.tfevents.1700000002.h",
        event(2, simple("m", 20.0)),
        event(3, simple("m", 30.0)),
    )
    write_events(
        tmp_path / "events.out.tfevents.1700000001.h",
        event(1, simple("m", 1.0)),
        event(2, simple("m", 2.0)),
        event(2, simple("m", 2.5)),  # within a file too, the later record wins
    )
    assert read_scalars(tmp_path, "m") == {1: 1.0, 2: 20.0, 3: 30.0}


def test_the_module_imports_neither_tensorflow_nor_protobuf() -> None:
    code = (
        "import sys, daemon.formats.tensorboard\n"
        "bad = [m for m in ('tensorflow', 'google.protobuf', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), check=True)


# --- real TensorFlow --------------------------------------------------------------------------

WRITE_TF_LOGS = r"""
import sys
import numpy as np
import tensorflow as tf

out = sys.argv[1]
v1 = tf.compat.v1
scalars = v1.SummaryMetadata(plugin_data=v1.SummaryMetadata.PluginData(plugin_name="scalars"))

# What tf.summary.scalar writes (without needing the tensorboard package): a float32 tensor.
with tf.summary.create_file_writer(f"{out}/tf2").as_default():
    for step, value in [(0, 0.0), (1, 0.5), (2, -1.25e-3), (3, 0.1)]:
        tf.summary.write("val_loss", tf.constant(value, tf.float32), step=step, metadata=scalars)
        tf.summary.write("loss", tf.constant(value + 1, tf.float32), step=step, metadata=scalars)
    tf.summary.write("val_loss", tf.constant([1.0, 2.0, 3.0]), step=10)
    tf.summary.write("val_loss", tf.constant("text"), step=11)
    tf.summary.write("val_loss", tf.zeros([30, 3], tf.float64), step=12)  # a TF2 histogram's shape
    tf.summary.write("f64", tf.constant(0.1, tf.float64), step=1)
    tf.summary.write("f16", tf.constant(0.1, tf.float16), step=1)
    tf.summary.write("i64", tf.constant(-(2**40), tf.int64), step=1)
    tf.summary.write("i32", tf.constant(-7, tf.int32), step=1)
    tf.summary.write("one_by_one", tf.constant([[0.1]], tf.float32), step=1)

# make_tensor_proto puts scalars in the packed *_val fields instead of tensor_content.
with tf.summary.create_file_writer(f"{out}/vals").as_default():
    for step, value in enumerate(
        [np.float32(0.5), np.float64(0.1), np.int32(-3), np.int64(-(2**40)), np.float16(0.5)]
    ):
        proto = tf.make_tensor_proto(value)
        value = v1.Summary.Value(tag="m", tensor=proto)
        tf.summary.experimental.write_raw_pb(v1.Summary(value=[value]).SerializeToString(), step)

# TF1: simple_value, from a FileWriter (graph mode only) and from write_raw_pb.
with tf.Graph().as_default():
    writer = v1.summary.FileWriter(f"{out}/tf1")
    for step, value in [(1, 0.25), (2, 0.0)]:
        summary = v1.Summary(value=[v1.Summary.Value(tag="val_loss", simple_value=value)])
        writer.add_summary(summary, step)
    histo = v1.HistogramProto(min=0, max=1, num=2, sum=1, sum_squares=1)
    writer.add_summary(v1.Summary(value=[v1.Summary.Value(tag="val_loss", histo=histo)]), 3)
    writer.close()
with tf.summary.create_file_writer(f"{out}/raw").as_default():
    summary = v1.Summary(value=[v1.Summary.Value(tag="val_loss", simple_value=0.75)])
    tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=3)
"""


@pytest.fixture(scope="module")
def tf_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tf_logs")
    run_script(WRITE_TF_LOGS, str(out))
    return out


@pytest.mark.e2e
def test_tf2_scalar_tensors(tf_logs: Path) -> None:
    want = {0: 0.0, 1: f32(0.5), 2: f32(-1.25e-3), 3: f32(0.1)}
    assert read_scalars(tf_logs / "tf2", "val_loss") == want
    assert read_scalars(tf_logs / "tf2", "loss") == {s: f32(v + 1) for s, v in want.items()}
    assert read_scalars(tf_logs / "tf2", "f64") == {1: 0.1}
    assert read_scalars(tf_logs / "tf2", "f16") == {1: float(np.float16(0.1))}
    assert read_scalars(tf_logs / "tf2", "i64") == {1: float(-(2**40))}
    assert read_scalars(tf_logs / "tf2", "i32") == {1: -7.0}
    assert read_scalars(tf_logs / "tf2", "one_by_one") == {1: f32(0.1)}


@pytest.mark.e2e
def test_make_tensor_proto_values(tf_logs: Path) -> None:
    assert read_scalars(tf_logs / "vals", "m") == {
        0: 0.5,
        1: 0.1,
        2: -3.0,
        3: float(-(2**40)),
        4: 0.5,
    }


@pytest.mark.e2e
def test_tf1_simple_values(tf_logs: Path) -> None:
    assert read_scalars(tf_logs / "tf1", "val_loss") == {1: 0.25, 2: 0.0}
    assert read_scalars(tf_logs / "raw", "val_loss") == {3: 0.75}


@pytest.mark.e2e
def test_a_torn_tf_record_is_read_once_complete(tf_logs: Path, tmp_path: Path) -> None:
    (source,) = (tf_logs / "tf2").iterdir()
    records = split_records(source.read_bytes())
    path = tmp_path / source.name
    reader = EventFileReader()
    # Records: file_version, then val_loss and loss for each step: stop after step 0's loss.
    path.write_bytes(b"".join(records[:3]))
    assert reader.scalars(tmp_path, "val_loss") == {0: 0.0}
    step1 = records[3]
    with path.open("ab") as f:
        f.write(step1[: len(step1) // 2])
    assert reader.scalars(tmp_path, "val_loss") == {0: 0.0}
    with path.open("ab") as f:
        f.write(step1[len(step1) // 2 :])
    assert reader.scalars(tmp_path, "val_loss") == {0: 0.0, 1: 0.5}


APPEND_IN_TWO_GOES = r"""
import pathlib, sys, time
import tensorflow as tf

out = pathlib.Path(sys.argv[1])
writer = tf.summary.create_file_writer(str(out / "logs"))
with writer.as_default():
    tf.summary.write("val_loss", tf.constant(1.0), step=1)
    tf.summary.write("val_loss", tf.constant(2.0), step=2)
writer.flush()
(out / "ready").touch()
deadline = time.monotonic() + 120
while not (out / "go").exists():
    assert time.monotonic() < deadline, "never told to go on"
    time.sleep(0.05)
with writer.as_default():
    tf.summary.write("val_loss", tf.constant(3.0), step=3)
writer.close()
"""

NEW_FILE = r"""
import sys, time
import tensorflow as tf

time.sleep(1.1)  # file names sort by creation second: make sure this one sorts last
with tf.summary.create_file_writer(sys.argv[1]).as_default():
    tf.summary.write("val_loss", tf.constant(2.5), step=2)
    tf.summary.write("val_loss", tf.constant(4.0), step=4)
"""


@pytest.mark.e2e
def test_incremental_reads_follow_a_live_writer(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    reader = EventFileReader()
    assert reader.scalars(logs, "val_loss") == {}
    proc = subprocess.Popen(
        [sys.executable, "-c", APPEND_IN_TWO_GOES, str(tmp_path)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "the writer never became ready"
            time.sleep(0.05)
        assert reader.scalars(logs, "val_loss") == {1: 1.0, 2: 2.0}
        (tmp_path / "go").touch()
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output.decode(errors="replace")
    assert reader.scalars(logs, "val_loss") == {1: 1.0, 2: 2.0, 3: 3.0}
    # A second process adds a second file; its step 2 overrides the first file's.
    run_script(NEW_FILE, str(logs))
    assert len(list(logs.iterdir())) == 2
    assert reader.scalars(logs, "val_loss") == {1: 1.0, 2: 2.5, 3: 3.0, 4: 4.0}


TF_SUMMARY_SCALAR = r"""
import sys
import tensorflow as tf

with tf.summary.create_file_writer(sys.argv[1]).as_default():
    for step, value in [(0, 0.0), (1, 0.5), (2, -1.25e-3), (5, 0.1)]:
        tf.summary.scalar("val_loss", value, step=step)
    tf.summary.histogram("val_loss_histogram", [1.0, 2.0, 3.0], step=1)
"""


@pytest.mark.e2e
@needs_tensorboard
def test_tf_summary_scalar(tmp_path: Path) -> None:
    run_script(TF_SUMMARY_SCALAR, str(tmp_path))
    want = {0: 0.0, 1: f32(0.5), 2: f32(-1.25e-3), 5: f32(0.1)}
    assert read_scalars(tmp_path, "val_loss") == want
    assert read_scalars(tmp_path, "val_loss_histogram") == {}


KERAS_FIT = r"""
import json, sys
import keras
import numpy as np

log_dir, history_path = sys.argv[1:]
keras.utils.set_random_seed(0)
x = np.random.rand(16, 2).astype("float32")
y = x.sum(axis=1, keepdims=True)
model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
model.compile("sgd", "mse")
history = model.fit(
    x, y, validation_data=(x[:8], y[:8]), epochs=3, batch_size=4, verbose=0,
    callbacks=[keras.callbacks.TensorBoard(log_dir)],
)
with open(history_path, "w") as f:
    json.dump(history.history, f)
"""


@pytest.mark.e2e
@needs_tensorboard
def test_keras_tensorboard_callback(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run_script(KERAS_FIT, str(logs), str(tmp_path / "history.json"))
    history = json.loads((tmp_path / "history.json").read_text())
    assert sorted(p.name for p in logs.iterdir()) == ["train", "validation"]
    # Keras 3 logs epoch metrics at step = epoch index (from 0), validation ones without "val_".
    val = read_scalars(logs / "validation", "epoch_loss")
    assert val == {epoch: f32(v) for epoch, v in enumerate(history["val_loss"])}
    train = read_scalars(logs / "train", "epoch_loss")
    assert train == {epoch: f32(v) for epoch, v in enumerate(history["loss"])}
    # Also in validation/: the same losses at step = optimizer iterations (16 / 4 = 4 per epoch).
    by_iteration = read_scalars(logs / "validation", "evaluation_loss_vs_iterations")
    assert by_iteration == {4 * (epoch + 1): v for epoch, v in val.items()}
    assert read_scalars(logs, "epoch_loss") == {}  # not recursive
    assert read_scalars(logs / "validation", "val_loss") == {}
