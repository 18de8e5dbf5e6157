"""End-to-end validation: what TF Serving will serve is proven before the rename.

Real trainers, real daemons, real SavedModels: a good checkpoint passes with
a report and a replayed warmup file; checkpoints crafted to fail (NaN
weights, outputs far from the golden ones, a warmup record of the wrong
dtype, classify signatures that break the Classify API's rules) are rejected
with the right reason and never published; gates block a worse checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, run_script, train, version_dirs, write_config
from test_e2e import cli

from daemon.basepath.catalog import read_metadata
from daemon.basepath.layout import REPORT_RELPATH
from daemon.basepath.records import read_rejected

pytestmark = pytest.mark.e2e


def _events(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == name]


def _npz(path: Path, **arrays: Any) -> Path:
    import numpy as np

    np.savez(path, **arrays)
    return path


def test_a_good_checkpoint_passes_with_a_report_and_a_replayed_warmup_file(
    tmp_path: Path, daemons: Any
) -> None:
    import numpy as np

    train(tmp_path / "ckpts", 1)
    # float64, as numpy writes by default: converted to the signature's float32.
    samples = _npz(tmp_path / "samples.npz", features=np.linspace(-1, 1, 12).reshape(3, 4))
    config = write_config(tmp_path, sample_inputs=str(samples), warmup_records=4)
    d = daemons(config, tmp_path / "daemon.log")
    d.wait_for(lambda ev: any(e["event"] == "published" for e in ev), timeout=180)
    assert d.stop() == 0

    version = version_dirs(tmp_path / "serving" / "m")[1]
    report = json.loads((version / REPORT_RELPATH).read_text())
    assert report["verdict"] == "passed" and report["ok"] is True
    assert report["checkpoint"].endswith("ckpt-5") and report["step"] == 5
    checks = {c["check"]: c for c in report["checks"]}
    assert list(checks) == ["serving_load", "signatures", "warmup", "weight_parity"]
    assert all(c["ok"] and c["seconds"] >= 0 for c in checks.values())
    default = report["signatures"]["serving_default"]
    assert default["inputs"] == {"features": ["float32", [3, 4]]}  # the samples' batch of 3
    assert default["outputs"] == {"output_0": [3, 1]}
    assert report["warmup"] == {"records": 4, "replayed": {"predict_log": 4}}
    assert report["weights"]["variables"] == 4  # two kernels, two biases, each saved once
    meta = read_metadata(version)
    assert meta is not None
    assert meta["validation"]["checks"] == list(checks)
    assert meta["export"]["warmup"] == {"records": 4}
    validated = _events(d, "validated")[0]
    assert validated["warmup_records"] == 4 and validated["weights_matched"] == 4

    # The published warmup file holds exactly what the server will replay.
    r = cli("validate", str(version), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["warmup"]["replayed"] == {"predict_log": 4}
    script = f"""
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
path = {str(version / "assets.extra" / "tf_serving_warmup_requests")!r}
records = tf.data.TFRecordDataset(path)
logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in records]
assert len(logs) == 4, len(logs)
req = logs[0].predict_log.request
assert req.model_spec.name == "m" and req.model_spec.signature_name == "serving_default"
x = tf.make_ndarray(req.inputs["features"])
assert x.dtype.name == "float32" and x.shape == (3, 4), (x.dtype, x.shape)
assert abs(float(x[0, 0]) + 1.0) < 1e-6
"""
    run_script(script)


def _write_checkpoint(ckpt_dir: Path, change: str) -> None:
    """One real CheckpointManager checkpoint (step 7) of the demo model after ``change``."""
    script = f"""
