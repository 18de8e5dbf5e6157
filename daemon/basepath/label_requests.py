"""Operator requests to move a model's labels, and the label state read back (``[serving_config]``).

The daemon alone writes ``labels.json`` (:mod:`daemon.supervisor.labels`).
``ckpt-exporter promote`` and ``rollback`` leave one request,
``label_requests.json``, that the daemon takes (and deletes) at its next
rescan; a newer request replaces one not yet taken. The request is written
under the base path's lock, and names a version this daemon published for
the model, checked at the time of the request.
"""

from __future__ import annotations

import time
from typing import Literal

from daemon.basepath.catalog import published_versions
from daemon.basepath.layout import LABEL_REQUESTS_NAME, LABELS_NAME
from daemon.basepath.operations import LOCK_TIMEOUT_SECONDS, OperationError, acquire_lock
from daemon.basepath.storage import storage_for
from daemon.objectstore.url import Location
from daemon.rules.labels import LabelState, from_json

Op = Literal["promote", "rollback"]


def read_labels(base_path: Location) -> LabelState | None:
    """The model's label state, or None when there is none (yet) or it cannot be read."""
    try:
        return from_json(storage_for(base_path).read_record(LABELS_NAME))
    except (OSError, ValueError):
        return None


def request_move(
    base_path: Location,
    model: str,
    op: Op,
    version: int,
    *,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
) -> None:
    """Ask the daemon to promote ``version`` to stable, or roll both labels back to it.

    Raises :class:`OperationError` when ``version`` is not one this daemon
    published for ``model`` in ``base_path``, or the lock stays busy.
    """
    storage = storage_for(base_path)
    with acquire_lock(base_path, lock_timeout):
        owned = sorted(p.version for p in published_versions(base_path, model))
        if version not in owned:
            listing = ", ".join(map(str, owned)) or "none"
            raise OperationError(
                f"version {version} of model {model!r} was not published by ckpt-exporter "
                f"in {base_path} (available: {listing})"
            )
        storage.write_record(
            LABEL_REQUESTS_NAME, {"op": op, "version": version, "model": model, "at": time.time()}
        )
