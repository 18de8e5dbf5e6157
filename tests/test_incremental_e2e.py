"""End-to-end incremental export: later checkpoints reuse the published graph, proven equal.

Real trainer, real daemon, real SavedModels. The decisive properties: an
incremental version serves exactly the checkpoint's weights through the old
graph (the validator's weight parity by weights map, and a TF2 load here);
a template without a weights map goes through TensorFlow (output
comparison); what does not fit falls back to a full export; a graph that no
longer computes what the builder's model computes is exported again in full
rather than blamed on the checkpoint; the switch turns it off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Daemon,
    child_env,
    pid_gone,
    run_script,
    train,
    version_dirs,
    write_config,
)

from daemon.basepath.catalog import read_metadata
from daemon.basepath.layout import REPORT_RELPATH
from daemon.children import incremental

pytestmark = pytest.mark.e2e


def _published(n: int) -> Any:
    return lambda ev: sum(e["event"] == "published" for e in ev) >= n


def _exported(d: Daemon) -> list[dict[str, Any]]:
    return [e for e in d.events() if e["event"] == "exported"]


def _train_again(ckpts: Path) -> None:
    """A second run of the trainer: ckpt-7, other weights, the same variables."""
    trainer = [sys.executable, "-m", "daemon.demo.trainer", str(ckpts)]
    args = ["--checkpoints", "1", "--steps-per-checkpoint", "7", "--interval", "0", "--seed", "1"]
    subprocess.run([*trainer, *args], env=child_env(), check=True, capture_output=True, timeout=300)


def test_later_checkpoints_reuse_the_published_graph_and_serve_their_own_weights(
    tmp_path: Path, daemons: Any
) -> None:
    train(tmp_path / "ckpts", 3)  # ckpt-5, ckpt-10, ckpt-15
    d = daemons(write_config(tmp_path), tmp_path / "daemon.log")
    d.wait_for(_published(3), timeout=240)
    assert d.stop() == 0
    base = tmp_path / "serving" / "m"
    versions = version_dirs(base)
    exported = _exported(d)
    assert [e["incremental_from"] for e in exported] == [None, str(versions[1]), str(versions[2])]
    assert all(e["incremental_fallback"] is None for e in exported)
    validated = [e for e in d.events() if e["event"] == "validated"]
    assert [e["weights_matched"] for e in validated] == [4, 4, 4]

    metas = {v: read_metadata(p) or {} for v, p in versions.items()}
    keys = {m["export_key"] for m in metas.values()}
    assert len(keys) == 1 and next(iter(keys)).startswith("sha256:")
    # The trainer's checkpoints hold Adam's slots too: the weights were copied
    # out of them, with no TensorFlow in the exporter (no reference outputs).
    assert metas[3]["export"]["incremental"] == {
        "template": str(versions[2]),
        "variables": 4,
        "weights": "copied",
    }
    assert [e["weights"] for e in exported] == [None, "copied", "copied"]
    reports = {v: json.loads((versions[v] / REPORT_RELPATH).read_text()) for v in (1, 2, 3)}
    assert [reports[v].get("reference") for v in (1, 2, 3)] == [
        None,
        "none: linked weights, checked by their weights map",
        "none: linked weights, checked by their weights map",
    ]
    assert [reports[v]["weights"]["matched_by"] for v in (1, 2, 3)] == ["key"] * 3
    # The graph is the first version's, byte for byte; the weights are not.
    assert (versions[3] / "saved_model.pb").read_bytes() == (
        versions[1] / "saved_model.pb"
    ).read_bytes()
    # The validator placed v1's graph in full, as the server does; v2 and v3 bring
    # that same graph, so only what runs was placed again.
    placements = [
        json.loads((versions[v] / REPORT_RELPATH).read_text())["checks"][0]["placement"]
        for v in (1, 2, 3)
    ]
    assert placements == ["full", "pruned", "pruned"]
    # v1's validator was kept with its session of that graph (the graph key),
    # handed v2's and v3's requests when their exports started, and restored
    # only their variables: nothing to import ahead (see test_warm.py for the
    # preload of single-use validators).
    loads = [json.loads((versions[v] / REPORT_RELPATH).read_text())["checks"][0] for v in (1, 2, 3)]
    assert [c["kept"] for c in loads] == [False, True, True]
    assert [c["preloaded"] for c in loads] == [False, False, False]
    assert (versions[3] / "variables" / "variables.data-00000-of-00001").read_bytes() != (
        versions[1] / "variables" / "variables.data-00000-of-00001"
    ).read_bytes()
    assert not (versions[3] / "fingerprint.pb").exists()

    # TF2's loader (object graph + checkpoint) serves ckpt-15's model too.
    script = f"""