import tensorflow as tf, numpy as np
from daemon.demo.model import build_model
model = build_model()
{change}
ckpt = tf.train.Checkpoint(model=model, step=tf.Variable(7, dtype=tf.int64))
tf.train.CheckpointManager(ckpt, {str(ckpt_dir)!r}, max_to_keep=3).save(checkpoint_number=7)
"""
    run_script(script)


def _rejected_export(tmp_path: Path, daemons: Any, **model: Any) -> dict[str, Any]:
    """Run the daemon on ckpts/ until the export is rejected; its event."""
    config = write_config(tmp_path, **model)
    d = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: any(e["event"] == "export_rejected" for e in ev), timeout=180)
    assert d.stop() == 0
    assert not version_dirs(tmp_path / "serving" / "m"), "a rejected export was published"
    assert not any(e["event"] == "published" for e in ev)
    (rejected,) = [e for e in ev if e["event"] == "export_rejected"]
    return rejected


def _kept_report(tmp_path: Path) -> dict[str, Any]:
    (kept,) = (tmp_path / "serving" / "m" / ".ckpt-exporter" / "failed").iterdir()
    report: dict[str, Any] = json.loads((kept / REPORT_RELPATH).read_text())
    return report


def test_nan_weights_are_rejected_as_not_finite_with_the_report_kept(
    tmp_path: Path, daemons: Any
) -> None:
    _write_checkpoint(
        tmp_path / "ckpts",
        "model.get_layer('prediction').kernel.assign(tf.fill([16, 1], float('nan')))",
    )
    rejected = _rejected_export(tmp_path, daemons)
    assert rejected["phase"] == "validate" and rejected["reason"] == "not_finite"
    assert "'output_0' is not finite" in rejected["error"]
    report = _kept_report(tmp_path)
    assert report["verdict"] == "failed" and report["reason"] == "not_finite"
    assert [c["check"] for c in report["checks"]] == ["serving_load", "signatures"]
    assert report["checks"][-1]["ok"] is False
    fingerprints = read_rejected(tmp_path / "serving" / "m")
    assert [v["reason"] for v in fingerprints.values()] == ["not_finite"]


def test_outputs_far_from_the_golden_ones_are_rejected(tmp_path: Path, daemons: Any) -> None:
    import numpy as np

    train(tmp_path / "ckpts", 1)
    samples = _npz(tmp_path / "samples.npz", features=np.ones((2, 4), np.float32))
    golden = _npz(tmp_path / "golden.npz", output_0=np.full((2, 1), 1000.0, np.float32))
    rejected = _rejected_export(
        tmp_path, daemons, sample_inputs=str(samples), golden_outputs=str(golden)
    )
    assert rejected["reason"] == "golden_mismatch", rejected
    assert "'output_0' differs from golden_outputs'" in rejected["error"]
    report = _kept_report(tmp_path)
    assert report["checks"][-1] == {**report["checks"][-1], "check": "golden_outputs", "ok": False}


def test_a_warmup_record_of_the_wrong_dtype_fails_the_export_not_the_server(
    tmp_path: Path, daemons: Any
) -> None:
    """A SavedModel that brings its own warmup file: a float64 record for a float32 input."""
    exported = tmp_path / "exports" / "1700000000"
    script = f"""
import numpy as np, tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
from daemon.demo.model import build_model
path = {str(exported)!r}
build_model().export(path, verbose=False)
log = prediction_log_pb2.PredictionLog()
log.predict_log.request.inputs["features"].CopyFrom(tf.make_tensor_proto(np.ones((1, 4))))
tf.io.gfile.makedirs(path + "/assets.extra")
with tf.io.TFRecordWriter(path + "/assets.extra/tf_serving_warmup_requests") as w:
    w.write(log.SerializeToString())
"""
    run_script(script)
    rejected = _rejected_export(
        tmp_path,
        daemons,
        source="saved_model",
        checkpoint_dir=str(tmp_path / "exports"),
        builder="",
    )
    assert rejected["reason"] == "warmup_failed", rejected
    assert "record 0: input 'features' is float64" in rejected["error"]
    assert "takes float32" in rejected["error"]


def test_a_missing_variables_dir_is_caught_at_the_serving_load(tmp_path: Path) -> None:
    """A SavedModel whose variables/ went missing never reaches the signatures."""
    train(tmp_path / "ckpts", 1)
    prefix = tmp_path / "ckpts" / "ckpt-5"
    sm = tmp_path / "sm"
    script = f"""
