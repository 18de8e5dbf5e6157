"""Unit tests for daemon.rules.versions: TF Serving's version-name rule and the base path.

Pure and fast: no TensorFlow, no subprocesses. The parse cases are the ones in
the design notes ("What TensorFlow Serving does with a base path"), i.e. the
behaviour of ``absl::SimpleAtoi`` on an int64.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from daemon.basepath.catalog import Published, published_versions, read_metadata, scan_base_path
from daemon.basepath.layout import METADATA_RELPATH, STATE_DIRNAME, TEMP_PREFIX, is_temp_name
from daemon.rules.versions import (
    INT64_MAX,
    INT64_MIN,
    VersionEntry,
    VersionError,
    checkpoint_step,
    list_versions,
    next_version,
    parse_version,
    plan_retention,
    step_version,
)

# --- parse_version ------------------------------------------------------------

VALID_NAMES = [
    ("7", 7),
    ("0", 0),
    ("0007", 7),
    ("000", 0),
    ("+7", 7),
    ("+0", 0),
    ("-5", -5),
    ("-0", 0),
    ("-0005", -5),
    (" 12", 12),
    ("12 ", 12),
    ("  12  ", 12),
    ("\t7", 7),
    ("7\n", 7),
    ("\t\n 42 \r\n", 42),
    ("\v\f3\f\v", 3),  # all six ASCII spaces count (absl::ascii_isspace)
    (" +7 ", 7),
    (" -5\t", -5),
    ("0" * 40 + "1", 1),  # leading zeros do not count towards the int64 range
    (str(INT64_MAX), INT64_MAX),
    ("+" + str(INT64_MAX), INT64_MAX),
    ("000" + str(INT64_MAX), INT64_MAX),
    (str(INT64_MIN), INT64_MIN),
    ("-000" + str(-INT64_MIN), INT64_MIN),
]

INVALID_NAMES = [
    "1e3",
    "0x10",
    "0X10",
    "12abc",
    "abc12",
    ".tmp-3",
    "temp-1",
    "temp-1700000000",
    "",
    " ",
    "\t\n",
    "+",
    "-",
    " + ",
    "+-1",
    "-+1",
    "++1",
    "--1",
    "+ 7",  # the sign must touch the digits
    "1 2",
    "1\t2",
    "1.0",
    "1.",
    ".5",
    "1_000",
    "1,000",
    "١٢",  # Arabic-Indic digits: str.isdigit() says yes, absl says no
    "٣",
    "\uff11\uff12",  # full-width digits one, two
    "²",  # superscript two: str.isdigit() says yes
    "\u00a012",  # no-break space is not ASCII whitespace
    "12\u2003",  # em space neither
    "\x1c7",  # str.strip() would remove \x1c; absl does not
    str(INT64_MAX + 1),
    "+" + str(INT64_MAX + 1),
    str(INT64_MIN - 1),
    "9" * 30,
    "-" + "9" * 30,
    STATE_DIRNAME,
    TEMP_PREFIX + "0123",
    "saved_model.pb",
]


@pytest.mark.parametrize(("name", "expected"), VALID_NAMES, ids=repr)
def test_parse_version_accepts_what_tf_serving_accepts(name: str, expected: int) -> None:
    assert parse_version(name) == expected


@pytest.mark.parametrize("name", INVALID_NAMES, ids=repr)
def test_parse_version_refuses_what_tf_serving_ignores(name: str) -> None:
    assert parse_version(name) is None


def test_parse_version_returns_a_plain_int() -> None:
    value = parse_version("0042")
    assert type(value) is int
    assert value == 42


# --- is_temp_name ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (TEMP_PREFIX + "3f2a", True),
        (TEMP_PREFIX, True),
        (".tmp-3", False),
        ("temp-1", False),
        (STATE_DIRNAME, False),
        ("7", False),
    ],
)
def test_is_temp_name(name: str, expected: bool) -> None:
    assert is_temp_name(name) is expected


# --- list_versions ------------------------------------------------------------


def test_list_versions_keeps_only_versions_sorted_numerically() -> None:
    children = [
        ("10", True),
        ("9", True),
        (".tmp-3", True),
        ("2", True),
        (STATE_DIRNAME, True),
        ("temp-1", True),
        ("-5", True),
    ]
    assert list_versions(children) == [
        VersionEntry("-5", -5, True),
        VersionEntry("2", 2, True),
        VersionEntry("9", 9, True),
        VersionEntry("10", 10, True),
    ]


def test_list_versions_counts_files_as_versions() -> None:
    # The server parses names without looking at what they are.
    entries = list_versions([("7", False), ("3", True)])
    assert entries == [VersionEntry("3", 3, True), VersionEntry("7", 7, False)]


def test_list_versions_lists_both_spellings_of_a_duplicate() -> None:
    entries = list_versions([("1", True), ("2", True), ("001", True), (" 1", False)])
    assert [(e.name, e.version) for e in entries] == [
        (" 1", 1),
        ("001", 1),
        ("1", 1),
        ("2", 2),
    ]


def test_list_versions_accepts_any_iterable_and_empty() -> None:
    assert list_versions(iter([])) == []
    assert list_versions(iter([("4", True)])) == [VersionEntry("4", 4, True)]


# --- scan_base_path -------------------------------------------------------------


def test_scan_base_path_missing_directory_is_empty(tmp_path: Path) -> None:
    assert scan_base_path(tmp_path / "does-not-exist") == []


def test_scan_base_path_empty_directory(tmp_path: Path) -> None:
    assert scan_base_path(tmp_path) == []


def test_scan_base_path_reads_a_real_directory(tmp_path: Path) -> None:
    for name in ["1", "0002", "10", STATE_DIRNAME, TEMP_PREFIX + "abc", "temp-5", " 11"]:
        (tmp_path / name).mkdir()
    (tmp_path / "3").write_text("a file still occupies version 3")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "4").symlink_to(tmp_path / "1", target_is_directory=True)

    entries = scan_base_path(tmp_path)

    assert [(e.name, e.version, e.is_dir) for e in entries] == [
        ("1", 1, True),
        ("0002", 2, True),
        ("3", 3, False),
        ("4", 4, False),  # a symlink is not followed: not a directory of ours
        ("10", 10, True),
        (" 11", 11, True),
    ]


# --- next_version ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        ([], 1),
        ([-5], 1),
        ([-5, -1], 1),
        ([0], 1),
        ([1], 2),
        ([1, 2, 3], 4),
        ([3, 1, 2], 4),
        ([7, 7], 8),
        ([-3, 41], 42),
        ([INT64_MAX - 1], INT64_MAX),
    ],
)
def test_next_version(existing: list[int], expected: int) -> None:
    assert next_version(existing) == expected
    assert next_version(iter(existing)) == expected  # any iterable, consumed once


@pytest.mark.parametrize("existing", [[INT64_MAX], [1, INT64_MAX, 5]])
def test_next_version_refuses_past_int64_max(existing: list[int]) -> None:
    with pytest.raises(VersionError, match=str(INT64_MAX)):
        next_version(existing)


# --- step_version ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "existing", "expected"),
    [
        (1, [], 1),
        (1200, [], 1200),
        (8, [1, 7], 8),
        (8, [7, 1], 8),
        (1, [-5, 0], 1),
        (INT64_MAX, [5], INT64_MAX),
    ],
)
def test_step_version_ok(step: int, existing: list[int], expected: int) -> None:
    assert step_version(step, existing) == expected


def test_step_version_needs_a_step() -> None:
    with pytest.raises(VersionError, match="needs a step"):
        step_version(None, [])


@pytest.mark.parametrize("step", [0, -1, -1200, INT64_MAX + 1])
def test_step_version_refuses_unusable_numbers(step: int) -> None:
    with pytest.raises(VersionError, match=rf"step {step} is not a usable version number"):
        step_version(step, [])


@pytest.mark.parametrize(
    ("step", "existing", "highest"),
    [
        (5, [1, 5], 5),  # equal to the highest: a number is never reused
        (3, [1, 7], 7),  # below the highest: TF Serving would ignore it
        (3, [7, 1], 7),
        (1, [1], 1),
    ],
)
def test_step_version_refuses_to_go_backwards(step: int, existing: list[int], highest: int) -> None:
    with pytest.raises(VersionError) as info:
        step_version(step, existing)
    message = str(info.value)
    assert f"step {step} " in message
    assert f"highest version {highest} " in message
    assert 'version_policy = "increment"' in message  # says what to do


# --- checkpoint_step ------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "counters", "expected"),
    [
        (1200, {}, 1200),
        (1200, {"step": 5, "global_step": 6}, 1200),  # the -N suffix wins
        (0, {"step": 5}, 0),  # a suffix of 0 is still a suffix
        (None, {"step": 5}, 5),
        (None, {"global_step": 6}, 6),
        (None, {"step": 5, "global_step": 6}, 5),
        (None, {"save_counter": 3}, None),  # counts saves, not steps
        (None, {}, None),
    ],
)
def test_checkpoint_step(
    suffix: int | None, counters: dict[str, int], expected: int | None
) -> None:
    assert checkpoint_step(suffix, counters) == expected


# --- plan_retention -------------------------------------------------------------


@pytest.mark.parametrize(
    ("owned", "keep", "protected", "expected"),
    [
        ([1, 2, 3], 0, [], []),  # 0 keeps everything
        ([1, 2, 3], -1, [], []),
        ([], 2, [], []),
        ([1, 2], 2, [], []),
        ([1, 2], 5, [], []),
        ([1, 2, 3, 4], 2, [], [1, 2]),
        ([4, 1, 3, 2], 2, [], [1, 2]),  # oldest first whatever the input order
        ([1, 2, 3, 4], 1, [], [1, 2, 3]),
        ([1, 1, 2, 2, 3], 1, [], [1, 2]),  # duplicates count once
        ([1, 1, 2], 2, [], []),
        ([1, 2, 3, 4], 2, [1], [2]),  # protected is never returned
        ([1, 2, 3, 4], 2, [4], [1, 2]),
        ([1, 2, 3, 4], 1, [1, 2, 3], []),
        ([1, 2, 3, 4], 2, [99], [1, 2]),
    ],
)
def test_plan_retention(
    owned: list[int], keep: int, protected: list[int], expected: list[int]
) -> None:
    assert plan_retention(owned, keep, protected) == expected


def test_plan_retention_accepts_iterators() -> None:
    assert plan_retention(iter([5, 6, 7]), 1, iter([5])) == [6]
    assert plan_retention(iter([5, 6, 7]), 1) == [5, 6]


# --- read_metadata and published_versions ---------------------------------------


def ours(model: str, fingerprint: str = "fp", written_ns: int = 0, step: int | None = 1) -> dict:
    return {
        "tool": "ckpt-exporter",
        "model": model,
        "checkpoint": {"fingerprint": fingerprint, "written_ns": written_ns, "step": step},
    }


def make_version(base: Path, name: str, metadata: Any = None, raw: bytes | None = None) -> Path:
    """A version folder; ``metadata`` is written as JSON, ``raw`` as is, neither: none."""
    path = base / name
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"")
    if metadata is not None or raw is not None:
        meta = path / METADATA_RELPATH
        meta.parent.mkdir(parents=True)
        meta.write_bytes(raw if raw is not None else json.dumps(metadata).encode())
    return path


def test_read_metadata_returns_the_dict(tmp_path: Path) -> None:
    path = make_version(tmp_path, "1", ours("m", "abc", 5, 10))
    assert read_metadata(path) == ours("m", "abc", 5, 10)


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b'["a", "list"]',
        b'"a string"',
        b"42",
        b"null",
        b"\xff\xfe not utf-8",
    ],
    ids=repr,
)
def test_read_metadata_unreadable_is_none(tmp_path: Path, raw: bytes) -> None:
    path = make_version(tmp_path, "1", raw=raw)
    assert read_metadata(path) is None


def test_read_metadata_absent_is_none(tmp_path: Path) -> None:
    assert read_metadata(make_version(tmp_path, "1")) is None
    assert read_metadata(tmp_path / "missing") is None


def test_read_metadata_directory_in_place_of_the_file_is_none(tmp_path: Path) -> None:
    path = make_version(tmp_path, "1")
    (path / METADATA_RELPATH).mkdir(parents=True)
    assert read_metadata(path) is None


def test_published_versions_returns_only_this_models_own_versions(tmp_path: Path) -> None:
    make_version(tmp_path, "1", ours("m", "fp1", 100, 10))
    make_version(tmp_path, "2")  # foreign: no metadata, never ours
    make_version(tmp_path, "3", ours("other", "fp3"))  # another model's
    (tmp_path / "4").write_text("a file named like a version")
    make_version(tmp_path, "5", raw=b"{broken")
    make_version(tmp_path, "6", {**ours("m", "fp6"), "tool": "someone-else"})
    make_version(tmp_path, "0007", ours("m", "fp7", 700, None))
    make_version(tmp_path, TEMP_PREFIX + "x", ours("m", "fptmp"))  # not a version name
    make_version(tmp_path, "temp-8", ours("m", "fp8"))  # not a version name
    make_version(tmp_path, "9", raw=b'["ckpt-exporter", "m"]')
    make_version(tmp_path, "10", {"model": "m", "checkpoint": {"fingerprint": "x"}})  # no tool
    make_version(tmp_path, "11", {})  # empty metadata proves nothing

    published = published_versions(tmp_path, "m")

    assert [(p.version, p.path) for p in published] == [
        (1, tmp_path / "1"),
        (7, tmp_path / "0007"),
    ]
    assert [(p.fingerprint, p.written_ns, p.step) for p in published] == [
        ("fp1", 100, 10),
        ("fp7", 700, None),
    ]
    assert published[0].metadata == ours("m", "fp1", 100, 10)
    assert [p.version for p in published_versions(tmp_path, "other")] == [3]
    assert published_versions(tmp_path, "nobody") == []


def test_published_versions_ignores_a_symlink_to_an_own_version(tmp_path: Path) -> None:
    make_version(tmp_path, "1", ours("m"))
    (tmp_path / "2").symlink_to(tmp_path / "1", target_is_directory=True)
    assert [p.version for p in published_versions(tmp_path, "m")] == [1]


def test_published_versions_missing_base_path_is_empty(tmp_path: Path) -> None:
    assert published_versions(tmp_path / "nope", "m") == []


@pytest.mark.parametrize(
    ("metadata", "fingerprint", "written_ns", "step"),
    [
        ({}, "", 0, None),
        ({"checkpoint": {}}, "", 0, None),
        ({"checkpoint": {"fingerprint": "f", "written_ns": 12, "step": 3}}, "f", 12, 3),
        ({"checkpoint": {"written_ns": "12", "step": "3"}}, "", 12, 3),
        ({"checkpoint": {"step": 0}}, "", 0, 0),
        # hand-edited files: never a crash
        ({"checkpoint": None}, "", 0, None),
        ({"checkpoint": [1, 2]}, "", 0, None),
        ({"checkpoint": {"written_ns": "soon", "step": True}}, "", 0, None),
    ],
)
def test_published_properties(
    metadata: dict[str, Any], fingerprint: str, written_ns: int, step: int | None
) -> None:
    p = Published(version=1, path=Path(os.sep), metadata=metadata)
    assert (p.fingerprint, p.written_ns, p.step) == (fingerprint, written_ns, step)
