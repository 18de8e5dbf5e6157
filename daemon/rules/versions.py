"""TF Serving's version rules: version names, the next version, retention.

TF Serving's filesystem source lists the children of ``--model_base_path`` and
treats a child as a version when ``absl::SimpleAtoi`` parses its *whole* name
as an int64. :func:`parse_version` reproduces exactly that rule so that the
version this daemon picks is the one the server will see, whatever else lies in
the folder (``001``, ``+7``, `` 12``, ``-5`` count; ``1e3``, ``0x10``, ``.tmp``
do not).

Everything here is pure: the base path itself is read and written by
:mod:`daemon.basepath`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

#: absl::ascii_isspace: the six ASCII whitespace characters.
_ASCII_SPACE = " \t\n\v\f\r"


def parse_version(name: str) -> int | None:
    """Return the version TF Serving reads from a child named ``name``, or None.

    Contract: identical to ``absl::SimpleAtoi(name, &int64)`` as used by TF
    Serving's ``FileSystemStoragePathSource``: optional surrounding ASCII
    whitespace, one optional ``+`` or ``-``, then one or more decimal digits
    (ASCII only), and the value must fit in an int64.
    """
    text = name.strip(_ASCII_SPACE)
    if text[:1] in ("+", "-"):
        sign = -1 if text[0] == "-" else 1
        digits = text[1:]
    else:
        sign, digits = 1, text
    # str.isdigit() accepts non-ASCII digits (e.g. Arabic-Indic); absl does not.
    if not digits or not all("0" <= c <= "9" for c in digits):
        return None
    value = sign * int(digits)
    if value < INT64_MIN or value > INT64_MAX:
        return None
    return value


@dataclass(frozen=True, slots=True)
class VersionEntry:
    """One child of a base path that TF Serving would take as a version."""

    name: str
    version: int
    is_dir: bool


def list_versions(names: Iterable[tuple[str, bool]]) -> list[VersionEntry]:
    """Every entry that TF Serving counts as a version, sorted by version.

    ``names`` holds ``(child name, is a directory)``. Files count too: the
    server parses names without looking at what they are, so a file named
    ``7`` still occupies version 7.
    """
    out = []
    for name, is_dir in names:
        v = parse_version(name)
        if v is not None:
            out.append(VersionEntry(name=name, version=v, is_dir=is_dir))
    out.sort(key=lambda e: (e.version, e.name))
    return out


class VersionError(Exception):
    """A version cannot be chosen; the message says why and what to do."""


def next_version(existing: Iterable[int]) -> int:
    """The next integer version: highest existing plus one, and at least 1.

    Raises :class:`VersionError` when the highest version is already int64 max.
    """
    highest = max(existing, default=0)
    if highest >= INT64_MAX:
        raise VersionError(
            f"version {highest} is the largest TF Serving accepts; remove it to continue"
        )
    return max(highest + 1, 1)


def step_version(step: int | None, existing: Iterable[int]) -> int:
    """The version for ``version_policy = "step"``: the step itself.

    Refuses (VersionError) a step that is missing, not positive, or not higher
    than every existing version, because TF Serving ignores a lower number that
    appears later and a number must never be reused.
    """
    if step is None:
        raise VersionError(
            'version_policy = "step" needs a step, but the checkpoint name has no -N suffix '
            "and it saved no step or global_step counter"
        )
    if step < 1 or step > INT64_MAX:
        raise VersionError(f"step {step} is not a usable version number (1..{INT64_MAX})")
    highest = max(existing, default=None)
    if highest is not None and step <= highest:
        raise VersionError(
            f"step {step} is not above the highest version {highest} already in the "
            'base path; refusing to go backwards (use version_policy = "increment" '
            "if the trainer restarts its step count)"
        )
    return step


#: Saved step counters consulted, in order, when a prefix has no ``-N`` suffix.
#: ``save_counter`` is left out: it counts saves, not training steps.
STEP_COUNTERS = ("step", "global_step")


def checkpoint_step(suffix_step: int | None, saved_counters: Mapping[str, int]) -> int | None:
    """The step of a checkpoint: its ``-N`` suffix, else a saved step counter, else None.

    The suffix wins because ``CheckpointManager.save(checkpoint_number=step)``
    names the file after the step the trainer chose; a counter saved inside the
    checkpoint (``step``, ``global_step``) covers prefixes without a number.
    """
    if suffix_step is not None:
        return suffix_step
    for key in STEP_COUNTERS:
        if key in saved_counters:
            return int(saved_counters[key])
    return None


def plan_retention(owned: Iterable[int], keep: int, protected: Iterable[int] = ()) -> list[int]:
    """Versions to delete so that only the newest ``keep`` owned versions remain.

    ``owned`` are the versions this daemon published (never anything else);
    ``keep <= 0`` keeps everything; ``protected`` versions are never returned.
    Returned oldest first.
    """
    if keep <= 0:
        return []
    ordered = sorted(set(owned))
    doomed = ordered[:-keep] if len(ordered) > keep else []
    prot = set(protected)
    return [v for v in doomed if v not in prot]
