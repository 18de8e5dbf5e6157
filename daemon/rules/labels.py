"""TF Serving's version labels, decided: which versions a model config lists and where labels point.

With ``--model_config_file`` TF Serving serves exactly the versions a
model's ``model_version_policy { specific { ... } }`` names, and routes a
request for a label (``canary``, ``stable``) to the version the label
points at. Its rules, which every config this module produces keeps:

- a label may only point at a version that is *loaded* (a config that
  points one at a version still loading is refused as a whole, unless the
  server runs with ``--allow_version_labels_for_unavailable_models``, and
  that flag only helps a label that did not exist before);
- a version that leaves the ``specific`` list is unloaded.

So a label moves in two writes: first a config that lists the new version
beside the old one (labels unchanged), then, once the new version is loaded,
a config that moves the label; the old version leaves the list once no
label points at it.

The state (:class:`LabelState`) holds what the daemon *wants* (``want``:
label -> version) and what it last *wrote* (``written``, ``listed_at``,
``labelled_at``). :func:`plan` turns them into the next config of a model;
:func:`after_publish`, :func:`promote` and :func:`roll_back` change what is
wanted. "Loaded" is known from the server (``loaded``: the versions a status
check reported available) or, without one, assumed ``load_wait_seconds``
after the config listing the version was written.

Pure: no I/O; ``now`` is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

#: The default label names; the config can rename them.
CANARY = "canary"
STABLE = "stable"

_AFTER_RE = re.compile(r"^after:(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class LabelState:
    """One model's labels: what is wanted and what the config file says now.

    ``want``: label -> version the daemon wants it on. ``written``: label ->
    version in the config last written; ``listed``: the versions that config
    lists; ``listed_at`` / ``labelled_at``: when a version was first listed,
    when a label was first written pointing at it (Unix time, by version).
    ``decided``: versions whose promotion rule already ran (promoted, refused,
    or superseded by a rollback): a rule runs once per version.
    """

    want: Mapping[str, int] = field(default_factory=dict)
    written: Mapping[str, int] = field(default_factory=dict)
    listed: frozenset[int] = frozenset()
    listed_at: Mapping[int, float] = field(default_factory=dict)
    labelled_at: Mapping[int, float] = field(default_factory=dict)
    decided: frozenset[int] = frozenset()


@dataclass(frozen=True)
class ModelEntry:
    """What one model's config entry says: its versions and labels."""

    versions: tuple[int, ...]
    labels: Mapping[str, int]


def parse_promote(text: str) -> str | None:
    """Why ``text`` is not a promotion rule, or None.

    Rules: ``"immediately"``, ``"after:<n><s|m|h|d>"`` (``after:30m``),
    ``"command"`` (the model's ``promote_command`` decides), ``"manual"``
    (only ``ckpt-exporter promote``).
    """
    if text in ("immediately", "command", "manual") or _AFTER_RE.match(text):
        return None
    return 'must be "immediately", "after:<duration>" (e.g. "after:30m"), "command" or "manual"'


def promote_after_seconds(rule: str) -> float | None:
    """The delay of an ``after:`` rule in seconds; 0 for ``immediately``; None otherwise."""
    if rule == "immediately":
        return 0.0
    m = _AFTER_RE.match(rule)
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)] if m else None


def is_loaded(
    state: LabelState,
    version: int,
    now: float,
    load_wait_seconds: float,
    loaded: Collection[int] | None,
) -> bool:
    """Whether the server may be taken to have ``version`` loaded.

    ``loaded`` (a status check's answer) decides when given; else a version
    counts as loaded ``load_wait_seconds`` after it was first listed.
    """
    if version not in state.listed:
        return False
    if loaded is not None:
        return version in loaded
    since = state.listed_at.get(version)
    return since is not None and now - since >= load_wait_seconds


