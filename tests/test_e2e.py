"""End-to-end: real trainer, real daemon process, real TensorFlow, real signals.

These are the decisive tests of the core promise: every checkpoint becomes the
next version, no partial version is ever visible, a restart exports nothing
twice, a bad model is never published, and SIGTERM leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, cli, run_script, train, version_dirs, write_config

from daemon.basepath.catalog import read_metadata
from daemon.basepath.layout import METADATA_RELPATH, TEMP_PREFIX

pytestmark = pytest.mark.e2e
BUILDERS = str(Path(__file__).parent / "builders")


def _published(n: int) -> Any:
    return lambda ev: sum(e["event"] == "published" for e in ev) >= n


def _temp_dirs(base: Path) -> list[str]:
    return (
        [p.name for p in base.iterdir() if p.name.startswith(TEMP_PREFIX)] if base.exists() else []
    )


def test_training_run_becomes_versions_atomically_and_restart_exports_nothing_twice(
    tmp_path: Path, daemons: Any
) -> None:
    import numpy as np
    import tensorflow as tf

    from daemon.demo.model import build_model

    config = write_config(tmp_path)
    base = tmp_path / "serving" / "m"
    # The daemon starts before the trainer has created its directory: it must wait.
    d: Daemon = daemons(config, tmp_path / "daemon1.log")
    d.wait_for(
        lambda ev: any(e["event"] == "waiting_for_checkpoint_dir" for e in ev),
        what="the daemon to wait for the checkpoint dir",
    )

    # A reader lists the base path in a tight loop, as TF Serving does, and
    # records whether each version folder was complete the first time it saw it.
    first_sight: dict[int, bool] = {}
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for v, p in version_dirs(base).items():
                if v not in first_sight:
                    first_sight[v] = all(
                        (p / f).is_file()
                        for f in ("saved_model.pb", "variables/variables.index", METADATA_RELPATH)
                    )

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        train(tmp_path / "ckpts", 3, interval=1.0)
        d.wait_for(_published(3), timeout=240, what="three versions")
    finally:
        stop.set()
        t.join()
    assert first_sight == {1: True, 2: True, 3: True}

    # Each version serves exactly what the model restored from its checkpoint computes.
    versions = version_dirs(base)
    steps = []
    for v in sorted(versions):
        meta = read_metadata(versions[v])
        assert meta is not None and meta["version"] == v
        # The proof travels with it: each of the model's 4 variables, saved once.
        assert meta["validation"]["weights"]["variables"] == 4
        steps.append(meta["checkpoint"]["step"])
        model = build_model()
        tf.train.Checkpoint(model=model).read(
            meta["checkpoint"]["prefix"]
        ).assert_existing_objects_matched()
        x = np.random.default_rng(v).standard_normal((3, 4)).astype("float32")
        served = tf.saved_model.load(str(versions[v])).signatures["serving_default"]
        out = served(features=tf.constant(x))
        np.testing.assert_allclose(out["output_0"].numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert steps == [5, 10, 15]
    # The validator proved every exported variable holds a value from its checkpoint.
    validated = [e for e in d.events() if e["event"] == "validated"]
    assert [e["weights_matched"] for e in validated] == [4, 4, 4]

    # The metrics endpoint reports the newest version.
    port = next(e["address"] for e in d.events() if e["event"] == "metrics_listening").split(":")[1]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert re.search(r'^ckpt_exporter_latest_version\{model="m"\} 3\.0$', body, re.M), body
    assert re.search(
        r'^ckpt_exporter_exports_total\{model="m",outcome="published"\} 3\.0$', body, re.M
    )

    assert d.stop() == 0
    assert _temp_dirs(base) == []

    # Restart: the published checkpoints are recognised, nothing is exported again.
    d2: Daemon = daemons(config, tmp_path / "daemon2.log")
    d2.wait_for(lambda ev: any(e["event"] == "started" for e in ev), what="restart")
    time.sleep(3)  # three rescans
    assert d2.count("export_started") == 0

    # The trainer restarts from scratch (steps back to 5, new weights): still a new, higher version.
    train(tmp_path / "ckpts", 1, seed=1)
    d2.wait_for(_published(1), timeout=120, what="the restarted trainer's checkpoint")
    assert d2.stop() == 0
    versions = version_dirs(base)
    assert sorted(versions) == [1, 2, 3, 4]
    meta4 = read_metadata(versions[4])
    assert meta4 is not None and meta4["checkpoint"]["step"] == 5
    assert (
        meta4["checkpoint"]["fingerprint"]
        != read_metadata(versions[1])["checkpoint"]["fingerprint"]
    )  # type: ignore[index]


def test_a_keras_model_with_a_lookup_table_is_served_with_its_table_and_each_weight_once(
    tmp_path: Path,
) -> None:
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, BUILDERS)
    try:
        from models_for_tests import vocabulary
    finally:
        sys.path.remove(BUILDERS)
    model = vocabulary()
    for v in model.trainable_variables:
        v.assign(tf.random.stateless_normal(v.shape, seed=[1, 2]))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), tmp_path / "ckpts", 3)
    manager.save(checkpoint_number=1)
    config = write_config(tmp_path, builder="models_for_tests:vocabulary", python_path=[BUILDERS])
    r = cli("export", "--config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr

    version = version_dirs(tmp_path / "serving" / "m")[1]
    # TF Serving's graph-mode load (the validator) ran the signature with the table.
    meta = read_metadata(version)
    assert meta is not None and meta["validation"]["weights"]["variables"] == 3
    stored = [n for n, _ in tf.train.list_variables(str(version / "variables" / "variables"))]
    assert len([n for n in stored if n.endswith("VARIABLE_VALUE")]) == 3  # each weight once
    words = tf.constant([["red", "blue"], ["green", "mauve"], ["mauve", "mauve"]])
    served = tf.saved_model.load(str(version)).signatures["serving_default"](words=words)
    np.testing.assert_allclose(next(iter(served.values())).numpy(), model(words).numpy(), rtol=1e-6)


@pytest.mark.parametrize("builder", ["extra_layer", "wrong_shape"])
def test_builder_that_does_not_match_the_checkpoint_pauses_the_model(
    tmp_path: Path, builder: str
) -> None:
    train(tmp_path / "ckpts", 1)
    config = write_config(tmp_path, builder=f"models_for_tests:{builder}", python_path=[BUILDERS])
    r = cli("export", "--config", str(config))
    assert r.returncode == 65, r.stdout + r.stderr
    assert "was not published" in r.stdout
    events = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith("{")]
    paused = [e for e in events if e["event"] == "model_paused"]
    # No version was ever published with this builder: the builder is blamed, not ckpt-5.
    assert len(paused) == 1 and paused[0]["reason"] == "builder_mismatch", events
    assert "ckpt-5" in paused[0]["error"]
    assert not [e for e in events if e["event"] == "export_rejected"]
    base = tmp_path / "serving" / "m"
    assert version_dirs(base) == {}
    assert _temp_dirs(base) == []
    assert not (base / ".ckpt-exporter" / "rejected.json").exists()


def test_builder_that_raises_is_rejected_with_its_message(tmp_path: Path) -> None:
    train(tmp_path / "ckpts", 1)
    config = write_config(tmp_path, builder="models_for_tests:raises", python_path=[BUILDERS])
    r = cli("export", "--config", str(config))
    assert r.returncode == 65
    assert "builder failed on purpose" in r.stderr
    assert "builder_error" in r.stderr


def test_second_sigterm_during_export_stops_at_once_leaving_no_temp_dir(
    tmp_path: Path, daemons: Any
) -> None:
    train(tmp_path / "ckpts", 1)
    config = write_config(tmp_path, builder="models_for_tests:slow", python_path=[BUILDERS])
    base = tmp_path / "serving" / "m"
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    d.wait_for(lambda ev: any(e["event"] == "export_started" for e in ev), what="export start")
    assert len(_temp_dirs(base)) == 1
    d.proc.send_signal(signal.SIGTERM)  # grace period: 60 s by default
    d.wait_for(lambda ev: any(e["event"] == "stop_requested" for e in ev), what="stop request")
    assert d.proc.poll() is None  # still waiting for the export
    started = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0  # the second one does not wait
    assert time.monotonic() - started < 30
    assert d.count("stop_forced") == 1
    assert _temp_dirs(base) == []
    assert version_dirs(base) == {}
    assert list((base / ".ckpt-exporter" / "staging").glob("*")) == []
    assert d.count("export_abandoned") == 1


def test_export_validate_and_status_commands(tmp_path: Path) -> None:
    train(tmp_path / "ckpts", 2)
    config = write_config(tmp_path)
    base = tmp_path / "serving" / "m"

    r = cli("export", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ckpt-10 published as version 1"
    r = cli("export", "--config", str(config))
    assert r.returncode == 0
    assert r.stdout.strip() == "ckpt-10 is already published as version 1"

    r = cli("validate", str(base / "1"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True
    assert report["signatures"]["serving_default"]["method"] == "tensorflow/serving/predict"

    # Weight parity: version 1 holds exactly ckpt-10's values, not ckpt-5's.
    ckpts = tmp_path / "ckpts"
    r = cli("validate", str(base / "1"), "--checkpoint", str(ckpts / "ckpt-10"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "weights: all 4 variables hold values from" in r.stdout
    r = cli("validate", str(base / "1"), "--checkpoint", str(ckpts / "ckpt-5"), "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["reason"] == "weight_mismatch" and report["permanent"] is True
    assert "4 of 4 variables" in report["error"] and str(ckpts / "ckpt-5") in report["error"]

    r = cli("status", "--config", str(config), "--json")
    assert r.returncode == 0
    (row,) = json.loads(r.stdout)
    assert row["newest_checkpoint"] == "ckpt-10" and row["newest_version"] == 1
    assert row["pending"] == 0 and row["versions_on_disk"] == 1


def test_validate_catches_what_only_tf_serving_would_reject(tmp_path: Path) -> None:
    """A Keras 3 model written by tf.saved_model.save loads in TF2 but not in TF Serving."""
    script = f"""
