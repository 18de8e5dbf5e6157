"""input_type: the Model Garden's serving signatures in front of a builder's model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, run_script, version_dirs, write_config

from daemon.config.loading import ConfigError, parse_config

BUILDERS = str(Path(__file__).parent / "builders")

_SAVE = """
import sys, tensorflow as tf
sys.path.insert(0, sys.argv[2])
from models_for_tests import tiny_cnn
model = tiny_cnn()
tf.train.CheckpointManager(tf.train.Checkpoint(model=model), sys.argv[1], 3).save(7)
"""


def test_input_type_is_refused_where_nothing_is_traced() -> None:
    model = {
        "name": "m",
        "checkpoint_dir": "/t",
        "base_path": "/s",
        "source": "saved_model",
        "input_type": "encoded_image",
    }
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [model]}, "t.toml", Path("/"))
    assert "models[0] (m).input_type: only for sources that export a Keras model" in str(e.value)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("input_type", "dtype", "shape"),
    [
        ("image_tensor", "uint8", [None, 8, 8, 3]),
        ("encoded_image", "string", [None]),
        ("tf_example", "string", [None]),
    ],
)
def test_each_input_type_serves_and_validates(
    tmp_path: Path, daemons: Any, input_type: str, dtype: str, shape: list[int | None]
) -> None:
    import tensorflow as tf

    run_script(_SAVE, str(tmp_path / "ckpts"), BUILDERS)
    config = write_config(
        tmp_path, builder="models_for_tests:tiny_cnn", python_path=[BUILDERS], input_type=input_type
    )
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: any(e["event"] == "published" for e in ev), what="the version")
    validated = next(e for e in ev if e["event"] == "validated")
    assert validated["signatures"]["serving_default"].startswith("ok"), validated
    assert d.stop() == 0
    served = tf.saved_model.load(str(version_dirs(tmp_path / "serving" / "m")[1]))
    (spec,) = served.signatures["serving_default"].structured_input_signature[1].values()
    assert (spec.name, spec.dtype.name, spec.shape.as_list()) == ("input_tensor", dtype, shape)
