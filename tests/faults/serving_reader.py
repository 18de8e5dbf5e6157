"""A stand-in for TF Serving's filesystem source, run as a subprocess by the fault tests.

``python serving_reader.py BASE_PATH OUT.jsonl STOP_FILE``

Lists ``BASE_PATH`` in a tight loop (every 20 ms; the server polls every
second) and treats a child as a version exactly as the server does: when its
whole name parses as an int64 (``daemon.rules.versions.parse_version``, the
``absl::SimpleAtoi`` rule). The first time it sees a version it records
whether the folder was complete at that moment, then loads it the way the
model server's C++ loader does, with TensorFlow's graph-mode loader
``tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)``, and runs
``serving_default`` by tensor name. One JSON line per version goes to
``OUT.jsonl``; the first line is ``{"ready": true}`` once TensorFlow is imported.
Runs until ``STOP_FILE`` exists.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = "-1"

import numpy as np
import tensorflow as tf

from daemon.basepath.layout import METADATA_RELPATH
from daemon.rules.versions import parse_version

#: What a complete export from this daemon contains (a SavedModel whose
#: variables are missing loads "successfully" in TF Serving, so check them).
REQUIRED = (
    "saved_model.pb",
    "variables/variables.index",
    "variables/variables.data-00000-of-00001",
    str(METADATA_RELPATH),
)


def load_and_run(path: str) -> dict[str, Any]:
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        sig = meta.signature_def["serving_default"]
        feed = {}
        for info in sig.inputs.values():
            dims = [1 if d.size < 0 else d.size for d in info.tensor_shape.dim]
            feed[info.name] = np.ones(dims, dtype=tf.dtypes.as_dtype(info.dtype).as_numpy_dtype)
        out = sess.run({k: v.name for k, v in sig.outputs.items()}, feed)
        for k, v in out.items():
            if not np.all(np.isfinite(v)):
                raise ValueError(f"output {k} is not finite")
        return {k: np.asarray(v).ravel()[:4].tolist() for k, v in out.items()}


def main(base: str, out_path: str, stop_file: str) -> None:
    seen: set[int] = set()
    with open(out_path, "a", encoding="utf-8") as out:

        def emit(rec: dict[str, Any]) -> None:
            out.write(json.dumps(rec) + "\n")
            out.flush()

        emit({"ready": True})
        while not os.path.exists(stop_file):
            try:
                names = os.listdir(base)
            except FileNotFoundError:
                names = []
            for name in names:
                version = parse_version(name)
                if version is None or version in seen:
                    continue
                seen.add(version)
                path = os.path.join(base, name)
                rec: dict[str, Any] = {"version": version, "name": name, "seen_at": time.time()}
                rec["missing_at_first_sight"] = [
                    f for f in REQUIRED if not os.path.isfile(os.path.join(path, f))
                ]
                try:
                    with open(os.path.join(path, METADATA_RELPATH), encoding="utf-8") as f:
                        meta = json.load(f)
                    rec["fingerprint"] = meta["checkpoint"]["fingerprint"]
                    rec["checkpoint"] = meta["checkpoint"]["prefix"]
                    rec["meta_version"] = meta["version"]
                except (OSError, ValueError, KeyError) as e:
                    rec["fingerprint"] = None
                    rec["meta_error"] = f"{type(e).__name__}: {e}"
                try:
                    rec["outputs"] = load_and_run(path)
                    rec["load_ok"] = True
                except Exception as e:
                    rec["load_ok"] = False
                    rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                # A version removed (by retention) while it was being loaded is not a
                # partial version; the test checks that it was removed on purpose.
                rec["gone_after_load"] = not os.path.exists(path)
                emit(rec)
            time.sleep(0.02)


if __name__ == "__main__":
    main(*sys.argv[1:4])
