"""Keras 3 on JAX: a trainer's .keras files published, answering as JAX does.

Runs only in ``make thirdparty``, which creates an environment with JAX and
Keras (no TensorFlow) and points ``CKPT_EXPORTER_JAX_PYTHON`` at it. The
trainer runs there with ``KERAS_BACKEND=jax`` and writes ``.keras`` files with
``ModelCheckpoint``; it also writes sample inputs and JAX's outputs for them,
which the daemon (TensorFlow backend, its own environment) uses as
``sample_inputs`` and ``golden_outputs``: a version is published only if it
answers as JAX did.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, version_dirs, write_config

pytestmark = pytest.mark.thirdparty

PYTHON_ENV = "CKPT_EXPORTER_JAX_PYTHON"

TRAINER = """
import sys
from pathlib import Path
import keras, numpy as np
assert keras.backend.backend() == "jax", keras.backend.backend()
out = Path(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 6)).astype("float32")
y = (x @ rng.normal(size=(6, 1))).astype("float32")
inputs = keras.Input(shape=(6,), name="features")
hidden = keras.layers.Dense(16, activation="gelu", name="hidden")(inputs)
hidden = keras.layers.LayerNormalization(name="norm")(hidden)
model = keras.Model(inputs, keras.layers.Dense(1, name="score")(hidden))
model.compile(optimizer="adam", loss="mse")
save = keras.callbacks.ModelCheckpoint(str(out / "ckpts" / "model-{epoch:02d}.keras"))
model.fit(x, y, epochs=3, batch_size=16, callbacks=[save], verbose=0)
sample = rng.normal(size=(5, 6)).astype("float32")
np.savez(out / "sample.npz", features=sample)
np.savez(out / "golden.npz", output_0=np.asarray(model.predict(sample, verbose=0)))
"""


def test_keras_files_written_under_jax_are_published_with_jax_golden_outputs(
    tmp_path: Path,
) -> None:
    python = os.environ.get(PYTHON_ENV)
    if not python:
        pytest.skip(f"{PYTHON_ENV} is not set: `make thirdparty` creates the JAX venv")
    (tmp_path / "ckpts").mkdir()
    done = subprocess.run(
        [python, "-c", TRAINER, str(tmp_path)],
        env={**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    files = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert files == ["model-01.keras", "model-02.keras", "model-03.keras"]

    config = write_config(
        tmp_path,
        builder="",
        source="keras",
        sample_inputs=str(tmp_path / "sample.npz"),
        golden_outputs=str(tmp_path / "golden.npz"),
        keras={"settle_seconds": 0},
    )
    r = cli("export", "--config", str(config), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-6000:]
    assert r.stdout.strip() == "model-03.keras published as version 1"

    import tensorflow as tf

    version = version_dirs(tmp_path / "serving" / "m")[1]
    serve = tf.saved_model.load(str(version)).signatures["serving_default"]
    sample = np.load(tmp_path / "sample.npz")["features"]
    (got,) = serve(features=tf.constant(sample)).values()
    golden = np.load(tmp_path / "golden.npz")["output_0"]
    np.testing.assert_allclose(got.numpy(), golden, rtol=1e-5, atol=1e-5)
