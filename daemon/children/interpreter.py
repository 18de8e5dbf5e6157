"""What another interpreter offers the export worker: run inside a model's ``worker_python``.

``python -c BOOTSTRAP ... daemon.children.interpreter BUILDER [FOLDER ...]``
(see :func:`daemon.protocol.child_command`) prints one JSON object,
:class:`daemon.protocol.InterpreterReport`, and exits 0; the supervisor
decides from it whether that interpreter may run the model's exports
(:mod:`daemon.config.builders`).

It imports TensorFlow (the only way to know which one really loads: two
wheels in one ``tensorflow/`` folder both have metadata) but never the
user's builder module: that module is only *located*, as
:func:`daemon.config.builders.builder_problem` locates it for the daemon's own
interpreter, with ``FOLDER``s (the model's ``python_path``) first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from daemon.config import interpreters
from daemon.config.builders import builder_file, builder_problem
from daemon.protocol import InterpreterReport


def report(builder: str, python_path: list[str]) -> InterpreterReport:
    """This interpreter's Python and TensorFlow versions, and where ``builder`` would come from."""
    out: InterpreterReport = {
        "python": list(sys.version_info[:3]),
        "executable": sys.executable,
        "tensorflow": None,
        "tensorflow_error": None,
        "libraries": interpreters.installed_versions(),
        "builder_file": None,
        "builder_problem": None,
    }
    try:
        import tensorflow as tf

        out["tensorflow"] = str(tf.__version__)
    except Exception as e:  # ImportError, or a broken install raising anything
        out["tensorflow_error"] = f"{type(e).__name__}: {e}"
    if builder:
        folders = [Path(p) for p in python_path]
        out["builder_problem"] = builder_problem(builder, folders)
        found = builder_file(builder, folders)
        out["builder_file"] = str(found) if found is not None else None
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(f"usage: python -m {argv[0]} BUILDER [FOLDER ...]", file=sys.stderr)
        return 2
    # The report is the last line: TensorFlow may print to stdout on import.
    print(json.dumps(report(argv[1], argv[2:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
