"""What an export may reuse: a published version's graph, a kept export worker.

Two keys, two questions. The *graph key* (stored in a version's metadata as
``export_key``) says whether a later export would trace the same graph, so
that version can be its template (:mod:`daemon.children.incremental`). The
*worker key* says whether a kept export worker built the same model from the
same settings, so it may serve the next export (:mod:`daemon.supervisor.warm_pool`).

An export that failed validation after reusing a graph is exported again in
full (the pipeline then asks for no template).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.basepath.catalog import Published
from daemon.basepath.layout import OBJECT_GRAPH_TENSOR, WEIGHTS_MAP_RELPATH
from daemon.basepath.storage import storage_for
from daemon.config import interpreters
from daemon.config.builders import model_builder_file
from daemon.config.loading import DaemonConfig, ModelConfig
from daemon.objectstore.url import Location
from daemon.protocol import ExportRequest
from daemon.sources import SOURCES

#: Request fields about one checkpoint, left out of the worker key.
_PER_JOB = ("result", "checkpoint", "export_dir", "reference", "template")


def export_key(identity: Mapping[str, Any], builder_file: Path | None) -> str:
    """A digest of everything that shapes the traced graph apart from the weights.

    ``identity`` holds the model's export settings (source, builder, inputs,
    tool version...); ``builder_file``'s bytes are added, so editing the
    builder's module makes the next export a full one. Two exports with the
    same key trace the same graph (code the builder imports from other
    modules is not hashed; the validator's output comparison and the full
    retry cover it).
    """
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    if builder_file is not None:
        try:
            h.update(builder_file.read_bytes())
        except OSError:
            h.update(b"unreadable")
    return "sha256:" + h.hexdigest()


def library_versions(cfg: ModelConfig | None = None) -> dict[str, str]:
    """Versions of the libraries that trace ``cfg``'s graph: its ``worker_python``'s, or ours."""
    report = interpreters.report_for(cfg) if cfg is not None else None
    return report["libraries"] if report is not None else interpreters.installed_versions()


def graph_key(cfg: ModelConfig) -> str | None:
    """The graph key of the model's next export, or None where no graph may be reused.

    Only ``tf_checkpoint`` models with ``incremental_export`` reuse graphs;
    the key digests the builder, its module's bytes, inputs, source and
    library versions (the worker still checks that every variable fits, see
    :mod:`daemon.children.incremental`).
    """
    if not cfg.incremental_export or not SOURCES[cfg.source].weights_in_checkpoint:
        return None
    if cfg.source != "tf_checkpoint":
        return None
    identity = {
        "tool_version": __version__,
        "libraries": library_versions(cfg),
        "source": cfg.source,
        "builder": cfg.builder,
        "python_path": [str(p) for p in cfg.python_path],
        "checkpoint_key": cfg.checkpoint_key,
        "signature": [dataclasses.asdict(s) for s in cfg.signature],
        "input_type": cfg.input_type,
        "image_preprocessing": (
            cfg.image_preprocessing.spec() if cfg.image_preprocessing else None
        ),
    }
    return export_key(identity, model_builder_file(cfg))


def template(base_path: Location, published: list[Published], key: str | None) -> str | None:
    """The local folder of the newest published version made with graph key ``key``, or None.

    On an object store that is the local copy the publisher kept of the
    version it uploaded last (:meth:`~daemon.basepath.storage.BasePathStorage.local_copy`):
    the worker reads a template's graph from disk.
    """
    if key is None:
        return None
    storage = storage_for(base_path)
    for p in sorted(published, key=lambda p: p.version, reverse=True):
        if p.metadata.get("export_key") == key:
            local = storage.local_copy(p.path.name)
            return None if local is None else str(local)
    return None


def needed_tensors(template: str | None) -> frozenset[str] | None:
    """The checkpoint tensors an export over ``template``'s graph reads, or None for all.

    They are the values of the template's weights map (each variable's
    checkpoint tensor) and the checkpoint's object graph. None when there is
    no template or it has no usable weights map: then nothing is known and
    the whole checkpoint is needed.
    """
    if template is None:
        return None
    try:
        record = json.loads(Path(template, WEIGHTS_MAP_RELPATH).read_text(encoding="utf-8"))
        variables = record["variables"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        return None
    return frozenset(variables.values()) | {OBJECT_GRAPH_TENSOR}


def worker_key(daemon: DaemonConfig, source: str, request: ExportRequest) -> str | None:
    """The key under which an export worker may be kept for this model's next export.

    None where workers are single-use: cold children, ``exporter_max_exports
    = 1``, or a source whose exporter does not keep its model. The key digests
    every field of the request that is not about this one checkpoint, so a
    reload that changes any of them gets a new worker.
    """
    if not (daemon.warm_workers and daemon.exporter_max_exports > 1):
        return None
    if not SOURCES[source].reusable_exporter:
        return None
    stable = {k: v for k, v in request.items() if k not in _PER_JOB}
    return export_key(stable, None)
