"""Serving modules as builders, and a wrong builder that pauses instead of rejecting.

A builder may return ``(module, restore_target[, signatures])``: the module
(shaped like Model Garden's ``ClassificationModule``, tests/builders/serving_modules.py)
is exported with its own signatures, preprocessing and output names, the
checkpoint's ``model`` is restored into ``module.model``, and weight parity,
the weights map and linked exports work through it. A restore mismatch
blames the builder (``builder_mismatch``: the model pauses) until a version
made with that builder was published; its message names a few variables
with shapes, never their values.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, child_env, version_dirs, write_config

from daemon.basepath.layout import REPORT_RELPATH, WEIGHTS_MAP_RELPATH
from daemon.children.exporters import tf_checkpoint
from daemon.rules.failures import FAILURES, MODEL_FAILURES

BUILDERS = Path(__file__).parent / "builders"


def _train(ckpts: Path, checkpoints: int) -> None:
    subprocess.run(
        [sys.executable, str(BUILDERS / "serving_modules.py"), str(ckpts), str(checkpoints)],
        env=child_env(),
        check=True,
        capture_output=True,
        timeout=120,
    )


def _published(n: int) -> Any:
    return lambda ev: sum(e["event"] == "published" for e in ev) >= n


# --- fast: the message and the registry ---------------------------------------


def test_a_mismatch_message_names_a_few_variables_with_shapes_and_never_their_values() -> None:
    unrestored = [f"layer_{i}/kernel float32 [4, 16]" for i in range(9)]
    numbers = ", ".join(f"{i}.123456" for i in range(3000))
    error = AssertionError(
        "Found 9 Python objects that were not bound to checkpointed values, likely due to "
        "changes in the Python program. Showing 9 of 9 unmatched objects: "
        f"[<tf.Variable 'layer_0/kernel:0' shape=(4, 16) dtype=float32, numpy=\narray([[{numbers}"
        "]], dtype=float32)>, <KerasVariable shape=(16,), dtype=float32, path=layer_0/bias, "
        f"numpy=array([{numbers}], dtype=float32)>]"
    )
    message = tf_checkpoint.mismatch_message("ckpt-5", "model", 12, unrestored, error)
    assert message.startswith("the builder's model does not match checkpoint ckpt-5 under 'model'")
    assert "9 of its 12 variables were not restored: layer_0/kernel float32 [4, 16]" in message
    assert "layer_4/kernel float32 [4, 16] and 4 more" in message
    assert "layer_5/" not in message
    assert "AssertionError: Found 9 Python objects that were not bound" in message
    assert "123456" not in message and "array(" not in message and "numpy=" not in message
    assert "\n" not in message
    assert len(message) <= tf_checkpoint.MISMATCH_MAX_CHARS


def test_a_keras_variable_repr_loses_its_value_too() -> None:
    error = AssertionError(
        "Found 1 Python objects that were not bound to checkpointed values. Showing 1 of 1 "
        "unmatched objects: [<Variable path=head/bias, shape=(5,), dtype=float32, "
        "value=[0.25 0.5 0.75 1. 1.25]>]"
    )
    message = tf_checkpoint.mismatch_message("ckpt-2", "model", 6, ["head/bias float32 [5]"], error)
    assert "1 of its 6 variables were not restored: head/bias float32 [5]" in message
    assert "0.25" not in message and "value=" not in message
    assert message.endswith("Showing 1 of 1 unmatched objects")


def test_a_mismatch_message_is_capped_whatever_tensorflow_says() -> None:
    error = ValueError("Received incompatible tensor with shape (4, 8) " + "x" * 10_000)
    message = tf_checkpoint.mismatch_message("ckpt-1", "model", 3, [], error)
    assert "ValueError: Received incompatible tensor with shape (4, 8)" in message
    assert len(message) < 700 and message.endswith("...")
    many = [f"a_rather_long_layer_name_{i}/" * 20 + " float32 [1]" for i in range(5)]
    message = tf_checkpoint.mismatch_message("ckpt-1", "model", 9, many, error)
    assert len(message) == tf_checkpoint.MISMATCH_MAX_CHARS and message.endswith("...")


def test_builder_mismatch_pauses_the_model_and_restore_mismatch_rejects_the_checkpoint() -> None:
    assert "builder_mismatch" in MODEL_FAILURES
    assert FAILURES["builder_mismatch"].phases == ("export",)
    assert FAILURES["restore_mismatch"].kind == "permanent"


def test_who_is_blamed_depends_on_whether_the_builder_has_published() -> None:
    builder = tf_checkpoint._mismatch(False, "m")
    checkpoint = tf_checkpoint._mismatch(True, "m")
    assert (builder.reason, builder.permanent) == ("builder_mismatch", True)
    assert "reload" in str(builder)
    assert (checkpoint.reason, checkpoint.permanent) == ("restore_mismatch", True)


# --- end to end -----------------------------------------------------------------


@pytest.mark.e2e
def test_a_serving_module_is_exported_with_its_own_signature_and_its_weights_linked(
    tmp_path: Path, daemons: Any
) -> None:
    """Model Garden's shape: module.model restored, module's preprocessing and outputs served."""
    ckpts = tmp_path / "ckpts"
    _train(ckpts, 2)  # ckpt-2, ckpt-4
    config = write_config(
        tmp_path, builder="serving_modules:model_garden_style", python_path=[str(BUILDERS)]
    )
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    d.wait_for(_published(2), timeout=80, what="two versions")
    assert d.stop() == 0
    versions = version_dirs(tmp_path / "serving" / "m")
    assert sorted(versions) == [1, 2]
    exported = [e for e in d.events() if e["event"] == "exported"]
    # The second checkpoint needed no TensorFlow: its shards were linked under v1's graph.
    assert [e["weights"] for e in exported] == [None, "linked"], exported
    assert exported[1]["incremental_from"] == str(versions[1])
    assert (versions[1] / WEIGHTS_MAP_RELPATH).exists()
    reports = {v: json.loads((versions[v] / REPORT_RELPATH).read_text()) for v in (1, 2)}
    for v in (1, 2):
        # Weight parity covers every variable of the model (3 layers, kernel and bias).
        assert reports[v]["weights"]["variables"] == 6, reports[v]["weights"]
        assert reports[v]["weights"]["matched_by"] == "key"
        declared = reports[v]["signatures"]["serving_default"]["declared"]
        assert declared["inputs"] == {"inputs": {"dtype": "uint8", "shape": [None, 32, 32, 3]}}
        assert sorted(declared["outputs"]) == ["logits", "probs"]

    # Each version answers as the module in memory does, restored from its checkpoint:
    # the module's normalisation and resizing are in the served graph.
    script = f"""
