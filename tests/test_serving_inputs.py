"""input_type: the Model Garden's serving signatures in front of a builder's model."""

from __future__ import annotations

import sys
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


def _model(**keys: Any) -> dict[str, Any]:
    return {"name": "m", "checkpoint_dir": "/t", "base_path": "/s", "builder": "b:f", **keys}


def _problems(**keys: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config({"models": [_model(**keys)]}, "t.toml", Path("/"))
    return e.value.problems


@pytest.mark.parametrize("input_type", ["image_tensor", "encoded_image"])
def test_image_inputs_refuse_to_guess_the_preprocessing(input_type: str) -> None:
    (problem,) = _problems(input_type=input_type)
    assert problem.startswith(
        f"models[0] (m).image_preprocessing: missing with input_type = {input_type!r}: "
        "say what the model takes instead of the uint8 pixels, for example scale = 1.0"
    )
    assert "mean = [123.675, 116.28, 103.53]" in problem


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"function": "m:f", "scale": 2.0}, ".function: give either function or scale/mean/std"),
        ({"std": [1.0, 0.0, 1.0]}, ".std: must not contain 0"),
        ({"mean": []}, ".mean: must be a non-empty list of numbers"),
        ({"mean": ["a"]}, ".mean: must be a non-empty list of numbers"),
        ({"scale": 0}, ".scale: must be a finite number other than 0"),
        ({"function": "nocolon"}, '.function: must be "module:function"'),
        ({"offset": 1.0}, ".offset: unknown key; known keys are function, mean, scale, std"),
    ],
)
def test_bad_preprocessing_is_named(table: dict[str, Any], expected: str) -> None:
    problems = _problems(input_type="image_tensor", image_preprocessing=table)
    assert any(p.startswith(f"models[0] (m).image_preprocessing{expected}") for p in problems), (
        problems
    )


def test_preprocessing_is_refused_for_other_input_types() -> None:
    (problem,) = _problems(image_preprocessing={"scale": 1.0})
    assert problem == (
        "models[0] (m).image_preprocessing: only for input_type = 'image_tensor' or "
        "'encoded_image'; remove it"
    )


def test_preprocessing_is_parsed() -> None:
    table = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    cfg = parse_config(
        {"models": [_model(input_type="encoded_image", image_preprocessing=table)]},
        "t.toml",
        Path("/"),
    )
    pre = cfg.models[0].image_preprocessing
    assert pre is not None
    assert pre.spec() == {
        "scale": 1.0,
        "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375],
        "function": "",
    }


#: Model Garden's normalisation, per channel, on 0..255 pixels.
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


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
    import numpy as np
    import tensorflow as tf

    run_script(_SAVE, str(tmp_path / "ckpts"), BUILDERS)
    images = (
        {} if input_type == "tf_example" else {"image_preprocessing": {"mean": MEAN, "std": STD}}
    )
    config = write_config(
        tmp_path,
        builder="models_for_tests:tiny_cnn",
        python_path=[BUILDERS],
        input_type=input_type,
        **images,
    )
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: any(e["event"] == "published" for e in ev), what="the version")
    validated = next(e for e in ev if e["event"] == "validated")
    assert validated["signatures"]["serving_default"].startswith("ok"), validated
    assert d.stop() == 0
    served = tf.saved_model.load(str(version_dirs(tmp_path / "serving" / "m")[1]))
    serve = served.signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert (spec.name, spec.dtype.name, spec.shape.as_list()) == ("inputs", dtype, shape)
    if input_type == "tf_example":
        return
    # The version answers as the trained model does on the normalised pixels.
    sys.path.insert(0, BUILDERS)
    from models_for_tests import tiny_cnn

    model = tiny_cnn()
    tf.train.Checkpoint(model=model).read(str(tmp_path / "ckpts" / "ckpt-7")).expect_partial()
    pixels = np.random.default_rng(5).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    expected = model((pixels.astype("float32") - np.array(MEAN)) / np.array(STD), training=False)
    if input_type == "image_tensor":
        fed = tf.constant(pixels)
    else:
        fed = tf.constant([tf.io.encode_png(p).numpy() for p in pixels])
    (got,) = serve(inputs=fed).values()
    np.testing.assert_allclose(got.numpy(), np.asarray(expected), rtol=1e-5, atol=1e-5)