import numpy as np, tensorflow as tf
from daemon.demo.model import build_model
model = build_model()
tf.train.Checkpoint(model=model).read({str(tmp_path / "ckpts" / "ckpt-15")!r}).expect_partial()
x = np.linspace(-2, 2, 8, dtype="float32").reshape(2, 4)
served = tf.saved_model.load({str(versions[3])!r}).signatures["serving_default"]
out = served(features=tf.constant(x))["output_0"].numpy()
np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-5, atol=1e-6)
"""
    run_script(script)


def test_a_template_without_a_weights_map_is_used_through_tensorflow(
    tmp_path: Path, daemons: Any
) -> None:
    """A version with no weights map (made by an earlier release): restore, then write."""
    train(tmp_path / "ckpts", 1)  # ckpt-5
    d = daemons(write_config(tmp_path), tmp_path / "daemon.log")
    d.wait_for(_published(1), timeout=120)
    first = version_dirs(tmp_path / "serving" / "m")[1]
    (first / incremental.WEIGHTS_MAP_RELPATH).unlink()
    _train_again(tmp_path / "ckpts")
    d.wait_for(_published(2), timeout=240)
    assert d.stop() == 0
    second = version_dirs(tmp_path / "serving" / "m")[2]
    (exported,) = [e for e in _exported(d) if e["checkpoint"].endswith("ckpt-7")]
    assert exported["incremental_from"] == str(first) and exported["weights"] is None
    assert "has no assets.extra/ckpt_exporter_weights.json" in exported["link_fallback"]
    report = json.loads((second / REPORT_RELPATH).read_text())
    # Compared with the in-memory model's outputs, and mapped again for the next export.
    assert "reference" not in report
    assert report["signatures"]["serving_default"]["inputs_from"] == "reference"
    assert report["weights"]["matched_by"] == "key"
    assert (second / incremental.WEIGHTS_MAP_RELPATH).exists()


def test_incremental_export_can_be_switched_off(tmp_path: Path, daemons: Any) -> None:
    train(tmp_path / "ckpts", 2)
    d = daemons(write_config(tmp_path, incremental_export=False), tmp_path / "daemon.log")
    d.wait_for(_published(2), timeout=240)
    assert d.stop() == 0
    assert [e["incremental_from"] for e in _exported(d)] == [None, None]
    metas = [read_metadata(p) or {} for p in version_dirs(tmp_path / "serving" / "m").values()]
    assert [m["export_key"] for m in metas] == [None, None]
    assert [m["export"]["incremental"] for m in metas] == [{}, {}]


BUILDER = """
import keras
import helper

def build():
    inputs = keras.Input(shape=(4,), name="features")
    hidden = keras.layers.Dense(16, activation=helper.ACTIVATION, name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1, name="prediction")(hidden))
"""


def test_a_graph_that_no_longer_matches_the_builder_is_exported_again_in_full(
    tmp_path: Path, daemons: Any
) -> None:
    """The builder's own file is unchanged (same export key); a module it imports is not."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "bld.py").write_text(BUILDER)
    (code / "helper.py").write_text('ACTIVATION = "relu"\n')
    train(tmp_path / "ckpts", 1)  # ckpt-5
    config = write_config(tmp_path, builder="bld:build", python_path=[str(code)])
    d = daemons(config, tmp_path / "daemon.log")
    d.wait_for(_published(1), timeout=120)

    (code / "helper.py").write_text('ACTIVATION = "tanh"\n')
    _train_again(tmp_path / "ckpts")
    ev = d.wait_for(_published(2), timeout=240)
    assert d.stop() == 0
    # The worker kept from version 1 still runs the old helper: retired, not reused.
    first_worker = next(e["pid"] for e in ev if e["event"] == "child_started")
    changed = [e for e in ev if e["event"] == "exporter_retired" and e["pid"] == first_worker]
    assert [e["reason"] for e in changed] == [f"code_changed: {code / 'helper.py'}"], changed
    (failed,) = [e for e in ev if e["event"] == "incremental_export_failed"]
    assert failed["checkpoint"].endswith("ckpt-7") and failed["reason"] == "output_mismatch"
    exported = [e for e in _exported(d) if e["checkpoint"].endswith("ckpt-7")]
    assert [bool(e["incremental_from"]) for e in exported] == [True, False]
    # Not linked either: the weights map of version 1 names the helper as it was.
    assert f"{code / 'helper.py'}, imported by the builder, changed" in exported[0]["link_fallback"]
    assert not any(e["event"] in ("export_rejected", "export_failed") for e in ev)
    versions = version_dirs(tmp_path / "serving" / "m")
    assert (versions[2] / "saved_model.pb").read_bytes() != (
        versions[1] / "saved_model.pb"
    ).read_bytes()


