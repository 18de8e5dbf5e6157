"""worker_python: the export worker under another interpreter, checked before it is used.

The fast tests run real interpreters without TensorFlow (a venv made here, the
system's Python) and judge reports; the e2e test runs real exports with
``worker_python`` set and the worker started through the bootstrap.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import cli, train, version_dirs, write_config

from daemon import protocol
from daemon.config.builders import check_builders, model_builder_file
from daemon.config.interpreters import probe, problems, report_for
from daemon.config.loading import ConfigError, load_config
from daemon.protocol import InterpreterReport

REPO = Path(__file__).resolve().parents[1]


def _report(**over: object) -> InterpreterReport:
    base: InterpreterReport = {
        "python": [3, 11, 7],
        "executable": "/opt/trainer/bin/python",
        "tensorflow": "2.20.0",
        "tensorflow_error": None,
        "libraries": {"tensorflow": "2.20.0"},
        "builder_file": "/opt/trainer/model.py",
        "builder_problem": None,
    }
    base.update(over)  # type: ignore[typeddict-item]
    return base


PY = Path("/opt/trainer/bin/python")


def test_a_fit_interpreter_has_no_problems() -> None:
    assert problems(PY, _report()) == []
    assert problems(PY, _report(tensorflow="2.16.1", python=[3, 12, 0])) == []


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"python": [3, 10, 12]}, "is Python 3.10.12; the export worker needs Python 3.11"),
        (
            {"tensorflow": None, "tensorflow_error": "ModuleNotFoundError: No module named 'x'"},
            "cannot import tensorflow (ModuleNotFoundError: No module named 'x'); install",
        ),
        ({"tensorflow": "2.15.1"}, "has TensorFlow 2.15.1; the export worker needs 2.16"),
        ({"tensorflow": "1.15.5"}, "has TensorFlow 1.15.5"),
        ({"builder_problem": "module 'm' not found"}, "(with /opt/trainer/bin/python) module"),
    ],
)
def test_each_unfit_interpreter_is_named_with_what_to_do(
    over: dict[str, object], expected: str
) -> None:
    (found,) = problems(PY, _report(**over))
    assert expected in found and str(PY) in found


def _venv(where: Path, tensorflow_version: str | None = None) -> Path:
    """A real venv (no pip); with a stand-in ``tensorflow`` of that version when asked."""
    venv.EnvBuilder(with_pip=False).create(where)
    if tensorflow_version is not None:
        (site,) = where.glob("lib/python3*/site-packages")
        (site / "tensorflow").mkdir()
        (site / "tensorflow" / "__init__.py").write_text(f"__version__ = {tensorflow_version!r}\n")
    return where / "bin" / "python"


def _config(tmp_path: Path, python: Path, builder: str = "daemon.demo.model:build_model") -> Path:
    return write_config(tmp_path, builder=builder, worker_python=str(python))


def test_an_interpreter_without_tensorflow_is_refused_naming_the_key(tmp_path: Path) -> None:
    python = _venv(tmp_path / "trainer")
    cfg = load_config(_config(tmp_path, python))
    with pytest.raises(ConfigError) as e:
        check_builders(cfg)
    (found,) = e.value.problems
    assert found.startswith("models[0] (m).worker_python: ")
    assert f"{python} cannot import tensorflow (ModuleNotFoundError" in found
    assert report_for(cfg.models[0]) is None


def test_an_interpreter_with_an_old_tensorflow_is_refused(tmp_path: Path) -> None:
    python = _venv(tmp_path / "trainer", "2.12.0")
    cfg = load_config(_config(tmp_path, python))
    with pytest.raises(ConfigError) as e:
        check_builders(cfg)
    assert any("has TensorFlow 2.12.0; the export worker needs 2.16" in p for p in e.value.problems)


def test_the_builder_is_located_by_that_interpreter(tmp_path: Path) -> None:
    # structlog is installed beside the daemon, not in the trainer's venv.
    python = _venv(tmp_path / "trainer", "2.20.0")
    cfg = load_config(_config(tmp_path, python, builder="structlog:get_logger"))
    with pytest.raises(ConfigError) as e:
        check_builders(cfg)
    (found,) = e.value.problems
    assert f"(with {python}) module 'structlog' not found" in found
    assert f"the packages of {python})" in found

    # With the module on python_path, it is found there and its file is what the
    # export key and the manifest read.
    code = tmp_path / "code"
    code.mkdir()
    (code / "net.py").write_text("def build(): ...\n")
    cfg = load_config(
        write_config(
            tmp_path, builder="net:build", worker_python=str(python), python_path=[str(code)]
        )
    )
    check_builders(cfg)
    report = report_for(cfg.models[0])
    assert report is not None and report["tensorflow"] == "2.20.0"
    assert report["executable"] == str(python)
    assert model_builder_file(cfg.models[0]) == code / "net.py"


def test_a_missing_interpreter_is_refused(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, tmp_path / "nowhere" / "python"))
    with pytest.raises(ConfigError) as e:
        check_builders(cfg)
    (found,) = e.value.problems
    assert f"models[0] (m).worker_python: cannot run {tmp_path / 'nowhere' / 'python'}" in found


def test_the_child_code_runs_under_an_interpreter_with_none_of_the_daemons_packages(
    tmp_path: Path,
) -> None:
    """The bootstrap loads `daemon` alone: no structlog, watchdog or prometheus needed there."""
    python = _venv(tmp_path / "trainer")
    argv = protocol.module_command(protocol.INTERPRETER, ["x.y:build"], str(python))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["executable"] == str(python) and report["tensorflow"] is None
    assert report["builder_problem"].startswith("module 'x.y' not found")
    answer = probe(python, "x.y:build", ())
    assert not isinstance(answer, str) and answer["python"][:2] == list(sys.version_info[:2])


@pytest.mark.e2e
def test_exports_run_under_worker_python_and_start_cold(tmp_path: Path) -> None:
    """The daemon's own venv as worker_python: the bootstrap path, end to end."""
    train(tmp_path / "ckpts", 2)
    config = write_config(tmp_path, worker_python=sys.executable)
    r = cli("export", "--config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "ckpt-10 published as version 1"
    base = tmp_path / "serving" / "m"
    assert sorted(version_dirs(base)) == [1]
    started = [
        json.loads(line)
        for line in r.stderr.splitlines()
        if line.startswith("{") and '"child_started"' in line
    ]
    export_starts = [e for e in started if e["phase"] == "export"]
    assert export_starts and not any(e["warm"] for e in export_starts)
    # The validator stays in the daemon's environment: forked from the zygote
    # that `export` starts at once, not importing TensorFlow after the export.
    validate_starts = [e for e in started if e["phase"] == "validate"]
    assert validate_starts and all(e["warm"] for e in validate_starts)
    manifest = json.loads((base / "1/assets.extra/ckpt_exporter_manifest.json").read_text())
    assert manifest["builder"]["file"] == str(REPO / "daemon/demo/model.py")


RECORDING_BUILDER = """
import json, os
from daemon.demo.model import build_model

def build():
    with open({out!r}, "w") as f:
        json.dump({{"nice": os.nice(0), "threads": os.environ.get("TF_NUM_INTRAOP_THREADS")}}, f)
    return build_model()
"""


@pytest.mark.e2e
@pytest.mark.parametrize("background", [False, True])
def test_export_by_hand_uses_every_cpu_unless_asked_to_stay_in_the_background(
    tmp_path: Path, background: bool
) -> None:
    import os

    train(tmp_path / "ckpts", 1)
    code = tmp_path / "code"
    code.mkdir()
    seen = tmp_path / "seen.json"
    (code / "recording.py").write_text(RECORDING_BUILDER.format(out=str(seen)))
    config = write_config(
        tmp_path,
        builder="recording:build",
        python_path=[str(code)],
        daemon={"worker_threads": 1},
    )
    r = cli("export", "--config", str(config), *(["--background"] if background else []))
    assert r.returncode == 0, r.stdout + r.stderr
    limits = json.loads(seen.read_text())
    base = os.nice(0)
    if background:
        assert limits == {"nice": min(19, base + 19), "threads": "1"}
    else:
        assert limits == {"nice": base, "threads": str(os.cpu_count())}
