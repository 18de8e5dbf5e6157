"""Model Garden, unmodified: a real `official.vision.train` run published three ways.

Runs only in ``make thirdparty``, which creates a separate environment with
``tf-models-official`` (its own TensorFlow; Model Garden pins it) and points
``CKPT_EXPORTER_MODELGARDEN_PYTHON`` at its interpreter. The daemon stays in
its own environment and runs the export worker there (``worker_python``).

One module-scoped training run: ResNet-18 at 32x32, 20 steps of data the test
writes, checkpoints every 10 steps. Model Garden's own exporter
(``official.vision.serving.export_saved_model``) exports the last checkpoint;
every version the daemon publishes of that checkpoint must answer as that
export does, on the same images.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Daemon, cli, version_dirs, write_config

from daemon.basepath.layout import REPORT_RELPATH

pytestmark = pytest.mark.thirdparty

PYTHON_ENV = "CKPT_EXPORTER_MODELGARDEN_PYTHON"
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}

#: The experiment, shrunk: a user's --params_override for a tiny run on CPUs.
OVERRIDES = ",".join(
    [
        "task.model.num_classes=4",
        "task.model.input_size=[32,32,3]",
        "task.model.backbone.resnet.model_id=18",
        "task.train_data.input_path={data}",
        "task.train_data.global_batch_size=4",
        "task.train_data.dtype=float32",
        # Without the training-time centre crop, Model Garden's serving
        # preprocessing of a 32x32 image is only the mean/std normalisation,
        # which [models.image_preprocessing] states for the bare model.
        "task.train_data.aug_crop=false",
        "task.validation_data.input_path={data}",
        "task.validation_data.global_batch_size=4",
        "task.validation_data.dtype=float32",
        "task.validation_data.aug_crop=false",
        "trainer.train_steps=20",
        "trainer.steps_per_loop=10",
        "trainer.checkpoint_interval=10",
        "trainer.summary_interval=10",
        "trainer.validation_interval=1000",
        "runtime.distribution_strategy=one_device",
        "runtime.num_gpus=0",
        "runtime.mixed_precision_dtype=float32",
    ]
)

WRITE_DATA = """
import sys, numpy as np, tensorflow as tf
rng = np.random.default_rng(0)
with tf.io.TFRecordWriter(sys.argv[1]) as w:
    for i in range(16):
        img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        png = tf.io.encode_png(img).numpy()
        w.write(tf.train.Example(features=tf.train.Features(feature={
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
            "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 4])),
        })).SerializeToString())
"""

#: The builders a user writes for the daemon: Model Garden's own serving
#: module, and the bare model. PARAMS is the trainer's params.yaml.
BUILDERS = """
from official.core import exp_factory, task_factory
from official.modeling import hyperparams
from official.vision import registry_imports  # noqa: F401 (registers the experiments)
from official.vision.serving import image_classification

PARAMS = {params!r}


def _params():
    params = exp_factory.get_exp_config("resnet_imagenet")
    return hyperparams.override_params_dict(params, PARAMS, is_strict=True)


def classification_module():
    params = _params()
    model = task_factory.get_task(params.task).build_model()
    module = image_classification.ClassificationModule(
        params=params, model=model, batch_size=None, input_image_size=[32, 32])
    return module, module.model, module.get_inference_signatures(
        {{"image_tensor": "serving_default"}})


def bare_model():
    params = _params()
    return task_factory.get_task(params.task).build_model()
