"""Which versions of a model a running TF Serving has loaded, asked over its REST API.

``GET <server>/v1/models/<name>`` answers ``{"model_version_status":
[{"version": "3", "state": "AVAILABLE", ...}, ...]}``. Only ``AVAILABLE``
versions count: a label may only point at a version in that state.

Contract: :func:`loaded_versions` never raises; it returns None when the
server cannot be asked or answers something else, and the caller then does
not move a label (moving one to a version that is not loaded would make the
server refuse the whole config file).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

#: Seconds one status request may take; it runs on the supervisor's loop.
TIMEOUT_SECONDS = 2.0


def loaded_versions(server: str, model: str, timeout: float = TIMEOUT_SECONDS) -> set[int] | None:
    """The AVAILABLE versions of ``model`` on ``server`` (``http://host:8501``), or None."""
    url = f"{server.rstrip('/')}/v1/models/{urllib.parse.quote(model)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = json.loads(r.read())
    except urllib.error.HTTPError as e:
        # 404: the server does not know the model yet (its config not read
        # yet): nothing is loaded.
        return set() if e.code == 404 else None
    except (OSError, ValueError):
        return None
    statuses = data.get("model_version_status") if isinstance(data, dict) else None
    if not isinstance(statuses, list):
        return None
    out = set()
    for s in statuses:
        if isinstance(s, dict) and s.get("state") == "AVAILABLE":
            try:
                out.add(int(s.get("version", "")))
            except ValueError:
                continue
    return out
