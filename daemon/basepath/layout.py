"""Where everything the daemon keeps under a base path lives; the one place these names are spelled.

A base path holds TF Serving's integer version folders and, beside them,
names the server never parses as a version (see
:func:`daemon.rules.versions.parse_version`): the daemon's state folder
``.ckpt-exporter/`` and its temporary export folders. Inside the state folder::

    lock               flock taken to publish, apply retention, roll back or pin
    rejected.json      checkpoints that failed for good or were gated out
    pins.json          versions that retention keeps
    rolled_back.json   checkpoints whose versions were rolled back
    rolled-back/       the rolled-back versions, kept whole for inspection
    labels.json        with [serving_config]: the model's version labels, wanted and written
    label_requests.json  a promote or rollback asked by an operator, taken by the daemon
    staging/<pid>-<job>/  a checkpoint pinned for one export, its requests and results
    failed/            failed exports kept for inspection (``keep_failed``)
    trash/             versions renamed out of sight on their way to deletion

Inside a version, ``assets.extra/`` (which TF Serving ignores except for the
warmup file) holds what the daemon adds: :data:`METADATA_RELPATH`,
:data:`REPORT_RELPATH` and :data:`MANIFEST_RELPATH`.
"""

from __future__ import annotations

from pathlib import Path

from daemon.objectstore.url import Location

#: Where a published version records what it was made from.
METADATA_RELPATH = Path("assets.extra") / "ckpt_exporter.json"
#: The validation report of an export, published with it or kept with a failed one.
REPORT_RELPATH = Path("assets.extra") / "ckpt_exporter_validation.json"
#: The provenance manifest of a version (:mod:`daemon.basepath.manifest`): the
#: SHA-256 of every file, the checkpoint, the builder's code, config and libraries.
MANIFEST_RELPATH = Path("assets.extra") / "ckpt_exporter_manifest.json"

#: The daemon's private folder inside a base path. Its name does not parse as
#: an integer, so TF Serving never takes it for a version.
STATE_DIRNAME = ".ckpt-exporter"

#: Prefix of the temporary export folders created inside a base path.
TEMP_PREFIX = ".ckpt-exporter-tmp-"


#: Which checkpoint tensor each variable of a version was restored from
#: (:mod:`daemon.children.incremental`): what a linked export of the next
#: checkpoint reads, and all that needs fetching of one on an object store.
WEIGHTS_MAP_RELPATH = Path("assets.extra") / "ckpt_exporter_weights.json"
#: The tensor of a TF2 checkpoint holding its object graph.
OBJECT_GRAPH_TENSOR = "_CHECKPOINTABLE_OBJECT_GRAPH"

#: TF Serving's warmup file inside a version: replayed at load, a failing record fails the load.
WARMUP_RELPATH = Path("assets.extra") / "tf_serving_warmup_requests"
#: TF Serving refuses to load a version whose warmup file holds more records.
MAX_WARMUP_RECORDS = 1000

#: Files and folders inside the state folder (see the module docstring).
LOCK_NAME = "lock"
REJECTED_NAME = "rejected.json"
PINS_NAME = "pins.json"
ROLLED_BACK_NAME = "rolled_back.json"
ROLLED_BACK_DIRNAME = "rolled-back"
LABELS_NAME = "labels.json"
LABEL_REQUESTS_NAME = "label_requests.json"
STAGING_DIRNAME = "staging"
FAILED_DIRNAME = "failed"
TRASH_DIRNAME = "trash"


def is_temp_name(name: str) -> bool:
    """True for the temporary folders this daemon creates in a base path."""
    return name.startswith(TEMP_PREFIX)


def state_dir(base_path: Location) -> Location:
    """The daemon's private folder inside ``base_path`` (created on demand by its writers)."""
    return base_path / STATE_DIRNAME