import shutil, tensorflow as tf
from daemon.demo.model import build_model
model = build_model()
tf.train.Checkpoint(model=model).read({str(prefix)!r}).expect_partial()
model.export({str(sm)!r}, verbose=False)
shutil.rmtree({str(sm / "variables")!r})
"""
    run_script(script)
    r = cli("validate", str(sm), "--checkpoint", str(prefix), "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["permanent"] is True
    assert report["reason"] == "load_failed", report
    assert "variables/variables" in report["error"]
    assert report["checks"] == [{**report["checks"][0], "check": "serving_load", "ok": False}]


CLASSIFY_SCRIPT = """
import sys
import numpy as np, tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2
v1 = tf.compat.v1
path, scores_dtype = sys.argv[1], sys.argv[2]
graph = tf.Graph()
with graph.as_default(), v1.Session() as sess:
    serialized = v1.placeholder(tf.string, [None], name="tf_example")
    parsed = tf.io.parse_example(serialized, {
        "x": tf.io.FixedLenFeature([2], tf.float32),
        "bucket": tf.io.FixedLenFeature([], tf.int64),
    })
    w = v1.get_variable("w", initializer=tf.constant([[1.0, -1.0], [0.5, 2.0]]))
    logits = tf.matmul(parsed["x"], w) + tf.cast(parsed["bucket"], tf.float32)[:, None]
    scores = tf.cast(tf.nn.softmax(logits), scores_dtype)
    classes = tf.tile(tf.constant([[b"a", b"b"]]), [tf.shape(logits)[0], 1])
    utils = v1.saved_model.signature_def_utils
    sigs = {
        "serving_default": utils.predict_signature_def(
            {"examples": serialized}, {"scores": scores}
        ),
        # By hand: classification_signature_def itself refuses float64 scores.
        "classification": utils.build_signature_def(
            {"inputs": v1.saved_model.utils.build_tensor_info(serialized)},
            {k: v1.saved_model.utils.build_tensor_info(t)
             for k, t in (("classes", classes), ("scores", scores))},
            "tensorflow/serving/classify",
        ),
        "regression": utils.regression_signature_def(serialized, logits[:, :1]),
    }
    sess.run(v1.global_variables_initializer())
    b = v1.saved_model.Builder(path)
    b.add_meta_graph_and_variables(sess, ["serve"], signature_def_map=sigs)
    b.save()
example = tf.train.Example()
example.features.feature["x"].float_list.value.extend([0.1, 0.2])
example.features.feature["bucket"].int64_list.value.append(3)
log = prediction_log_pb2.PredictionLog()
log.classify_log.request.model_spec.signature_name = "classification"
log.classify_log.request.input.example_list.examples.add().CopyFrom(example)
tf.io.gfile.makedirs(path + "/assets.extra")
with tf.io.TFRecordWriter(path + "/assets.extra/tf_serving_warmup_requests") as w:
    w.write(log.SerializeToString())
