"""Unit tests for the validation keys of a [[models]] table: sample_inputs, golden_outputs and
warmup_records, checked by daemon.config.parse_config.

Pure and fast: dicts for parse_config, small files in tmp_path; nothing imports TensorFlow.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from test_config import model

from daemon.basepath.layout import MAX_WARMUP_RECORDS as MAX_RECORDS
from daemon.config.loading import Config, ConfigError, ModelConfig, parse_config

WHERE = "models[0] (m)"


def parse(root: Path, **overrides: Any) -> ModelConfig:
    cfg: Config = parse_config({"models": [model(**overrides)]}, "t.toml", root)
    assert len(cfg.models) == 1
    return cfg.models[0]


def problems_of(root: Path, **overrides: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [model(**overrides)]}, "t.toml", root)
    assert info.value.source == "t.toml"
    return info.value.problems


def npz(path: Path) -> Path:
    """A file where an .npz is expected (its content is read by the children, not here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip, as numpy.savez() writes
    return path


# --- defaults -----------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    m = parse(tmp_path)
    assert m.sample_inputs is None
    assert m.golden_outputs is None
    assert m.warmup_records == 0


# --- sample_inputs and golden_outputs -----------------------------------------------------


def test_absolute_files(tmp_path: Path) -> None:
    inputs, golden = npz(tmp_path / "in.npz"), npz(tmp_path / "out.npz")
    m = parse(Path("/elsewhere"), sample_inputs=str(inputs), golden_outputs=str(golden))
    assert m.sample_inputs == inputs
    assert m.golden_outputs == golden
    assert isinstance(m.sample_inputs, Path) and isinstance(m.golden_outputs, Path)


@pytest.mark.parametrize(
    ("inputs", "golden"),
    [
        ("in.npz", "out.npz"),
        ("data/in.npz", "./data/../data/out.npz"),
        ("../shared/in.npz", "../shared/out.npz"),
    ],
)
def test_relative_files_resolve_against_the_config_root(
    tmp_path: Path, inputs: str, golden: str
) -> None:
    root = tmp_path / "etc"
    root.mkdir()
    npz((root / inputs).resolve())
    npz((root / golden).resolve())
    m = parse(root, sample_inputs=inputs, golden_outputs=golden)
    assert m.sample_inputs == (root / inputs).resolve()
    assert m.golden_outputs == (root / golden).resolve()
    assert m.sample_inputs.is_absolute() and ".." not in m.sample_inputs.parts


def test_relative_files_do_not_resolve_against_the_checkpoint_dir(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    npz(ckpts / "in.npz")
    problems = problems_of(tmp_path / "etc", checkpoint_dir=str(ckpts), sample_inputs="in.npz")
    assert problems == [
        f"{WHERE}.sample_inputs: {tmp_path / 'etc' / 'in.npz'} is not a file; give an .npz "
        "written by numpy.savez (one array per signature input or output)"
    ]


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    npz(tmp_path / "in.npz")
    assert parse(Path("/etc"), sample_inputs="~/in.npz").sample_inputs == tmp_path / "in.npz"


def test_sample_inputs_alone(tmp_path: Path) -> None:
    inputs = npz(tmp_path / "in.npz")
    m = parse(tmp_path, sample_inputs="in.npz")
    assert (m.sample_inputs, m.golden_outputs) == (inputs, None)


@pytest.mark.parametrize("kind", ["missing", "folder", "missing folder"])
@pytest.mark.parametrize("key", ["sample_inputs", "golden_outputs"])
def test_a_path_that_is_not_a_file(tmp_path: Path, key: str, kind: str) -> None:
    npz(tmp_path / "good.npz")
    bad = {"missing": "nope.npz", "folder": "dir", "missing folder": "no/such/dir/x.npz"}[kind]
    (tmp_path / "dir").mkdir()
    other = "golden_outputs" if key == "sample_inputs" else "sample_inputs"
    problems = problems_of(tmp_path, **{key: bad, other: "good.npz"})
    assert problems == [
        f"{WHERE}.{key}: {tmp_path / bad} is not a file; give an .npz written by numpy.savez "
        "(one array per signature input or output)"
    ]


def test_golden_outputs_need_sample_inputs(tmp_path: Path) -> None:
    npz(tmp_path / "out.npz")
    problems = problems_of(tmp_path, golden_outputs="out.npz")
    assert problems == [
        f"{WHERE}.golden_outputs: needs sample_inputs, the inputs these outputs answer"
    ]


def test_golden_outputs_missing_and_without_sample_inputs(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, golden_outputs="out.npz")
    assert [p.split(":")[0] for p in problems] == [f"{WHERE}.golden_outputs"] * 2
    assert "is not a file" in problems[0]
    assert "needs sample_inputs" in problems[1]


def test_both_missing_are_both_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, sample_inputs="a.npz", golden_outputs="b.npz")
    assert problems == [
        f"{WHERE}.sample_inputs: {tmp_path / 'a.npz'} is not a file; give an .npz written by "
        "numpy.savez (one array per signature input or output)",
        f"{WHERE}.golden_outputs: {tmp_path / 'b.npz'} is not a file; give an .npz written by "
        "numpy.savez (one array per signature input or output)",
    ]


@pytest.mark.parametrize("key", ["sample_inputs", "golden_outputs"])
@pytest.mark.parametrize(("value", "got"), [(1, "int 1"), (["a.npz"], "list ['a.npz']")])
def test_a_path_must_be_a_string(tmp_path: Path, key: str, value: Any, got: str) -> None:
    problems = problems_of(tmp_path, **{key: value})
    assert problems == [f"{WHERE}.{key}: must be a string, got {got}"]


def test_an_empty_string_is_no_file(tmp_path: Path) -> None:
    m = parse(tmp_path, sample_inputs="", golden_outputs="")
    assert (m.sample_inputs, m.golden_outputs) == (None, None)


def test_problems_name_the_model(tmp_path: Path) -> None:
    data = {
        "models": [
            model(name="a", checkpoint_dir="/t/a", base_path="/s/a"),
            model(name="b", checkpoint_dir="/t/b", base_path="/s/b", sample_inputs="x.npz"),
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, "t.toml", tmp_path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("models[1] (b).sample_inputs: ")


# --- warmup_records -----------------------------------------------------------------------


def test_the_limit_is_tf_servings() -> None:
    assert MAX_RECORDS == 1000


@pytest.mark.parametrize("n", [0, 1, 10, 999, 1000])
def test_warmup_records_in_range(tmp_path: Path, n: int) -> None:
    # tensorflow-serving-api is installed in the development environment.
    assert importlib.util.find_spec("tensorflow_serving") is not None
    had_tf = "tensorflow" in sys.modules
    assert parse(tmp_path, warmup_records=n).warmup_records == n
    # find_spec looks for the package without importing it (or TensorFlow).
    assert had_tf or "tensorflow" not in sys.modules


@pytest.mark.parametrize("n", [1001, 1002, 10**6, -1, -1000])
def test_warmup_records_out_of_range(tmp_path: Path, n: int) -> None:
    assert problems_of(tmp_path, warmup_records=n) == [
        f"{WHERE}.warmup_records: must be from 0 (none) to 1000 "
        f"(TF Serving reads at most 1000) (got {n})"
    ]


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (True, "bool True"),
        (False, "bool False"),
        (1.0, "float 1.0"),
        (2.5, "float 2.5"),
        (math.inf, "float inf"),
        ("10", "str '10'"),
    ],
)
def test_warmup_records_must_be_an_integer(tmp_path: Path, value: Any, got: str) -> None:
    assert problems_of(tmp_path, warmup_records=value) == [
        f"{WHERE}.warmup_records: must be an integer, got {got}"
    ]


def test_warmup_records_with_sample_inputs(tmp_path: Path) -> None:
    inputs = npz(tmp_path / "in.npz")
    m = parse(tmp_path, sample_inputs="in.npz", warmup_records=5)
    assert (m.sample_inputs, m.warmup_records) == (inputs, 5)


def test_validation_key_problems_come_with_other_problems(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        sample_inputs="a.npz",
        signature={"inputs": {"x": {"dtype": "float99", "shape": [1]}}},
    )
    assert [p.split(":")[0] for p in problems] == [
        f"{WHERE}.signature.inputs.x.dtype",
        f"{WHERE}.sample_inputs",
    ]


def test_warmup_records_need_the_serving_protos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "tensorflow_serving" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert parse(tmp_path, warmup_records=0).warmup_records == 0  # not needed without records
    assert problems_of(tmp_path, warmup_records=3) == [
        f"{WHERE}.warmup_records: needs the tensorflow-serving-api protos, which are not "
        "installed: pip install tensorflow-serving-api (or set it to 0)"
    ]
