"""TF Serving's model config file: rendered from the daemon's models, merged, written whole.

TF Serving re-reads ``--model_config_file`` every
``--model_config_file_poll_wait_seconds`` and *unloads every model the new
file does not list*. So the file always lists every model of this daemon
(those with at least one version), plus, unchanged, the models of an
optional base config the user keeps for models the daemon does not manage.

The text is built with TF Serving's own ``ModelServerConfig`` proto and
``text_format``, so it is the format the server parses by construction; a
base config is parsed with the same proto (a model both there and managed
here is refused).

Writing (:func:`write_config`): locally, a temporary file in the same
folder, fsynced, renamed over the old one, then the folder fsynced: the
server reads the old file or the new one, never a mix. On an object store,
one PUT (an object is replaced whole); when the token of the daemon's last
write is known, the PUT is conditional on it, so that a second writer of the
same file is noticed (:class:`ConfigConflict`) instead of silently lost.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon.durable import fsync_path
from daemon.objectstore.client import ObjectStoreError
from daemon.objectstore.url import Location, ObjectURL
from daemon.rules.labels import ModelEntry


class ConfigConflict(Exception):
    """The config file on the object store changed since the daemon last wrote it."""


def _protos() -> tuple[Any, Any]:
    """``(model_server_config_pb2, text_format)``, imported on use.

    Only daemons with ``[serving_config]`` need ``tensorflow-serving-api``
    (checked when the config is loaded).
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return model_server_config_pb2, text_format


def render(models: Mapping[str, tuple[str, ModelEntry]], base_config: str | None = None) -> str:
    """The config text: ``models`` (name -> (base path, entry)) after the base config's models.

    ``ValueError`` when the base config is not a ``model_config_list`` text
    proto, or names a model this daemon manages.
    """
    pb, text_format = _protos()
    config = pb.ModelServerConfig()
    if base_config:
        try:
            text_format.Parse(base_config, config)
        except text_format.ParseError as e:
            raise ValueError(f"the base config is not a ModelServerConfig text proto: {e}") from e
        if config.WhichOneof("config") not in (None, "model_config_list"):
            raise ValueError("the base config must use model_config_list")
        clash = sorted({c.name for c in config.model_config_list.config} & set(models))
        if clash:
            raise ValueError(
                f"the base config also lists {', '.join(clash)}, which this daemon manages; "
                "remove them from it"
            )
    for name, (base_path, entry) in sorted(models.items()):
        c = config.model_config_list.config.add()
        c.name = name
        c.base_path = base_path
        c.model_platform = "tensorflow"
        c.model_version_policy.specific.versions.extend(entry.versions)
        for label, version in sorted(entry.labels.items()):
            c.version_labels[label] = version
    return str(text_format.MessageToString(config))


def parse_entries(text: str) -> dict[str, tuple[str, ModelEntry]]:
    """Every model of a config text: name -> (base path, entry); ``ValueError`` if unparsable."""
    pb, text_format = _protos()
    config = pb.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ValueError(str(e)) from e
    out = {}
    for c in config.model_config_list.config:
        versions = tuple(sorted(int(v) for v in c.model_version_policy.specific.versions))
        labels = {str(k): int(v) for k, v in c.version_labels.items()}
        out[str(c.name)] = (str(c.base_path), ModelEntry(versions=versions, labels=labels))
    return out


def write_config(path: Location, text: str, token: str | None = None) -> str | None:
    """Replace the config file at ``path`` with ``text``, whole; returns the new token.

    The token (an object's ETag or generation; None for a local file) is
    what the next write is conditional on. Raises :class:`ConfigConflict`
    when an object-store file changed since ``token``, ``OSError`` otherwise.
    """
    data = text.encode()
    if isinstance(path, Path):
        _write_local(path, data)
        return None
    return _write_object(path, data, token)


def _write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            # The contents must be on disk before the rename makes them the
            # file; the rename is on disk once the folder is fsynced.
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # the server runs as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def _write_object(url: ObjectURL, data: bytes, token: str | None) -> str:
    from daemon.objectstore.clients import client_for

    store = client_for(url, url.endpoint or None)
    try:
        info = store.put(url.prefix, data, if_token=token) if token else store.put(url.prefix, data)
    except ObjectStoreError as e:
        if e.kind in ("precondition", "not_found") and token:
            raise ConfigConflict(
                f"{url} changed since this daemon last wrote it (another writer?)"
            ) from e
        raise
    return info.token