def test_a_template_that_does_not_fit_the_model_falls_back_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    script = f"""
import os, keras, tensorflow as tf
from daemon.children import incremental
from daemon.demo.model import build_model
template, out = {str(tmp_path / "template")!r}, {str(tmp_path / "out")!r}
build_model().export(template, verbose=False)
os.mkdir(out)

inputs = keras.Input(shape=(4,), name="features")
hidden = keras.layers.Dense(16, name="hidden")(inputs)
extra = keras.layers.Dense(8, name="extra")(hidden)
bigger = keras.Model(inputs, keras.layers.Dense(1, name="prediction")(extra))
try:
    incremental.write(bigger, template, out)
    raise SystemExit("a model with an extra layer was written into the old graph")
except incremental.Fallback as e:
    assert "extra/kernel" in str(e), e
assert os.listdir(out) == [], os.listdir(out)

class Same(tf.Module):
    def __init__(self):
        self.a = tf.Variable(tf.zeros([4, 16]), name="hidden/kernel")
        self.b = tf.Variable(tf.zeros([4, 16]), name="hidden/kernel")
try:
    incremental.write(Same(), template, out)
    raise SystemExit("two variables with one name were matched")
except incremental.Fallback as e:
    assert "two variables of the model are named 'hidden/kernel'" in str(e), e
assert os.listdir(out) == []
print("ok")
"""
    run_script(script)


def test_a_validator_started_with_an_export_that_fails_is_stopped(
    tmp_path: Path, daemons: Any
) -> None:
    train(tmp_path / "ckpts", 1)  # ckpt-5
    d = daemons(write_config(tmp_path), tmp_path / "daemon.log")
    d.wait_for(_published(1), timeout=120)
    # ckpt-10, written elsewhere, lands with bytes flipped inside its data shard:
    # its index is complete, so the daemon exports it, and the restore fails.
    other = tmp_path / "other"
    train(other, 2)
    (shard,) = other.glob("ckpt-10.data-*")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.rename(shard, tmp_path / "ckpts" / shard.name)
    os.rename(other / "ckpt-10.index", tmp_path / "ckpts" / "ckpt-10.index")
    ev = d.wait_for(
        lambda ev: any(e["event"] == "export_rejected" for e in ev), what="ckpt-10 rejected"
    )
    (rejected,) = [e for e in ev if e["event"] == "export_rejected"]
    assert rejected["checkpoint"].endswith("ckpt-10") and rejected["phase"] == "export"
    assert rejected["reason"] == "checkpoint_corrupt", rejected
    (early,) = [e for e in ev if e["event"] == "child_started" and e.get("early")]
    assert early["checkpoint"].endswith("ckpt-10")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not pid_gone(early["pid"]):
        time.sleep(0.1)
    assert pid_gone(early["pid"])
    assert sum(e["event"] == "validated" for e in d.events()) == 1
    assert d.stop() == 0


MODULE_BUILDER = """
import tensorflow as tf

class Linear(tf.Module):
    def __init__(self):
        self.w = tf.Variable(tf.zeros([4, 1]), name="linear/kernel")
        self.b = tf.Variable(tf.zeros([1]), name="linear/bias")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
    def __call__(self, x):
        return {"prediction": tf.matmul(x, self.w) + self.b}

def build():
    return Linear()
"""

MODULE_TRAINER = """
import sys, tensorflow as tf
sys.path.insert(0, sys.argv[2])
import linear
m = linear.build()
manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=m), sys.argv[1], max_to_keep=5)
for step in range(int(sys.argv[3])):
    m.w.assign_add(tf.fill([4, 1], 0.5))
    m.b.assign_add([1.0])
manager.save(checkpoint_number=int(sys.argv[3]))  # ckpt-1, then ckpt-2
"""


def test_a_tf_module_model_gets_a_weights_map_and_its_next_export_needs_no_tensorflow(
    tmp_path: Path, daemons: Any
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "linear.py").write_text(MODULE_BUILDER)
    ckpts = tmp_path / "ckpts"
    run_script(MODULE_TRAINER, str(ckpts), str(code), "1")
    config = write_config(tmp_path, builder="linear:build", python_path=[str(code)])
    d = daemons(config, tmp_path / "daemon.log")
    d.wait_for(_published(1), timeout=120)
    run_script(MODULE_TRAINER, str(ckpts), str(code), "2")
    d.wait_for(_published(2), timeout=120)
    assert d.stop() == 0
    first, second = _exported(d)
    assert first["incremental_from"] is None
    # Version 1 recorded where each tf.Variable came from, so version 2 took its
    # weights from the checkpoint's bytes, and the validator proved them by key.
    assert second["incremental_from"] and second["weights"] in ("linked", "copied"), second
    versions = version_dirs(tmp_path / "serving" / "m")
    report = json.loads((versions[2] / REPORT_RELPATH).read_text())
    assert report["weights"]["matched_by"] == "key" and report["weights"]["variables"] == 2
