"""Synthesised image inputs of unknown size: the rule, the reference inputs, the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.children import runtime, samples
from daemon.config.loading import ConfigError, parse_config
from daemon.protocol import ExportRequest


@pytest.mark.parametrize(
    ("dtype", "shape", "expected"),
    [
        ("uint8", [1, None, None, 3], [1, 224, 224, 3]),
        ("float32", [None, None, None, 3], [1, 224, 224, 3]),
        ("float16", [-1, -1, -1, 1], [1, 224, 224, 1]),
        ("bfloat16", [2, None, None, 3], [2, 224, 224, 3]),
        # One side known: only the other is synthesised at the size.
        ("float32", [None, 32, None, 3], [1, 32, 224, 3]),
        # Not an image of unknown size: the 1-per-unknown rule stays.
        ("float32", [None, 32, 32, 3], None),
        ("float32", [None, None, None, 4], None),
        ("float32", [None, None, None, None], None),
        ("int32", [None, None, None, 3], None),
        ("string", [None, None, None, 3], None),
        ("float32", [None, None, 3], None),
        ("float32", [None, None, None, None, 3], None),
    ],
)
def test_image_inputs_of_unknown_size_get_the_size(
    dtype: str, shape: list[int | None], expected: list[int] | None
) -> None:
    assert samples.image_shape(dtype, shape, 224) == expected


def test_synthesised_images_are_deterministic_and_of_the_size() -> None:
    a = samples.synthesise("images", "uint8", [1, None, None, 3], 64)
    b = samples.synthesise("images", "uint8", [1, None, None, 3], 64)
    assert a.shape == (1, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    # Anything else is what synth_input makes.
    np.testing.assert_array_equal(
        samples.synthesise("x", "float32", [None, 4], 64),
        runtime.synth_input("x", "float32", [None, 4]),
    )


def _request(**fields: Any) -> ExportRequest:
    req: dict[str, Any] = {"sample_inputs": None, **fields}
    return req  # type: ignore[return-value]


def test_reference_inputs_synthesise_images_at_the_configured_size() -> None:
    specs: dict[str, tuple[str, list[int | None]]] = {
        "images": ("uint8", [1, None, None, 3]),
        "scale": ("float32", [None, 1]),
    }
    synthesised = {k: runtime.synth_input(k, *s) for k, s in specs.items()}
    assert synthesised["images"].shape == (1, 1, 1, 3)  # what a 1x1 image would have been

    default = samples.reference_inputs(_request(), specs, synthesised)
    assert default["images"].shape == (1, 224, 224, 3)
    assert default["scale"] is synthesised["scale"]
    sized = samples.reference_inputs(_request(synthetic_image_size=96), specs, synthesised)
    assert sized["images"].shape == (1, 96, 96, 3) and sized["images"].dtype == np.uint8


def test_sample_inputs_are_used_as_given(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((1, 5, 7, 3), np.uint8))
    specs: dict[str, tuple[str, list[int | None]]] = {"images": ("uint8", [1, None, None, 3])}
    synthesised = {"images": runtime.synth_input("images", "uint8", [1, None, None, 3])}
    given = samples.reference_inputs(_request(sample_inputs=str(path)), specs, synthesised)
    assert given["images"].shape == (1, 5, 7, 3)


def _model(**keys: Any) -> dict[str, Any]:
    return {"name": "m", "checkpoint_dir": "/t", "base_path": "/s", "builder": "a:b", **keys}


def test_synthetic_image_size_is_a_model_key() -> None:
    cfg = parse_config({"models": [_model()]}, "t.toml", Path("/"))
    assert cfg.models[0].synthetic_image_size == 224
    cfg = parse_config({"models": [_model(synthetic_image_size=64)]}, "t.toml", Path("/"))
    assert cfg.models[0].synthetic_image_size == 64
    for bad in (0, 5000, 1.5, True):
        with pytest.raises(ConfigError) as e:
            parse_config({"models": [_model(synthetic_image_size=bad)]}, "t.toml", Path("/"))
        assert "synthetic_image_size" in str(e.value)
