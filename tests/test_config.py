"""Unit tests for daemon.config: every problem is reported, each naming its key.

Pure and fast: dicts for parse_config, small files in tmp_path for load_config.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.config.loading import (
    Config,
    ConfigError,
    DaemonConfig,
    InputSpec,
    ModelConfig,
    load_config,
    parse_config,
)
from daemon.objectstore.url import ObjectURL

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def model(**overrides: Any) -> dict[str, Any]:
    """A valid [[models]] table; ``overrides`` with a value of None remove a key."""
    table: dict[str, Any] = {
        "name": "m",
        "checkpoint_dir": "/train/m/ckpts",
        "base_path": "/serve/m",
        "builder": "trainer.model:build",
    }
    table.update(overrides)
    return {k: v for k, v in table.items() if v is not None}


def parse(data: dict[str, Any], root: Path = Path("/etc/ckpt-exporter")) -> Config:
    return parse_config(data, "test.toml", root)


def problems_of(data: dict[str, Any], root: Path = Path("/etc/ckpt-exporter")) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, root)
    assert info.value.source == "test.toml"
    return info.value.problems


def assert_one_problem(data: dict[str, Any], *fragments: str) -> str:
    """Exactly one problem is reported, and it contains every fragment."""
    problems = problems_of(data)
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0], (fragment, problems[0])
    return problems[0]


# --- a valid config ---------------------------------------------------------------


def test_minimal_config_gets_the_documented_defaults() -> None:
    cfg = parse({"models": [model()]})

    assert cfg.path is None
    assert cfg.daemon == DaemonConfig(
        metrics_address="127.0.0.1:9725",
        log_format="auto",
        log_level="info",
        rescan_interval_seconds=30.0,
        export_timeout_seconds=1800.0,
        concurrency=1,
        allow_gpu=False,
        worker_nice=19,
        worker_io_class="idle",
        worker_threads=0,
        warm_workers=True,
        keep_failed=3,
        retry_backoff_seconds=30.0,
        shutdown_grace_seconds=60.0,
        health_stall_seconds=120.0,
        health_failing_seconds=21600.0,
    )
    assert cfg.models == (
        ModelConfig(
            name="m",
            checkpoint_dir=Path("/train/m/ckpts"),
            base_path=Path("/serve/m"),
            builder="trainer.model:build",
            source="tf_checkpoint",
            python_path=(),
            checkpoint_key="model",
            export_policy="latest",
            version_policy="increment",
            keep_versions=5,
            min_interval_seconds=0.0,
            rtol=1e-4,
            atol=1e-5,
            signature=(),
        ),
    )


def test_every_key_set_is_kept() -> None:
    daemon = {
        "metrics_address": "",
        "log_format": "json",
        "log_level": "debug",
        "rescan_interval_seconds": 2.5,
        "export_timeout_seconds": 60,
        "concurrency": 4,
        "allow_gpu": True,
        "worker_nice": 0,
        "worker_io_class": "default",
        "worker_threads": 16,
        "warm_workers": False,
        "exporter_max_exports": 1,
        "exporter_idle_seconds": 30,
        "keep_failed": 0,
        "retry_backoff_seconds": 1,
        "shutdown_grace_seconds": 0,
        "health_stall_seconds": 5,
        "health_failing_seconds": 0.5,
        "object_store_poll_seconds": 3,
        "s3_endpoint_url": "https://minio.internal:9000",
    }
    m = model(
        source="tf_checkpoint",
        python_path=["/src/a", "/src/b"],
        checkpoint_key="net",
        export_policy="all",
        version_policy="step",
        keep_versions=0,
        allow_signature_change=True,
        min_interval_seconds=10,
        rtol=0,
        atol=1,
        signature={},
    )
    cfg = parse({"daemon": daemon, "models": [m]})

    assert dataclasses.asdict(cfg.daemon) == daemon
    got = cfg.models[0]
    assert got.python_path == (Path("/src/a"), Path("/src/b"))
    assert (got.checkpoint_key, got.export_policy, got.version_policy) == ("net", "all", "step")
    assert got.keep_versions == 0
    assert got.allow_signature_change is True
    # Integers given for float settings come back as floats.
    assert (got.min_interval_seconds, got.rtol, got.atol) == (10.0, 0.0, 1.0)
    assert all(type(v) is float for v in (got.min_interval_seconds, got.rtol, got.atol))


def test_several_models() -> None:
    cfg = parse(
        {
            "models": [
                model(name="a", checkpoint_dir="/t/a", base_path="/s/a"),
                model(name="b", checkpoint_dir="/t/b", base_path="/s/b"),
            ]
        }
    )
    assert [(m.name, m.base_path) for m in cfg.models] == [("a", Path("/s/a")), ("b", Path("/s/b"))]


def test_config_is_immutable() -> None:
    cfg = parse({"models": [model()]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.models[0].name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.daemon.concurrency = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("address", "host_port"),
    [
        ("127.0.0.1:9725", ("127.0.0.1", 9725)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:9000", ("::1", 9000)),
        ("", None),
    ],
)
def test_metrics_address(address: str, host_port: tuple[str, int] | None) -> None:
    cfg = parse({"daemon": {"metrics_address": address}, "models": [model()]})
    assert cfg.daemon.metrics_host_port == host_port


@pytest.mark.parametrize("name", ["m", "My_Model-2.v1", "0"])
def test_good_model_names(name: str) -> None:
    assert parse({"models": [model(name=name)]}).models[0].name == name


@pytest.mark.parametrize("builder", ["pkg:f", "a.b.c:build_model", "_m:_f", "m1.x2:f3"])
def test_good_builders(builder: str) -> None:
    assert parse({"models": [model(builder=builder)]}).models[0].builder == builder


# --- paths ------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    root = tmp_path / "etc"
    m = model(checkpoint_dir="ckpts", base_path="../serving/./m", python_path=["src", "/abs"])
    got = parse({"models": [m]}, root).models[0]
    assert got.checkpoint_dir == root / "ckpts"
    assert got.base_path == tmp_path / "serving" / "m"
    assert got.python_path == (root / "src", Path("/abs"))


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    got = parse({"models": [model(checkpoint_dir="~/ckpts")]}, Path("/elsewhere")).models[0]
    assert got.checkpoint_dir == tmp_path / "ckpts"


# --- one problem, naming its key ------------------------------------------------------

ERROR_CASES = [
    # unknown keys, at every level
    pytest.param(
        {"daemon": {"colour": "blue"}, "models": [model()]},
        ["daemon.colour: unknown key", "known keys are", "log_format"],
        id="unknown key in [daemon]",
    ),
    pytest.param(
        {"models": [model(colour="blue")]},
        ["models[0] (m).colour: unknown key", "keep_versions"],
        id="unknown key in [[models]]",
    ),
    pytest.param(
        {"model": [model()], "models": [model()]},
        ["model: unknown top-level key", "[daemon], [[models]] and [serving_config]"],
        id="unknown top-level key",
    ),
    # wrong types
    pytest.param(
        {"daemon": {"concurrency": "2"}, "models": [model()]},
        ["daemon.concurrency: must be an integer, got str '2'"],
        id="string for int",
    ),
    pytest.param(
        {"models": [model(keep_versions=True)]},
        ["models[0] (m).keep_versions: must be an integer, got bool True"],
        id="bool for int",
    ),
    pytest.param(
        {"daemon": {"concurrency": 1.5}, "models": [model()]},
        ["daemon.concurrency: must be an integer, got float 1.5"],
        id="float for int",
    ),
    pytest.param(
        {"models": [model(keep_versions=2.0)]},
        ["models[0] (m).keep_versions: must be an integer, got float 2.0"],
        id="integral float for int",
    ),
    pytest.param(
        {"daemon": {"rescan_interval_seconds": True}, "models": [model()]},
        ["daemon.rescan_interval_seconds: must be a number, got bool"],
        id="bool for number",
    ),
    pytest.param(
        {"models": [model(rtol="0.1")]},
        ["models[0] (m).rtol: must be a number, got str"],
        id="string for number",
    ),
    pytest.param(
        {"daemon": {"allow_gpu": "yes"}, "models": [model()]},
        ["daemon.allow_gpu: must be true or false, got str 'yes'"],
        id="string for bool",
    ),
    pytest.param(
        {"daemon": {"worker_nice": 20}, "models": [model()]},
        ["daemon.worker_nice: must be a niceness from 0 (unchanged) to 19 (lowest) (got 20)"],
        id="nice out of range",
    ),
    pytest.param(
        {"daemon": {"worker_io_class": "realtime"}, "models": [model()]},
        ["daemon.worker_io_class: must be one of 'idle', 'best-effort', 'default'"],
        id="io class",
    ),
    pytest.param(
        {"daemon": {"worker_threads": -2}, "models": [model()]},
        ["daemon.worker_threads: must be a finite number, 0 or more (got -2)"],
        id="negative threads",
    ),
    pytest.param(
        {"daemon": {"allow_gpu": 1}, "models": [model()]},
        ["daemon.allow_gpu: must be true or false, got int 1"],
        id="int for bool",
    ),
    pytest.param(
        {"models": [model(name=7)]},
        ["models[0].name: must be a string, got int 7"],
        id="int for string",
    ),
    pytest.param(
        {"models": [model(python_path="src")]},
        ["models[0] (m).python_path: must be a list"],
        id="string for list",
    ),
    pytest.param(
        {"models": [model(python_path=["src", 3])]},
        ["models[0] (m).python_path: must be a list of folder paths (strings)"],
        id="list of non-strings",
    ),
    pytest.param(
        {"models": [model(signature="features")]},
        ["models[0] (m).signature: must be a table"],
        id="string for table",
    ),
    pytest.param(
        {"daemon": 3, "models": [model()]},
        ["daemon: must be a table"],
        id="[daemon] not a table",
    ),
    # missing required keys
    pytest.param({"models": [model(name=None)]}, ["models[0].name: missing (required)"], id="name"),
    *(
        pytest.param(
            {"models": [model(**{key: None})]},
            [f"models[0] (m).{key}: missing (required)"],
            id=key,
        )
        for key in ("checkpoint_dir", "base_path", "builder")
    ),
    # bad values
    *(
        pytest.param(
            {"models": [model(name=name)]},
            [".name: must match [A-Za-z0-9._-]+", repr(name)],
            id=f"name {name!r}",
        )
        for name in ("a/b", "", "a b", "módel", "m\n")
    ),
    *(
        pytest.param(
            {"models": [model(builder=builder)]},
            ['models[0] (m).builder: must be "module:function"', repr(builder)],
            id=f"builder {builder!r}",
        )
        for builder in ("trainer.build", "a:b:c", "1mod:f", "mod:", ":f", "mod:f()", "mod:f\n")
    ),
    pytest.param(
        {"daemon": {"log_format": "xml"}, "models": [model()]},
        ["daemon.log_format: must be one of 'auto', 'json', 'console' (got 'xml')"],
        id="log_format xml",
    ),
    pytest.param(
        {"daemon": {"log_level": "verbose"}, "models": [model()]},
        ["daemon.log_level: must be one of", "'verbose'"],
        id="log_level verbose",
    ),
    *(
        pytest.param(
            {"daemon": {"metrics_address": address}, "models": [model()]},
            ['daemon.metrics_address: must be "host:port"', repr(address)],
            id=f"metrics_address {address!r}",
        )
        for address in (
            "nohost",
            "9725",
            "host:",
            ":9725",
            "host:70000",
            "host:-1",
            "host:²",
            "h:٣",
        )
    ),
    pytest.param(
        {"models": [model(source="onnx")]},
        [
            "models[0] (m).source: must be one of 'tf_checkpoint', 'tf1_checkpoint', "
            "'saved_model', 'keras', 'command' (got 'onnx')"
        ],
        id="unknown source",
    ),
    pytest.param(
        {"models": [model(export_policy="every")]},
        ["models[0] (m).export_policy: must be one of 'latest', 'all'"],
        id="unknown export_policy",
    ),
    pytest.param(
        {"models": [model(version_policy="date")]},
        ["models[0] (m).version_policy: must be one of 'increment', 'step'"],
        id="unknown version_policy",
    ),
    pytest.param(
        {"models": [model(checkpoint_dir="")]},
        ["models[0] (m).checkpoint_dir: must not be empty"],
        id="empty checkpoint_dir",
    ),
    pytest.param(
        {"models": [model(checkpoint_key="")]},
        ["models[0] (m).checkpoint_key: must not be empty"],
        id="empty checkpoint_key",
    ),
    *(
        pytest.param(
            {"models": [model(**{key: -1})]},
            [f"models[0] (m).{key}: must be a finite number, 0 or more (got -1)"],
            id=f"negative {key}",
        )
        for key in ("keep_versions", "min_interval_seconds", "rtol", "atol")
    ),
    pytest.param(
        {"daemon": {"keep_failed": -1}, "models": [model()]},
        ["daemon.keep_failed: must be a finite number, 0 or more (got -1)"],
        id="negative keep_failed",
    ),
    *(
        pytest.param(
            {"daemon": {key: value}, "models": [model()]},
            [f"daemon.{key}: must be a finite number greater than 0 (got {value!r})"],
            id=f"{key} = {value!r}",
        )
        for key, value in [
            ("rescan_interval_seconds", 0),
            ("rescan_interval_seconds", -1.5),
            ("export_timeout_seconds", 0.0),
            ("concurrency", 0),
            ("retry_backoff_seconds", -30),
        ]
    ),
    pytest.param(
        {"daemon": {"rescan_interval_seconds": math.nan}, "models": [model()]},
        ["daemon.rescan_interval_seconds: must be a finite number greater than 0 (got nan)"],
        id="nan interval",
    ),
    pytest.param(
        {"daemon": {"export_timeout_seconds": math.inf}, "models": [model()]},
        ["daemon.export_timeout_seconds: must be a finite number greater than 0 (got inf)"],
        id="inf timeout",
    ),
    pytest.param(
        {"models": [model(min_interval_seconds=math.nan)]},
        ["models[0] (m).min_interval_seconds: must be a finite number, 0 or more (got nan)"],
        id="nan min_interval_seconds",
    ),
    # relations between keys and between models
    pytest.param(
        {"models": [model(checkpoint_dir="/x", base_path="/x")]},
        ["models[0] (m).base_path: must differ from checkpoint_dir"],
        id="base_path == checkpoint_dir",
    ),
    pytest.param(
        {"models": [model(checkpoint_dir="/x/ckpts", base_path="/x/serve/../ckpts/")]},
        ["models[0] (m).base_path: must differ from checkpoint_dir"],
        id="base_path == checkpoint_dir, spelled differently",
    ),
    pytest.param(
        {
            "models": [
                model(name="a", checkpoint_dir="/t/a", base_path="/s/a"),
                model(name="a", checkpoint_dir="/t/b", base_path="/s/b"),
            ]
        },
        ["models: name 'a' is used twice"],
        id="duplicate names",
    ),
    pytest.param(
        {
            "models": [
                model(name="a", checkpoint_dir="/t/a", base_path="/s/shared"),
                model(name="b", checkpoint_dir="/t/b", base_path="/s/./shared/"),
            ]
        },
        ["models (b).base_path: /s/shared is also the base path of 'a'"],
        id="two models share a base_path",
    ),
    # no models
    pytest.param({}, ["models: no [[models]] table"], id="empty file"),
    pytest.param({"daemon": {}}, ["models: no [[models]] table"], id="only [daemon]"),
    pytest.param({"models": []}, ["models: no [[models]] table"], id="empty models array"),
]


@pytest.mark.parametrize(("data", "fragments"), ERROR_CASES)
def test_each_problem_names_its_key(data: dict[str, Any], fragments: list[str]) -> None:
    assert_one_problem(data, *fragments)


def test_models_not_an_array_of_tables() -> None:
    problems = problems_of({"models": model()})  # [models] instead of [[models]]
    assert problems == [
        "models: must be an array of tables ([[models]])",
        "models: no [[models]] table; add one per watched model",
    ]


def test_models_array_of_non_tables() -> None:
    problems = problems_of({"models": ["m"]})
    assert problems[0] == "models: must be an array of tables ([[models]])"


def test_missing_keys_are_all_reported() -> None:
    problems = problems_of({"models": [{"name": "m"}]})
    assert problems == [
        "models[0] (m).checkpoint_dir: missing (required)",
        "models[0] (m).base_path: missing (required)",
        "models[0] (m).builder: missing (required) with source = 'tf_checkpoint': "
        'give "module:function" returning the model to restore',
    ]


def test_problems_in_the_second_model_name_it() -> None:
    second = model(name="b", checkpoint_dir="/t/b", base_path="/s/b", keep_versions=-2)
    assert_one_problem({"models": [model(), second]}, "models[1] (b).keep_versions")


# --- signature inputs ---------------------------------------------------------------


def with_inputs(inputs: Any) -> dict[str, Any]:
    return {"models": [model(signature={"inputs": inputs})]}


def test_signature_inputs_become_input_specs() -> None:
    cfg = parse(
        with_inputs(
            {
                "features": {"dtype": "float32", "shape": [-1, 4]},
                "ids": {"dtype": "int64", "shape": [-1, -1]},
                "scale": {"dtype": "float64", "shape": []},
                "text": {"dtype": "string", "shape": [2, 0]},
            }
        )
    )
    assert cfg.models[0].signature == (
        InputSpec("features", "float32", (None, 4)),
        InputSpec("ids", "int64", (None, None)),
        InputSpec("scale", "float64", ()),
        InputSpec("text", "string", (2, 0)),
    )


@pytest.mark.parametrize("signature", [{}, {"inputs": {}}])
def test_empty_signature_is_no_inputs(signature: dict[str, Any]) -> None:
    assert parse({"models": [model(signature=signature)]}).models[0].signature == ()


SIG = "models[0] (m).signature"

SIGNATURE_ERRORS = [
    pytest.param(
        {"x": {"dtype": "float", "shape": [1]}},
        [f"{SIG}.inputs.x.dtype: must be one of", "float32", "(got 'float')"],
        id="bad dtype",
    ),
    pytest.param(
        {"x": {"shape": [1]}},
        [f"{SIG}.inputs.x.dtype: must be one of", "(got None)"],
        id="missing dtype",
    ),
    *(
        pytest.param(
            {"x": {"dtype": "float32", "shape": shape}},
            [f"{SIG}.inputs.x.shape: must be a list of integers, -1 for an unknown size"],
            id=f"bad shape {shape!r}",
        )
        for shape in ([-2], [1.5], [True], ["4"], [[1]], 4, "4", None)
    ),
    pytest.param(
        {"x": {"dtype": "float32", "shape": [1], "name": "y"}},
        [f"{SIG}.inputs.x.name: unknown key; known keys are dtype, shape"],
        id="unknown key in an input",
    ),
    pytest.param(
        {"x": "float32"},
        [f"{SIG}.inputs.x: must be a table like"],
        id="input not a table",
    ),
    pytest.param(
        ["x"],
        [f"{SIG}.inputs: must be a table of name = {{ dtype, shape }}"],
        id="inputs not a table",
    ),
]


@pytest.mark.parametrize(("inputs", "fragments"), SIGNATURE_ERRORS)
def test_signature_problems_name_the_input(inputs: Any, fragments: list[str]) -> None:
    assert_one_problem(with_inputs(inputs), *fragments)


def test_unknown_key_in_signature() -> None:
    data = {"models": [model(signature={"outputs": {}})]}
    assert_one_problem(data, f"{SIG}.outputs: unknown key; known keys are inputs")


# --- several problems at once ---------------------------------------------------------


def test_several_problems_are_reported_together() -> None:
    data = {
        "daemon": {"log_format": "xml", "verbose": True},
        "models": [
            model(name="a", checkpoint_dir="/t/a", base_path="/s/a", keep_versions=-1),
            model(name="b", checkpoint_dir="/t/b", base_path="/s/b", builder=None),
            model(name="c", checkpoint_dir="/t/c", base_path="/s/c", signature={"x": 1}),
        ],
        "extra": 1,
    }
    with pytest.raises(ConfigError) as info:
        parse(data)
    problems = info.value.problems
    expected = [
        "extra: unknown top-level key",
        "daemon.verbose: unknown key",
        "daemon.log_format: must be one of",
        "models[0] (a).keep_versions: must be a finite number, 0 or more",
        "models[1] (b).builder: missing (required)",
        "models[2] (c).signature.x: unknown key",
    ]
    assert len(problems) == len(expected), problems
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    # The message lists them all, one per line, under the source's name.
    message = str(info.value)
    assert message.splitlines()[0] == "invalid config test.toml:"
    assert message.splitlines()[1:] == [f"  - {p}" for p in problems]


# --- load_config -----------------------------------------------------------------------

VALID_TOML = """
[daemon]
log_level = "debug"

