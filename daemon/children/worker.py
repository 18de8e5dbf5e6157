"""The export worker process: one request in, one SavedModel and one result file out.

Runs as ``python -m daemon.children.worker REQUEST.json`` (see
:mod:`daemon.protocol`) or forked by the zygote; one of the two processes
that import TensorFlow. It dispatches the request to the exporter of its
checkpoint format (:mod:`daemon.children.exporters`), which:

1. imports ``builder`` (with ``python_path`` on ``sys.path``) and calls it;
   it returns a Keras model or a ``tf.Module`` whose variables already exist
   (:mod:`daemon.children.model`);
2. restores the pinned checkpoint's object ``checkpoint_key`` into it and
   fails (permanently) unless every variable of the model was restored;
3. exports with a ``serving_default`` signature whose outputs are a dict (or,
   given a ``template`` version of the same model, writes only the new
   weights into its graph: :mod:`daemon.children.incremental`; anything that
   does not fit falls back to the full export). Everything is written by
   ``tf.saved_model.save``; for a Keras model (or a serving module) the
   object saved is a stand-in that tracks the tf.Variables the serving
   function reads, because a Keras 3 model saved as itself loads in TF2 yet
   fails in TF Serving's graph-mode loader ("Could not find variable");
4. runs the serving function of the *in-memory* model on deterministic
   inputs and stores inputs and outputs as the reference the validator must
   match.

Then the worker writes the TF Serving warmup records (``warmup_records``)
and the result. A reusable exporter (see :mod:`daemon.supervisor.warm_pool`)
serves several requests with the same ``exporter_key``:
:func:`daemon.children.model.model_for` builds the model for the first one
and hands the same object to the next, which restores its checkpoint into
it. Each result lists the source files the builder imported
(``code_files``), so the supervisor can retire this process when they change.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from daemon.basepath.layout import WARMUP_RELPATH
from daemon.children import reference, runtime, warmup_records
from daemon.children.model import kept_code_files
from daemon.protocol import (
    ExporterResult,
    ExportOutcome,
    ExportRequest,
    ExportResult,
    WarmupWritten,
)


def export(req: ExportRequest) -> ExportResult:
    """Run the export of the request's source (see :class:`daemon.sources.SourceKind`)."""
    from daemon.sources import SOURCES

    kind = SOURCES.get(req.get("source", "tf_checkpoint"))
    if kind is None:
        raise runtime.ChildFailure("bad_request", f"unknown source {req.get('source')!r}")
    result: ExporterResult = importlib.import_module(kind.exporter).export(req)
    if req.get("warmup_records"):
        result["warmup"] = write_warmup(req)
    return {"ok": True, **result}


def write_warmup(req: ExportRequest) -> WarmupWritten:
    """Write the export's warmup file from the reference inputs (``warmup_records``).

    A SavedModel that brings its own warmup file (the ``saved_model`` and
    ``command`` sources) keeps it: the validator replays whatever is there.
    """
    path = os.path.join(req["export_dir"], str(WARMUP_RELPATH))
    if os.path.exists(path):
        return {"records": None, "kept": str(WARMUP_RELPATH)}
    inputs = reference.load(req["reference"]).inputs
    n = warmup_records.write_warmup(
        req["export_dir"], inputs, int(req["warmup_records"]), req["model"]
    )
    return {"records": n}


def main(argv: list[str]) -> int:
    req: ExportRequest | None = runtime.begin(argv, validator=False)
    code = 0
    while req is not None:
        code = serve_one(req)
        req = runtime.next_request(code)
    return code


def serve_one(req: ExportRequest) -> int:
    """Run one export request; write its result; return the exit code that goes with it."""
    result: ExportOutcome
    try:
        result = export(req)
    except runtime.ChildFailure as e:
        result = runtime.failure(e.reason, str(e), permanent=e.permanent)
    except MemoryError:
        result = runtime.failure("out_of_memory", "the export ran out of memory", permanent=False)
    except OSError as e:
        # Disk full, permissions: the environment, not the checkpoint.
        result = runtime.environment_failure(e) or runtime.failure(
            "os_error", f"{type(e).__name__}: {e}", permanent=False
        )
    except Exception as e:
        tb = traceback.format_exc(limit=8)
        result = runtime.environment_failure(e) or runtime.failure(
            "export_error", f"{type(e).__name__}: {e}\n{tb}", permanent=True
        )
    result["warm"] = bool(req.get("warm"))
    result["reused"] = int(req.get("reused", 0))
    if req.get("exporter_key"):
        result["code_files"] = kept_code_files()
    return runtime.finish(Path(req["result"]), result)


def run(argv: list[str]) -> NoReturn:
    """The process's entry point, cold or forked by :mod:`daemon.children.zygote`; exits."""
    os.umask(0o022)
    runtime.exit_now(main(argv))


if __name__ == "__main__":
    run(sys.argv)