import sys
import numpy as np, tensorflow as tf
sys.path.insert(0, {str(BUILDERS)!r})
import serving_modules as sm
x = np.random.default_rng(7).integers(0, 256, (3, 32, 32, 3)).astype("uint8")
for version, step in ((1, 2), (2, 4)):
    module = sm.module()
    prefix = {str(ckpts)!r} + f"/ckpt-{{step}}"
    tf.train.Checkpoint(model=module.model).read(prefix).expect_partial()
    want = module.serve(tf.constant(x))
    g = tf.Graph()
    with g.as_default(), tf.compat.v1.Session() as s:
        path = {str(tmp_path / "serving" / "m")!r} + f"/{{version}}"
        sig = tf.compat.v1.saved_model.loader.load(s, ["serve"], path).signature_def[
            "serving_default"
        ]
        got = s.run(
            {{k: t.name for k, t in sig.outputs.items()}}, {{sig.inputs["inputs"].name: x}}
        )
    for key in ("logits", "probs"):
        np.testing.assert_allclose(got[key], want[key].numpy(), rtol=1e-5, atol=1e-6)
    # Not the model on the raw pixels (the plain image_tensor wrapper's answer).
    raw = module.model(tf.image.resize(tf.cast(x, tf.float32), [24, 24])).numpy()
    assert not np.allclose(got["logits"], raw, atol=1e-3)
print("ok")
"""
    r = subprocess.run(
        [sys.executable, "-c", script],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.e2e
def test_a_wrong_builder_pauses_the_model_and_a_reload_with_the_right_one_publishes(
    tmp_path: Path, daemons: Any
) -> None:
    ckpts = tmp_path / "ckpts"
    _train(ckpts, 2)
    # The module alone: the checkpoint's model is restored into the module.
    config = write_config(
        tmp_path, builder="serving_modules:module_alone", python_path=[str(BUILDERS)]
    )
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: any(e["event"] == "model_paused" for e in ev), what="the pause")
    paused = next(e for e in ev if e["event"] == "model_paused")
    assert paused["reason"] == "builder_mismatch", paused
    assert "not bound to checkpointed values" in paused["error"]
    assert "were not restored: conv/kernel float32 [3, 3, 3, 32]" in paused["error"]
    assert "value=" not in paused["error"] and "numpy=" not in paused["error"]
    assert len(paused["error"]) <= tf_checkpoint.MISMATCH_MAX_CHARS + 300  # and the advice
    assert d.count("export_started") == 1
    base = tmp_path / "serving" / "m"
    assert not (base / ".ckpt-exporter" / "rejected.json").exists()

    config.write_text(config.read_text().replace("module_alone", "module_and_model"))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(_published(2), timeout=60, what="both pending checkpoints published")
    assert d.stop() == 0
    assert sorted(version_dirs(base)) == [1, 2]
    assert not (base / ".ckpt-exporter" / "rejected.json").exists()


@pytest.mark.e2e
def test_once_the_builder_has_published_a_mismatch_rejects_the_checkpoint(
    tmp_path: Path,
) -> None:
    """The worker's rule: with a template (a version of this builder published), blame the ckpt."""
    sys.path.insert(0, str(BUILDERS))
    try:
        import serving_modules
    finally:
        sys.path.remove(str(BUILDERS))
    from daemon.children import runtime
    from daemon.demo.model import build_model

    _train(tmp_path / "ckpts", 1)
    prefix = str(tmp_path / "ckpts" / "ckpt-2")
    module = serving_modules.module()
    for proven, reason in ((False, "builder_mismatch"), (True, "restore_mismatch")):
        # The module itself as the target, and another model altogether.
        for target in (module, build_model()):
            with pytest.raises(runtime.ChildFailure) as caught:
                tf_checkpoint._restore(target, "model", prefix, builder_proven=proven)
            assert caught.value.reason == reason and caught.value.permanent
            assert "value=" not in str(caught.value) and "numpy=" not in str(caught.value)
        with pytest.raises(runtime.ChildFailure) as caught:
            tf_checkpoint._restore(module.model, "net", prefix, builder_proven=proven)
        assert caught.value.reason == reason and "has no object 'net'" in str(caught.value)
    n, _ = tf_checkpoint._restore(module.model, "model", prefix, builder_proven=False)
    assert n == 6