"""


@dataclass(frozen=True)
class Run:
    python: str
    model_dir: Path
    code: Path
    #: uint8 [2, 32, 32, 3] images and Model Garden's own export's answers to them.
    images: Any
    logits: Any


def _mg(python: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run(
        [python, *args],
        env={**os.environ, **QUIET},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


def _mg_export(python: str, model_dir: Path, checkpoint: str, out: Path) -> Path:
    _mg(
        python,
        "-m",
        "official.vision.serving.export_saved_model",
        "--experiment=resnet_imagenet",
        f"--export_dir={out}",
        f"--checkpoint_path={model_dir / checkpoint}",
        "--input_type=image_tensor",
        "--input_image_size=32,32",
        f"--config_file={model_dir / 'params.yaml'}",
    )
    return out / "saved_model"


def _answers(saved_model: Path, images: Any, key: str = "inputs") -> dict[str, Any]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    return {k: v.numpy() for k, v in serve(**{key: tf.constant(images)}).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    python = os.environ.get(PYTHON_ENV)
    if not python:
        pytest.skip(f"{PYTHON_ENV} is not set: `make thirdparty` creates the Model Garden venv")
    root = tmp_path_factory.mktemp("modelgarden")
    data = root / "train.tfrecord"
    _mg(python, "-c", WRITE_DATA, str(data))
    model_dir = root / "model"
    _mg(
        python,
        "-m",
        "official.vision.train",
        "--experiment=resnet_imagenet",
        "--mode=train",
        f"--model_dir={model_dir}",
        f"--params_override={OVERRIDES.format(data=data)}",
    )
    assert {p.name for p in model_dir.glob("ckpt-*.index")} == {"ckpt-10.index", "ckpt-20.index"}
    code = root / "code"
    code.mkdir()
    (code / "mg_builders.py").write_text(BUILDERS.format(params=str(model_dir / "params.yaml")))
    own = _mg_export(python, model_dir, "ckpt-20", root / "mg_export")
    images = np.random.default_rng(7).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    answers = _answers(own, images)
    assert set(answers) == {"logits", "probs"}
    yield Run(python, model_dir, code, images, answers["logits"])


def _config(tmp_path: Path, run: Run, **model: Any) -> Path:
    return write_config(
        tmp_path,
        checkpoint_dir=str(run.model_dir),
        worker_python=run.python,
        python_path=[str(run.code)],
        **model,
    )


def _export(config: Path) -> str:
    done = cli("export", "--config", str(config), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    return done.stdout.strip()


def _report(version: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((version / REPORT_RELPATH).read_text())
    return data


def test_the_serving_module_as_builder_answers_like_model_gardens_export(
    tmp_path: Path, run: Run, daemons: Any
) -> None:
    """Model Garden's ClassificationModule, restored into module.model, exported as it is;
    the second checkpoint is linked from the first's weights map (no TensorFlow)."""
    config = _config(tmp_path, run, builder="mg_builders:classification_module")
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    d.wait_for(
        lambda ev: sum(e["event"] == "published" for e in ev) == 2, timeout=900, what="2 versions"
    )
    assert d.stop() == 0
    versions = version_dirs(tmp_path / "serving" / "m")
    assert sorted(versions) == [1, 2]
    answers = _answers(versions[2], run.images)
    np.testing.assert_allclose(answers["logits"], run.logits, rtol=1e-4, atol=1e-4)
    exported = [e for e in d.events() if e["event"] == "exported"]
    assert exported[0]["incremental_from"] is None
    assert exported[1]["incremental_from"] and exported[1]["weights"] in ("linked", "copied")
    validated = [e for e in d.events() if e["event"] == "validated"]
    assert all(v["weights_matched"] and v["weights_matched"] > 100 for v in validated), validated


def test_the_bare_model_with_stated_preprocessing_answers_like_model_gardens_export(
    tmp_path: Path, run: Run
) -> None:
    config = _config(
        tmp_path,
        run,
        builder="mg_builders:bare_model",
        input_type="image_tensor",
        image_preprocessing={"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
    )
    assert _export(config) == "ckpt-20 published as version 1"
    answers = _answers(version_dirs(tmp_path / "serving" / "m")[1], run.images)
    (logits,) = answers.values()
    np.testing.assert_allclose(logits, run.logits, rtol=1e-4, atol=1e-4)


def test_model_gardens_exporter_as_a_command_is_published_with_weight_parity(
    tmp_path: Path, run: Run
) -> None:
    argv = [
        run.python,
        "-m",
        "official.vision.serving.export_saved_model",
        "--experiment=resnet_imagenet",
        "--export_dir={output_dir}",
        "--checkpoint_path={checkpoint}",
        "--input_type=image_tensor",
        "--input_image_size=32,32",
        f"--config_file={run.model_dir / 'params.yaml'}",
    ]
    config = write_config(
        tmp_path,
        checkpoint_dir=str(run.model_dir),
        builder="",
        source="command",
        command={"argv": argv, "saved_model_subdir": "saved_model"},
    )
    assert _export(config) == "ckpt-20 published as version 1"
    version = version_dirs(tmp_path / "serving" / "m")[1]
    answers = _answers(version, run.images)
    np.testing.assert_allclose(answers["logits"], run.logits, rtol=1e-5, atol=1e-5)
    weights = _report(version)["weights"]
    assert weights["variables"] > 100 and weights["matched"] == weights["variables"], weights