[[models]]
name = "m"
checkpoint_dir = "ckpts"
base_path = "serving/m"
builder = "trainer.model:build"
python_path = ["src"]
"""


def test_load_config_resolves_paths_against_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "config.toml").write_text(VALID_TOML)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    cfg = load_config(Path("../etc/config.toml"))

    assert cfg.path == folder / "config.toml"
    assert cfg.daemon.log_level == "debug"
    (m,) = cfg.models
    assert m.checkpoint_dir == folder / "ckpts"
    assert m.base_path == folder / "serving" / "m"
    assert m.python_path == (folder / "src",)


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.problems == ["file not found; pass --config PATH"]
    assert str(path) in str(info.value)


def test_load_config_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)  # a directory
    assert info.value.source == str(tmp_path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("cannot read: ")


@pytest.mark.parametrize(
    "text",
    [
        "[daemon\nlog_level = 'info'",
        "[[models]]\nname = m\n",
        "a = 1\na = 2\n",
        "\xff",
    ],
    ids=["unclosed table", "bare string", "duplicate key", "not utf-8"],
)
def test_load_config_invalid_toml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("not valid TOML: ")


def test_load_config_problems_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(VALID_TOML.replace('log_level = "debug"', "log_level = 3"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.problems == ["daemon.log_level: must be a string, got int 3"]
    assert str(info.value).startswith(f"invalid config {path}:")


def test_example_config_loads_and_states_the_defaults() -> None:
    # tests/test_docs.py checks that the example parses and documents every key;
    # this loads it through load_config and checks that the values it shows
    # are the defaults the code applies when a key is left out.
    cfg = load_config(EXAMPLE)
    assert cfg.path == EXAMPLE
    assert cfg.daemon == DaemonConfig()
    (m,) = cfg.models
    defaults = parse({"models": [model()]}).models[0]
    for key in (
        "source",
        "checkpoint_key",
        "export_policy",
        "version_policy",
        "keep_versions",
        "allow_signature_change",
        "min_interval_seconds",
        "rtol",
        "atol",
        "signature",
    ):
        assert getattr(m, key) == getattr(defaults, key), key


# --- locations that are URLs -----------------------------------------------------------


def test_object_store_urls_become_object_urls_in_any_combination(tmp_path: Path) -> None:
    cfg = parse(
        {
            "daemon": {"s3_endpoint_url": "http://127.0.0.1:9000"},
            "models": [
                model(name="a", checkpoint_dir="gs://train-bucket/run/", base_path="serve/a"),
                model(name="b", checkpoint_dir="runs/b", base_path="S3://serve-bucket/models/b"),
            ],
        },
        tmp_path,
    )
    a, b = cfg.models
    assert a.checkpoint_dir == ObjectURL("gs", "train-bucket", "run")
    assert a.base_path == tmp_path / "serve" / "a"
    assert b.checkpoint_dir == tmp_path / "runs" / "b"
    # The S3 endpoint of the config travels with every s3:// URL, not with gs:// ones.
    assert b.base_path == ObjectURL("s3", "serve-bucket", "models/b", "http://127.0.0.1:9000")
    assert str(b.base_path) == "s3://serve-bucket/models/b"


@pytest.mark.parametrize("key", ["checkpoint_dir", "base_path"])
@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("gs://Bad_Bucket/run", "not a valid bucket name"),
        ("s3://bucket/a//b", "empty, '.' or '..' segment"),
        ("s3://bucket/a/../b", "empty, '.' or '..' segment"),
        ("hdfs://namenode/models/m", "unsupported URL scheme hdfs://"),
    ],
)
def test_bad_urls_are_refused_naming_the_key(key: str, url: str, fragment: str) -> None:
    assert_one_problem({"models": [model(**{key: url})]}, f"models[0] (m).{key}", fragment)


@pytest.mark.parametrize(
    ("url", "module", "extra"),
    [("s3://bucket/m", "boto3", "s3"), ("gs://bucket/m", "google.cloud.storage", "gcs")],
)
def test_a_url_whose_client_is_not_installed_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, extra: str
) -> None:
    # A None entry in sys.modules is how Python marks a module as not importable.
    monkeypatch.setitem(sys.modules, module, None)
    assert_one_problem(
        {"models": [model(base_path=url)]},
        "models[0] (m).base_path",
        f"needs {module}",
        f"pip install 'ckpt-exporter[{extra}]'",
    )


def test_a_source_that_reads_local_folders_only_refuses_a_remote_checkpoint_dir() -> None:
    assert_one_problem(
        {
            "models": [
                model(
                    checkpoint_dir="s3://bucket/run",
                    source="command",
                    builder="",
                    command={"argv": ["true", "{checkpoint}", "{output_dir}"]},
                )
            ]
        },
        "models[0] (m).checkpoint_dir",
        "source = 'command' reads local folders only",
        "tf_checkpoint",
    )


def test_a_bad_s3_endpoint_is_refused() -> None:
    assert_one_problem(
        {"daemon": {"s3_endpoint_url": "minio:9000"}, "models": [model()]},
        "daemon.s3_endpoint_url",
        "http:// or https://",
    )


def test_relative_gate_files_need_a_local_checkpoint_dir() -> None:
    assert_one_problem(
        {
            "models": [
                model(
                    checkpoint_dir="gs://bucket/run",
                    gate={"metric": "loss", "json_file": "metrics.json"},
                )
            ]
        },
        "models[0] (m).gate.json_file",
        "not a local folder (gs://bucket/run)",
    )


def test_a_colon_in_a_local_path_is_not_a_url(tmp_path: Path) -> None:
    cfg = parse({"models": [model(checkpoint_dir="runs/a:b", base_path="serve/m")]}, tmp_path)
    assert cfg.models[0].checkpoint_dir == tmp_path / "runs" / "a:b"
