"""A tiny schema for TOML tables: types, defaults and checks, every problem named.

Contract: :func:`apply_schema` never raises for bad input; it appends one line
per problem (``where.key: what is wrong (got ...)``) to ``problems`` and
returns the valid values with defaults filled in. :mod:`daemon.config` uses it
for ``[daemon]`` and ``[[models]]``, and each checkpoint source for its own
``[models.<source>]`` table.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], str | None]  # returns a problem description or None

#: The default of a key that must be given.
REQUIRED: Any = object()

#: key -> (accepted python types, default or REQUIRED, extra check or None)
Schema = dict[str, tuple[tuple[type, ...], Any, Check | None]]


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))}"


def positive(v: Any) -> str | None:
    # TOML has inf and nan; neither is a usable interval or count.
    return None if math.isfinite(v) and v > 0 else "must be a finite number greater than 0"


def non_negative(v: Any) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number, 0 or more"


def nonempty(v: Any) -> str | None:
    return None if v else "must not be empty"


def string_list(v: Any) -> str | None:
    return None if all(isinstance(x, str) for x in v) else "must be a list of strings"


def command_line(*placeholders: str) -> Check:
    """A non-empty argv whose words use only ``{placeholder}``s from ``placeholders``."""

    def check(argv: Any) -> str | None:
        problem = string_list(argv) or nonempty(argv)
        if problem:
            return problem
        for arg in argv:
            problem = template_problem(arg, placeholders)
            if problem:
                return problem
        return None

    return check


def template_problem(text: str, placeholders: tuple[str, ...]) -> str | None:
    """Why ``text`` is not a ``str.format`` template over ``placeholders``, or None.

    Each field must be a bare placeholder name (``{step}``, ``{step:06d}``), not
    an attribute or index of one (``{step.real}``), which would fail at run time.
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        return f"bad braces in {text!r} ({e}); write literal braces as {{{{ and }}}}"
    for name in fields:
        if name not in placeholders:
            return f"unknown placeholder {{{name}}} in {text!r}; known: " + ", ".join(
                f"{{{p}}}" for p in placeholders
            )
    for sample in ("", 0):  # a format spec fits strings (paths) or numbers (steps)
        try:
            text.format_map(dict.fromkeys(placeholders, sample))
            return None
        except (ValueError, TypeError):
            continue
    return f"bad format spec in {text!r}"


def string_table(v: Any) -> str | None:
    if all(isinstance(x, str) and x for x in v.values()):
        return None
    return 'must be a table of name = "string"'


def type_name(types: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(names[t] for t in types if not (t is int and float in types))


def apply_schema(
    table: Mapping[str, Any], schema: Schema, where: str, problems: list[str]
) -> dict[str, Any]:
    """The values of ``table`` that pass ``schema``, defaults filled in.

    Unknown keys, missing required keys, wrong types and failed checks are
    appended to ``problems``; such keys are absent from the result (so a
    caller can tell a complete result by its length).
    """
    out: dict[str, Any] = {}
    for key in table:
        if key not in schema:
            problems.append(
                f"{where}.{key}: unknown key; known keys are {', '.join(sorted(schema))}"
            )
    for key, (types, default, check) in schema.items():
        if key not in table:
            if default is REQUIRED:
                problems.append(f"{where}.{key}: missing (required)")
            else:
                out[key] = default
            continue
        value = table[key]
        # bool is a subclass of int in Python; TOML true is not a number.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            problems.append(
                f"{where}.{key}: must be {type_name(types)}, got {type(value).__name__} {value!r}"
            )
            continue
        problem = check(value) if check else None
        if problem:
            problems.append(f"{where}.{key}: {problem} (got {value!r})")
            continue
        out[key] = value
    return out
