"""Finding a builder's module without running it: what the daemon checks at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config.builders import builder_problem, check_builders
from daemon.config.loading import ConfigError, parse_config

#: A package whose __init__ would leave a mark (and fail) if it ran.
_LOUD_INIT = "open(__file__ + '.ran', 'w').close()\nraise RuntimeError('ran')\n"


@pytest.fixture
def code(tmp_path: Path) -> Path:
    root = tmp_path / "code"
    (root / "trainer" / "nets").mkdir(parents=True)
    (root / "trainer" / "__init__.py").write_text(_LOUD_INIT)
    (root / "trainer" / "nets" / "__init__.py").write_text(_LOUD_INIT)
    (root / "trainer" / "nets" / "resnet.py").write_text("def build(): ...\n")
    (root / "trainer" / "data.py").write_text("")
    (root / "flat.py").write_text("def build(): ...\n")
    (root / "namespace" / "inner").mkdir(parents=True)  # no __init__: a namespace package
    (root / "namespace" / "inner" / "mod.py").write_text("")
    return root


@pytest.mark.parametrize(
    "spec", ["flat:build", "trainer.nets.resnet:build", "trainer.data:f", "namespace.inner.mod:f"]
)
def test_modules_on_python_path_are_found_without_running_them(code: Path, spec: str) -> None:
    assert builder_problem(spec, [code]) is None
    assert not list(code.rglob("*.ran"))


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("nowhere:build", "module 'nowhere' not found (python_path: "),
        ("trainer.missing:build", "module 'trainer.missing' not found"),
        ("trainer.nets.vgg:build", "module 'trainer.nets.vgg' not found"),
        ("flat.sub:build", "builder module 'flat' is a module, not a package: it has no 'sub'"),
    ],
)
def test_missing_modules_are_named(code: Path, spec: str, problem: str) -> None:
    got = builder_problem(spec, [code])
    assert got is not None and problem in got, got
    assert str(code) in got or "not a package" in got
    assert not list(code.rglob("*.ran"))


def test_installed_packages_and_the_working_directory_count(
    code: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon's own demo builder comes from the installed package, whatever the cwd.
    monkeypatch.chdir(code.parent)
    assert builder_problem("daemon.demo.model:build_model", []) is None
    # The child runs `python -m`, which puts the working directory on sys.path.
    assert builder_problem("flat:build", []) is not None
    monkeypatch.chdir(code)
    assert builder_problem("flat:build", []) is None


def test_check_builders_names_each_bad_model(code: Path) -> None:
    def model(name: str, builder: str) -> dict[str, object]:
        return {
            "name": name,
            "checkpoint_dir": f"/train/{name}",
            "base_path": f"/serve/{name}",
            "builder": builder,
            "python_path": [str(code)],
        }

    cfg = parse_config(
        {"models": [model("a", "flat:build"), model("b", "trainer.nope:build")]},
        "test.toml",
        code,
    )
    with pytest.raises(ConfigError) as e:
        check_builders(cfg)
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("models[1] (b).builder: module 'trainer.nope' not found")
