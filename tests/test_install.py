"""Installed into a trainer's environment, the daemon adds no second TensorFlow.

Runs only in ``make thirdparty``, which makes a venv with plain
``tensorflow`` (a trainer's), installs the daemon into it with pip as a user
would, and points ``CKPT_EXPORTER_TRAINER_PYTHON`` at it. Two distributions
unpacking into the one ``tensorflow/`` folder (``tensorflow`` and
``tensorflow-cpu``) pass ``pip check``, so this test asks the installed
distributions which of them own ``tensorflow/__init__.py``.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.thirdparty

PYTHON_ENV = "CKPT_EXPORTER_TRAINER_PYTHON"

OWNERS = """
import json
from importlib import metadata
owners = sorted(
    d.metadata["Name"]
    for d in metadata.distributions()
    if any(str(f) == "tensorflow/__init__.py" for f in (d.files or []))
)
print(json.dumps(owners))
"""


def _python() -> str:
    python = os.environ.get(PYTHON_ENV)
    if not python:
        pytest.skip(f"{PYTHON_ENV} is not set: `make thirdparty` creates the trainer's venv")
    return python


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def test_one_tensorflow_distribution_owns_the_tensorflow_package() -> None:
    python = _python()
    done = _run(python, "-c", OWNERS)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["tensorflow"]
    check = _run(python, "-m", "pip", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_installed_command_runs_in_that_environment() -> None:
    python = _python()
    done = _run(python, "-m", "daemon", "--help")
    assert done.returncode == 0, done.stderr
    assert "check-config" in done.stdout
    served = _run(python, "-c", "import tensorflow_serving.apis.prediction_log_pb2")
    assert served.returncode == 0, served.stderr