import keras, tensorflow as tf
inp = keras.Input(shape=(4,), name="features")
m = keras.Model(inp, keras.layers.Dense(2, name="logits")(inp))
@tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
def serve(x):
    return {{"y": m(x)}}
tf.saved_model.save(m, {str(tmp_path / "sm")!r}, signatures={{"serving_default": serve}})
"""
    run_script(script)
    r = cli("validate", str(tmp_path / "sm"))
    assert r.returncode == 1
    assert "Could not find variable" in r.stdout


def test_a_broken_builder_pauses_the_model_and_a_reload_after_the_fix_exports(
    tmp_path: Path, daemons: Any
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "my_builder.py").write_text(
        "def build():\n    raise RuntimeError('the builder is broken today')\n"
    )
    train(tmp_path / "ckpts", 1)
    config = write_config(tmp_path, builder="my_builder:build", python_path=[str(code)])
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: any(e["event"] == "model_paused" for e in ev), what="the pause")
    paused = next(e for e in ev if e["event"] == "model_paused")
    assert paused["reason"] == "builder_error" and "broken today" in paused["error"]
    assert "reload" in paused["hint"]
    time.sleep(3)  # three rescans: the paused model starts nothing
    assert d.count("export_started") == 1
    base = tmp_path / "serving" / "m"
    # The checkpoint is not blamed for the builder: nothing is recorded as rejected.
    assert not (base / ".ckpt-exporter" / "rejected.json").exists()

    # A reload naming a module that does not exist is refused; the model stays paused.
    broken = config.read_text().replace("my_builder:build", "my_bulider:build")
    good = config.read_text()
    config.write_text(broken)
    d.proc.send_signal(signal.SIGHUP)
    failed = d.wait_for(lambda ev: any(e["event"] == "reload_failed" for e in ev))
    problems = next(e for e in failed if e["event"] == "reload_failed")["problems"]
    assert len(problems) == 1 and "'my_bulider' not found" in problems[0], problems

    # The fix, then a reload: the pending checkpoint is exported after all.
    config.write_text(good)
    (code / "my_builder.py").write_text("from daemon.demo.model import build_model as build\n")
    d.proc.send_signal(signal.SIGHUP)
    ev = d.wait_for(_published(1), what="the export after the fix")
    assert next(e for e in ev if e["event"] == "reloaded")["resumed"] == ["m"]
    assert sorted(version_dirs(base)) == [1]
    assert d.stop() == 0


def test_a_builder_module_that_cannot_be_found_stops_the_start_with_78(tmp_path: Path) -> None:
    config = write_config(tmp_path, builder="no_such_trainer.model:build")
    for command in ("run", "check-config"):
        r = cli(command, "--config", str(config), timeout=60)
        assert r.returncode == 78, r.stdout + r.stderr
        assert "models[0] (m).builder: module 'no_such_trainer.model' not found" in r.stderr
    assert not (tmp_path / "serving").exists()


def test_unsupported_urls_stop_the_start_with_78_and_create_nothing(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, checkpoint_dir="hdfs://namenode/run", base_path="gs://Not_A_Bucket/m"
    )
    for command in ("run", "check-config"):
        r = cli(command, "--config", str(config), timeout=60)
        assert r.returncode == 78, r.stdout + r.stderr
        assert "models[0] (m).checkpoint_dir: unsupported URL scheme hdfs://" in r.stderr
        assert "models[0] (m).base_path: 'Not_A_Bucket'" in r.stderr
        assert "not a valid bucket name" in r.stderr
    # Not a folder named ./hdfs:/namenode/run waited for, nor ./gs:/Not_A_Bucket/m made.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_a_checkpoint_dir_created_after_start_is_noticed_without_a_rescan(
    tmp_path: Path, daemons: Any
) -> None:
    # The daemon starts before training does; the periodic rescan is far away,
    # so only the watch on the missing dir's parent can notice the trainer.
    config = write_config(tmp_path, daemon={"rescan_interval_seconds": 3600})
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    d.wait_for(lambda ev: any(e["event"] == "waiting_for_checkpoint_dir" for e in ev))
    train(tmp_path / "ckpts", 2)
    d.wait_for(_published(2), timeout=120, what="both checkpoints, found through the watches")
    assert d.stop() == 0


@pytest.mark.parametrize(
    ("restore", "change", "expected"),
    [
        # One bias nudged after the restore: caught although everything else matches.
        (True, "model.layers[-1].bias.assign_add(tf.fill([1], 1e-3))", "2 of 8 variables"),
        # No restore at all: every variable still holds its initializer.
        (False, "pass", "8 of 8 variables"),
    ],
    ids=["one_variable_altered", "restore_matched_nothing"],
)
def test_weight_parity_names_what_did_not_come_from_the_checkpoint(
    tmp_path: Path, restore: bool, change: str, expected: str
) -> None:
    train(tmp_path / "ckpts", 1)
    prefix = tmp_path / "ckpts" / "ckpt-5"
    read = f"tf.train.Checkpoint(model=model).read({str(prefix)!r})" if restore else ""
    script = f"""
import tensorflow as tf
from daemon.demo.model import build_model
model = build_model()
{read}
{change}
model.export({str(tmp_path / "sm")!r}, verbose=False)
"""
    run_script(script)
    r = cli("validate", str(tmp_path / "sm"), "--checkpoint", str(prefix), "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["reason"] == "weight_mismatch", report
    # Keras' ExportArchive saves each variable twice (variables/N and _all_variables/N).
    assert expected in report["error"], report["error"]
    assert "/.ATTRIBUTES/VARIABLE_VALUE" in report["error"]  # named by the SavedModel's paths
