"""A model's ``worker_python``: is that interpreter fit to run its exports?

A trainer's environment (Model Garden, tf-keras, custom layers, its own
TensorFlow) often cannot be installed next to the daemon's. With
``worker_python``, the export worker runs under the trainer's interpreter with
the trainer's packages (:func:`daemon.protocol.child_command`), while the
supervisor, and the validator that loads exports as TF Serving does, stay in
the daemon's environment.

At start and on reload (:func:`check_interpreters`), each such interpreter
runs :mod:`daemon.children.interpreter` once (it imports TensorFlow: seconds)
and the answer is judged by :func:`problems` (pure). The answer is kept
(:func:`report_for`), so that the builder's file and the library versions in
a model's export key are that interpreter's, not the daemon's.
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

from daemon import protocol
from daemon.config.loading import Config, ConfigError, ModelConfig
from daemon.protocol import InterpreterReport

#: The oldest TensorFlow the children run on (as in pyproject.toml).
MIN_TENSORFLOW = (2, 16)
#: The oldest Python the ``daemon`` package runs on.
MIN_PYTHON = (3, 11)
#: Importing TensorFlow in a cold environment can take tens of seconds.
PROBE_TIMEOUT_SECONDS = 180.0

_Key = tuple[str, str, tuple[str, ...]]
_reports: dict[_Key, InterpreterReport] = {}


def installed_versions() -> dict[str, str]:
    """Installed versions of the libraries that trace a graph (metadata; nothing imported)."""
    out = {}
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "tf-keras"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _key(m: ModelConfig) -> _Key:
    assert m.worker_python is not None
    return (str(m.worker_python), m.builder, tuple(str(p) for p in m.python_path))


def probe(python: Path, builder: str, python_path: tuple[Path, ...]) -> InterpreterReport | str:
    """Run the report module under ``python``; its report, or why it could not run."""
    argv = protocol.module_command(
        protocol.INTERPRETER, [builder, *(str(p) for p in python_path)], str(python)
    )
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_SECONDS,
            # The worker's own settings: no GPU claimed by a mere version check.
            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    except OSError as e:
        return f"cannot run {python}: {e.strerror or e}"
    except subprocess.TimeoutExpired:
        return f"{python} did not answer within {PROBE_TIMEOUT_SECONDS:.0f} s"
    lines = done.stdout.strip().splitlines()
    try:
        report: InterpreterReport = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{python} exited {done.returncode} without a report: {tail[:300]}"
    return report


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def problems(python: Path, report: InterpreterReport) -> list[str]:
    """Why ``report`` (of interpreter ``python``) rules it out as a worker; [] if fit."""
    out = []
    if tuple(report["python"][:2]) < MIN_PYTHON:
        have = ".".join(map(str, report["python"]))
        out.append(
            f"{python} is Python {have}; the export worker needs Python "
            f"{'.'.join(map(str, MIN_PYTHON))} or newer"
        )
    tf = report["tensorflow"]
    if tf is None:
        out.append(
            f"{python} cannot import tensorflow ({report['tensorflow_error']}); install "
            f"tensorflow>={'.'.join(map(str, MIN_TENSORFLOW))} into that environment, "
            "or remove worker_python to export with the daemon's own"
        )
    elif _version(tf) < MIN_TENSORFLOW:
        out.append(
            f"{python} has TensorFlow {tf}; the export worker needs "
            f"{'.'.join(map(str, MIN_TENSORFLOW))} or newer"
        )
    if report["builder_problem"]:
        out.append(f"(with {python}) {report['builder_problem']}")
    return out


def check_interpreters(cfg: Config) -> None:
    """Probe every model's ``worker_python``; :class:`ConfigError` naming each unfit one.

    Probes run once per interpreter, builder and python_path; a reload
    probes again (the trainer's environment may have changed).
    """
    found: list[str] = []
    fresh: dict[_Key, InterpreterReport] = {}
    for i, m in enumerate(cfg.models):
        if m.worker_python is None:
            continue
        key = _key(m)
        if key not in fresh:
            answer = probe(m.worker_python, m.builder, m.python_path)
            if isinstance(answer, str):
                found.append(f"models[{i}] ({m.name}).worker_python: {answer}")
                continue
            fresh[key] = answer
        found.extend(
            f"models[{i}] ({m.name}).worker_python: {p}"
            for p in problems(m.worker_python, fresh[key])
        )
    if found:
        raise ConfigError(str(cfg.path) if cfg.path else "config", found)
    _reports.update(fresh)


def report_for(m: ModelConfig) -> InterpreterReport | None:
    """The kept report of ``m``'s ``worker_python``; None without one (or not probed yet)."""
    if m.worker_python is None:
        return None
    return _reports.get(_key(m))
