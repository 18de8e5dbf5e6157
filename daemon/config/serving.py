"""The ``[serving_config]`` table: TF Serving's model config file, owned by the daemon.

Contract: :func:`parse_serving` returns a :class:`ServingConfig` or None
(no table: the daemon does not write a config file, TF Serving serves the
highest version of each base path) and appends one line per problem to
``problems``, each naming its key, as the rest of the config does.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config.schema import REQUIRED, Schema, apply_schema, non_negative, nonempty
from daemon.objectstore.url import Location

_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_SERVER_RE = re.compile(r"^https?://[^\s/]+/?$")


@dataclass(frozen=True)
class ServingConfig:
    """Where the model config file goes and how labels move (README "Version labels")."""

    path: Location
    base_config: Path | None = None
    canary_label: str = "canary"
    stable_label: str = "stable"
    load_wait_seconds: float = 60.0
    server_address: str = ""


def _label(v: Any) -> str | None:
    return None if _LABEL_RE.fullmatch(v) else "must be a label name ([A-Za-z][A-Za-z0-9_-]*)"


def _server(v: Any) -> str | None:
    if v == "" or _SERVER_RE.fullmatch(v):
        return None
    return 'must be TF Serving\'s REST address, "http://host:8501", or ""'


SERVING_SCHEMA: Schema = {
    "path": ((str,), REQUIRED, nonempty),
    "base_config": ((str,), "", None),
    "canary_label": ((str,), ServingConfig.canary_label, _label),
    "stable_label": ((str,), ServingConfig.stable_label, _label),
    "load_wait_seconds": ((int, float), ServingConfig.load_wait_seconds, non_negative),
    "server_address": ((str,), ServingConfig.server_address, _server),
}


def parse_serving(
    table: Any,
    problems: list[str],
    locate: Callable[[str], Location],
    resolve: Callable[[str], Path],
    check_location: Callable[[Any], str | None],
) -> ServingConfig | None:
    """The validated ``[serving_config]`` table, or None when absent or invalid."""
    if table is None:
        return None
    where = "serving_config"
    if not isinstance(table, Mapping):
        problems.append(f"{where}: must be a table ([serving_config])")
        return None
    n = len(problems)
    values = apply_schema(table, SERVING_SCHEMA, where, problems)
    if len(problems) > n:
        return None
    location_problem = check_location(values["path"])
    if location_problem:
        problems.append(f"{where}.path: {location_problem} (got {values['path']!r})")
        return None
    if values["canary_label"] == values["stable_label"]:
        problems.append(f"{where}.stable_label: must differ from canary_label")
    if importlib.util.find_spec("tensorflow_serving") is None:
        problems.append(
            f"{where}: writing TF Serving's model config needs the tensorflow-serving-api "
            "protos, which are not installed: pip install tensorflow-serving-api"
        )
    base = resolve(values["base_config"]) if values["base_config"] else None
    if base is not None and not base.is_file():
        problems.append(
            f"{where}.base_config: {base} is not a file; give a ModelServerConfig text proto "
            "listing the models this daemon does not manage"
        )
    if len(problems) > n:
        return None
    return ServingConfig(
        path=locate(values["path"]),
        base_config=base,
        canary_label=values["canary_label"],
        stable_label=values["stable_label"],
        load_wait_seconds=float(values["load_wait_seconds"]),
        server_address=values["server_address"].rstrip("/"),
    )