"""


def test_classify_and_regress_signatures_run_on_examples_the_graph_parses(
    tmp_path: Path,
) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    run_script(CLASSIFY_SCRIPT, str(good), "float32")
    r = cli("validate", str(good), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    sigs = report["signatures"]
    assert sigs["classification"]["method"] == "tensorflow/serving/classify"
    assert sigs["classification"]["inputs_from"] == "synthesised"
    assert sigs["classification"]["outputs"] == {"classes": [1, 2], "scores": [1, 2]}
    assert sigs["regression"]["outputs"] == {"outputs": [1, 1]}
    assert all(s["ok"] for s in sigs.values())
    assert report["warmup"] == {"records": 1, "replayed": {"classify_log": 1}}

    # scores as float64: TF Serving's Classify API refuses them (DT_FLOAT only).
    run_script(CLASSIFY_SCRIPT, str(bad), "float64")
    r = cli("validate", str(bad), "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["reason"] == "signature_failed"
    assert report["signatures"]["classification"]["reason"] == "signature_rules"
    assert "'scores' must be float32" in report["signatures"]["classification"]["error"]
    assert report["signatures"]["regression"]["ok"] is True


def _metrics(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_metric_gate_blocks_a_worse_checkpoint_and_waits_for_a_late_metric(
    tmp_path: Path, daemons: Any
) -> None:
    ckpts = tmp_path / "ckpts"
    train(ckpts, 3)  # ckpt-5, ckpt-10, ckpt-15
    # ckpt-15's evaluation has not landed yet.
    _metrics(ckpts / "metrics.json", [{"step": 5, "val_loss": 0.5}, {"step": 10, "val_loss": 0.7}])
    config = write_config(
        tmp_path, gate={"metric": "val_loss", "json_file": "metrics.json", "wait_seconds": 300}
    )
    d = daemons(config, tmp_path / "daemon.log")
    d.wait_for(lambda ev: any(e["event"] == "gate_waiting" for e in ev), timeout=180)
    (gated,) = _events(d, "gated_out")
    assert gated["checkpoint"].endswith("ckpt-10") and gated["gate"] == "metric"
    assert gated["value"] == 0.7 and gated["better_than"] == 0.5
    assert "val_loss = 0.7 is not lower than 0.5" in gated["detail"]
    assert len(_events(d, "published")) == 1

    _metrics(
        ckpts / "metrics.json",
        [
            {"step": 5, "val_loss": 0.5},
            {"step": 10, "val_loss": 0.7},
            {"step": 15, "val_loss": 0.4},
        ],
    )
    d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 2, timeout=180)
    assert d.stop() == 0
    versions = version_dirs(tmp_path / "serving" / "m")
    steps = {v: (read_metadata(p) or {})["checkpoint"]["step"] for v, p in versions.items()}
    assert steps == {1: 5, 2: 15}
    meta = read_metadata(versions[2]) or {}
    assert meta["gate"] == {"metric": "val_loss", "value": 0.4, "mode": "min", "better_than": 0.5}
    rejected = read_rejected(tmp_path / "serving" / "m")
    assert [(v["reason"], v["gate"]) for v in rejected.values()] == [("gated_out", "metric")]
    assert "gate_waiting" in {e["event"] for e in d.events()}


def test_a_command_gate_sees_the_validated_export_and_its_exit_status_decides(
    tmp_path: Path, daemons: Any
) -> None:
    train(tmp_path / "ckpts", 2)  # ckpt-5, ckpt-10
    check = (
        f"test -f {{export_dir}}/{REPORT_RELPATH} && echo checked {{model}} {{step}} "
        "&& test {step} != 10"
    )
    config = write_config(tmp_path, gate={"command": ["sh", "-c", check]})
    d = daemons(config, tmp_path / "daemon.log")
    d.wait_for(
        lambda ev: (
            any(e["event"] == "gated_out" for e in ev)
            and any(e["event"] == "published" for e in ev)
        ),
        timeout=180,
    )
    assert d.stop() == 0
    (gated,) = _events(d, "gated_out")
    assert gated["gate"] == "command" and gated["checkpoint"].endswith("ckpt-10")
    assert "exited with status 1" in gated["detail"]
    assert "checked m 10" in gated["output_tail"]
    (published,) = _events(d, "published")
    assert published["step"] == 5
    meta = read_metadata(version_dirs(tmp_path / "serving" / "m")[1]) or {}
    assert meta["gate_command"]["exit_status"] == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_validate_command_takes_sample_inputs_and_golden_outputs(tmp_path: Path) -> None:
    import numpy as np

    sm = tmp_path / "sm"
    x = np.linspace(-1, 1, 8, dtype="float32").reshape(2, 4)
    samples = _npz(tmp_path / "samples.npz", features=x)
    script = f"""
import numpy as np
from daemon.demo.model import build_model
model = build_model()
model.export({str(sm)!r}, verbose=False)
np.savez({str(tmp_path / "golden.npz")!r}, output_0=model(np.load({str(samples)!r})["features"]))
"""
    run_script(script)
    r = cli(
        "validate", str(sm), "--sample-inputs", str(samples),
        "--golden-outputs", str(tmp_path / "golden.npz"), "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["signatures"]["serving_default"]["inputs_from"] == "sample_inputs"
    assert [c["check"] for c in report["checks"]] == [
        "serving_load",
        "signatures",
        "golden_outputs",
    ]

    wrong = _npz(tmp_path / "wrong.npz", output_0=np.zeros((2, 1), np.float32) + 50)
    r = cli("validate", str(sm), "--sample-inputs", str(samples), "--golden-outputs", str(wrong))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "check golden_outputs: FAILED (golden_mismatch)" in r.stdout