def plan(
    state: LabelState,
    now: float,
    load_wait_seconds: float,
    loaded: Collection[int] | None = None,
    present: Collection[int] | None = None,
) -> tuple[ModelEntry | None, LabelState]:
    """The model's next config entry and the state once it is written.

    Rules, in order:

    1. every wanted version is listed (it starts loading);
    2. a label moves to its wanted version once that version is loaded
       (:func:`is_loaded`); until then it stays where it was written;
    3. a version stays listed while a label points at it;
    4. nothing else is listed. A version not in ``present`` (the versions
       in the base path, when given) is neither listed nor labelled: the
       server could not load it.

    None when there is nothing to list (no version yet).
    """

    def usable(v: int) -> bool:
        return present is None or v in present

    wanted = {v for v in state.want.values() if usable(v)}
    listed_now = set(state.listed) | wanted
    probe = replace(state, listed=frozenset(listed_now))
    labels: dict[str, int] = {}
    for label, version in sorted(state.want.items()):
        if usable(version) and (
            version in state.listed and is_loaded(probe, version, now, load_wait_seconds, loaded)
        ):
            labels[label] = version
        elif label in state.written and usable(state.written[label]):
            labels[label] = state.written[label]
    for label, version in state.written.items():
        if label not in state.want and usable(version):
            labels[label] = version
    versions = wanted | set(labels.values())
    listed_at = {v: t for v, t in state.listed_at.items() if v in versions}
    for v in versions:
        listed_at.setdefault(v, now)
    labelled_at = dict(state.labelled_at)
    for label, version in labels.items():
        if state.written.get(label) != version:
            labelled_at[version] = now
    new = replace(
        state,
        written=labels,
        listed=frozenset(versions),
        listed_at=listed_at,
        labelled_at={v: t for v, t in labelled_at.items() if v in versions},
    )
    if not versions:
        return None, new
    return ModelEntry(versions=tuple(sorted(versions)), labels=labels), new


def after_publish(state: LabelState, version: int, canary: str, stable: str) -> LabelState:
    """A new version was published: it becomes the canary (and stable, if there is none)."""
    want = dict(state.want, **{canary: version})
    if stable not in want:
        want[stable] = version
    return replace(state, want=want)


def newest_unseen(state: LabelState, published: Collection[int]) -> int | None:
    """The newest published version the labels have never considered, or None.

    A version published by another publisher (``ckpt-exporter export``, a
    second daemon), or before ``[serving_config]`` was set, becomes the
    canary like the daemon's own; one a rollback left behind does not (it is
    ``decided``).
    """
    newest = max(published, default=None)
    if newest is None:
        return None
    known = [*state.want.values(), *state.listed, *state.decided]
    return newest if newest > max(known, default=0) else None


def due_promotion(state: LabelState, rule: str, now: float, canary: str, stable: str) -> int | None:
    """The canary version a time rule promotes now, or None.

    Only once the canary label *points* at it (it is loaded and serving),
    only once per version (``decided``), only for a version above stable.
    ``command`` and ``manual`` rules never promote here.
    """
    version = state.written.get(canary)
    if version is None or version in state.decided:
        return None
    if version <= state.want.get(stable, -1):
        return None
    delay = promote_after_seconds(rule)
    if delay is None:
        return None
    since = state.labelled_at.get(version)
    if since is None or now - since < delay:
        return None
    return version


def promote(state: LabelState, version: int, stable: str) -> LabelState:
    """Want ``stable`` on ``version``; its rule has run."""
    return replace(
        state,
        want=dict(state.want, **{stable: version}),
        decided=state.decided | {version},
    )


def decide(state: LabelState, version: int) -> LabelState:
    """Record that ``version``'s promotion rule ran without promoting it."""
    return replace(state, decided=state.decided | {version})


def roll_back(state: LabelState, version: int, canary: str, stable: str) -> LabelState:
    """Serve ``version``: both labels go back to it; newer versions are never promoted by a rule.

    Nothing is deleted: the newer versions stay in the base path (and leave
    the config once no label points at them).
    """
    newer = {v for v in state.want.values() if v > version} | {
        v for v in state.written.values() if v > version
    }
    return replace(
        state,
        want=dict(state.want, **{canary: version, stable: version}),
        decided=state.decided | newer,
    )


def to_json(state: LabelState) -> dict[str, object]:
    """The state as a JSON object (the ``labels.json`` record)."""
    return {
        "want": dict(state.want),
        "written": dict(state.written),
        "listed": sorted(state.listed),
        "listed_at": {str(v): t for v, t in state.listed_at.items()},
        "labelled_at": {str(v): t for v, t in state.labelled_at.items()},
        "decided": sorted(state.decided),
    }


def from_json(data: object) -> LabelState:
    """The state of a ``labels.json`` record; ``ValueError`` when it is not one."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    try:
        return LabelState(
            want=_labels(data.get("want", {})),
            written=_labels(data.get("written", {})),
            listed=frozenset(int(v) for v in data.get("listed", [])),
            listed_at={int(k): float(v) for k, v in dict(data.get("listed_at", {})).items()},
            labelled_at={int(k): float(v) for k, v in dict(data.get("labelled_at", {})).items()},
            decided=frozenset(int(v) for v in data.get("decided", [])),
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"not a label record: {e}") from e


def _labels(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError("labels must be a JSON object")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"label {k!r} -> {v!r} is not name -> version")
        out[k] = v
    return out
