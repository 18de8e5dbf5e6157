"""Unit tests for daemon.rules.gate: parsing a [models.gate] table, the threshold, the decision.

Pure and fast: no TensorFlow, no subprocesses. Metric files are real files in tmp_path; event
files are built by hand with the encoder of tests/test_tensorboard.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from test_tensorboard import event, simple, write_events

from daemon.config.loading import ConfigError, parse_config
from daemon.rules.gate import (
    GATE_SCHEMA,
    LAST_PUBLISHED,
    Gate,
    command_argv,
    decide,
    parse_gate,
    threshold,
)
from daemon.supervisor.metric_reader import MetricReader, read_json_metric

WHERE = "models[0] (m).gate"
CKPT_DIR = Path("/train/m/ckpts")
INF = math.inf
NAN = math.nan


def gate_values(**overrides: Any) -> dict[str, Any]:
    """Schema-checked values of a gate table: the defaults, with ``overrides``."""
    values = {key: default for key, (_, default, _) in GATE_SCHEMA.items()}
    values.update(overrides)
    return values


def parse(
    given: Mapping[str, Any], ckpt_dir: Path = CKPT_DIR, *, keys: set[str] | None = None
) -> tuple[Gate, list[str]]:
    """parse_gate of a table spelling out ``given`` (``keys`` overrides the keys spelled out)."""
    return parse_gate(gate_values(**given), set(given) if keys is None else keys, WHERE, ckpt_dir)


# --- parse_gate ---------------------------------------------------------------------------


def test_no_table_is_a_disabled_gate() -> None:
    gate, problems = parse({})
    assert problems == []
    assert gate == Gate()
    assert not gate.enabled


def test_the_schema_defaults_are_the_gate_defaults() -> None:
    gate, _ = parse({})
    assert (gate.mode, gate.better_than, gate.wait_seconds) == ("min", LAST_PUBLISHED, 600.0)
    assert (gate.metric, gate.json_file, gate.tensorboard_dir, gate.tag) == ("", "", "", "")
    assert gate.command == ()


@pytest.mark.parametrize("source", ["json_file", "tensorboard_dir"])
def test_a_metric_with_one_source(source: str) -> None:
    gate, problems = parse({"metric": "val_loss", source: "metrics"})
    assert problems == []
    assert gate.enabled
    assert gate.metric == "val_loss"
    assert getattr(gate, source) == str(CKPT_DIR / "metrics")
    other = "tensorboard_dir" if source == "json_file" else "json_file"
    assert getattr(gate, other) == ""


@pytest.mark.parametrize(
    ("sources", "got"),
    [
        ({}, "neither"),
        ({"json_file": "m.json", "tensorboard_dir": "logs"}, "json_file, tensorboard_dir"),
        ({"tag": "epoch_loss"}, "neither"),  # a tag is not a source
    ],
)
def test_a_metric_needs_exactly_one_source(sources: dict[str, str], got: str) -> None:
    _, problems = parse({"metric": "val_loss", **sources})
    assert problems == [
        f"{WHERE}.metric: give exactly one of json_file or tensorboard_dir to read "
        f"'val_loss' from (got {got})"
    ]


@pytest.mark.parametrize(
    "keys",
    [
        ["json_file"],
        ["tensorboard_dir"],
        ["tag"],
        ["json_file", "tag"],
        ["json_file", "tensorboard_dir", "tag"],
    ],
)
@pytest.mark.parametrize("with_command", [False, True])
def test_sources_and_tag_need_a_metric(keys: list[str], with_command: bool) -> None:
    given: dict[str, Any] = dict.fromkeys(keys, "x")
    if with_command:
        given["command"] = ["check", "{export_dir}"]
    _, problems = parse(given)
    expected = [
        f'{WHERE}.{k}: only used with metric; add metric = "..." or remove it' for k in keys
    ]
    if not with_command:
        expected.append(f"{WHERE}: a gate needs metric or command (or remove the table)")
    assert problems == expected


@pytest.mark.parametrize(
    "given",
    [
        {"mode": "max"},
        {"better_than": 0.5},
        {"wait_seconds": 10},
        {"command": []},  # an empty command is no command
        {"metric": "", "command": []},
    ],
)
def test_a_table_with_neither_metric_nor_command(given: dict[str, Any]) -> None:
    gate, problems = parse(given)
    assert problems == [f"{WHERE}: a gate needs metric or command (or remove the table)"]
    assert not gate.enabled


def test_a_command_gate_alone() -> None:
    gate, problems = parse({"command": ["check", "{export_dir}", "--step={step}"]})
    assert problems == []
    assert gate.enabled
    assert gate.command == ("check", "{export_dir}", "--step={step}")
    assert gate.metric == ""


def test_a_metric_and_a_command_together() -> None:
    gate, problems = parse(
        {"metric": "acc", "json_file": "m.json", "mode": "max", "command": ["ok"]}
    )
    assert problems == []
    assert (gate.metric, gate.mode, gate.command) == ("acc", "max", ("ok",))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("metrics.json", CKPT_DIR / "metrics.json"),
        ("eval/metrics-{step}.json", CKPT_DIR / "eval" / "metrics-{step}.json"),
        ("../logs/validation", CKPT_DIR / ".." / "logs" / "validation"),
        ("./m.jsonl", CKPT_DIR / "m.jsonl"),
        ("/abs/metrics.json", Path("/abs/metrics.json")),
        ("/abs/{name}.json", Path("/abs/{name}.json")),
    ],
)
@pytest.mark.parametrize("key", ["json_file", "tensorboard_dir"])
def test_paths_resolve_against_the_checkpoint_dir(key: str, given: str, expected: Path) -> None:
    gate, problems = parse({"metric": "m", key: given})
    assert problems == []
    assert getattr(gate, key) == str(expected)


@pytest.mark.parametrize("key", ["json_file", "tensorboard_dir"])
def test_home_is_expanded(key: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    gate, _ = parse({"metric": "m", key: "~/metrics"})
    assert getattr(gate, key) == str(tmp_path / "metrics")


@pytest.mark.parametrize(
    ("given", "expected"),
    [(3, 3.0), (0, 0.0), (-2, -2.0), (0.25, 0.25), (1e-9, 1e-9), (LAST_PUBLISHED, LAST_PUBLISHED)],
)
def test_better_than(given: float | str, expected: float | str) -> None:
    gate, problems = parse({"metric": "m", "json_file": "m.json", "better_than": given})
    assert problems == []
    assert gate.better_than == expected
    assert type(gate.better_than) is type(expected)  # numbers become floats


@pytest.mark.parametrize("given", [0, 10, 2.5])
def test_wait_seconds_becomes_a_float(given: float) -> None:
    gate, _ = parse({"metric": "m", "json_file": "m.json", "wait_seconds": given})
    assert gate.wait_seconds == float(given)
    assert type(gate.wait_seconds) is float


def test_the_gate_is_immutable() -> None:
    gate, _ = parse({"command": ["ok"]})
    with pytest.raises(AttributeError):
        gate.metric = "other"  # type: ignore[misc]


# --- threshold ----------------------------------------------------------------------------


def last_published_gate(metric: str = "val_loss") -> Gate:
    return Gate(metric=metric, json_file="/m.json", better_than=LAST_PUBLISHED)


def meta(value: Any, metric: str = "val_loss") -> dict[str, Any]:
    """A published version's metadata with the metric gate's record."""
    return {"version": 1, "gate": {"metric": metric, "value": value, "mode": "min"}}


@pytest.mark.parametrize(
    "published",
    [[], [meta(0.1)], [meta(100.0), {"gate": None}], [{"gate": {"metric": "other", "value": 1}}]],
)
@pytest.mark.parametrize("number", [0.5, -1.0, 0.0])
def test_a_number_is_the_threshold_whatever_was_published(
    number: float, published: list[dict[str, Any]]
) -> None:
    gate = Gate(metric="val_loss", json_file="/m.json", better_than=number)
    assert threshold(gate, published) == number


@pytest.mark.parametrize(
    ("published", "expected"),
    [
        ([], None),
        ([meta(0.3)], 0.3),
        ([meta(0.5), meta(0.3)], 0.3),  # the newest (last) counts
        ([meta(0.3), meta(0.5)], 0.5),  # even when it is worse than an older one
        ([meta(2)], 2.0),
        ([meta(0.3), meta(-0.0)], 0.0),
        ([meta(0.3), meta(INF)], INF),
    ],
)
def test_last_published_is_the_newest_versions_value(
    published: list[dict[str, Any]], expected: float | None
) -> None:
    got = threshold(last_published_gate(), published)
    assert got == expected
    if expected is not None:
        assert type(got) is float


@pytest.mark.parametrize(
    "newest",
    [
        {},  # made before gates existed
        {"gate": None},  # made by `ckpt-exporter export`, without the metric gate
        {"gate": "val_loss"},  # not a record
        {"gate": []},
        meta(0.1, metric="val_acc"),  # made with another metric
        meta(0.1, metric="Val_Loss"),
        {"gate": {"value": 0.1}},  # no metric named
    ],
)
def test_a_newest_version_made_without_this_gate_has_nothing_to_beat(
    newest: dict[str, Any],
) -> None:
    # The older version's value must not be used: the bar is reset, as the README says.
    assert threshold(last_published_gate(), [meta(0.01), newest]) is None


@pytest.mark.parametrize("value", ["0.3", None, True, False, [0.3], {"v": 0.3}])
def test_a_recorded_value_that_is_not_a_number_has_nothing_to_beat(value: Any) -> None:
    assert threshold(last_published_gate(), [meta(0.01), meta(value)]) is None


def test_threshold_does_not_modify_its_input() -> None:
    published = [meta(0.5), meta(0.3)]
    before = json.dumps(published)
    threshold(last_published_gate(), published)
    assert json.dumps(published) == before


# --- decide -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "mode", "best", "passes"),
    [
        # strictly better passes; equal or worse does not
        (0.1, "min", 0.2, True),
        (0.2, "min", 0.2, False),
        (0.3, "min", 0.2, False),
        (0.3, "max", 0.2, True),
        (0.2, "max", 0.2, False),
        (0.1, "max", 0.2, False),
        (-0.0, "min", 0.0, False),  # -0.0 == 0.0
        (0.0, "max", -0.0, False),
        (-5, "min", -4, True),
        (-4, "max", -5, True),
        (0.2 - 1e-12, "min", 0.2, True),
        # nothing to beat: anything but NaN passes
        (0.5, "min", None, True),
        (0.5, "max", None, True),
        # infinities never pass: a diverged evaluation must not ship
        (-INF, "min", None, False),
        (INF, "max", None, False),
        # NaN never passes
        (NAN, "min", None, False),
        (NAN, "max", None, False),
        (NAN, "min", 1.0, False),
        (NAN, "max", -INF, False),
        (NAN, "min", INF, False),
        # an infinite bar is beaten by any finite value; an infinite value beats nothing
        (-INF, "min", 0.0, False),
        (0.0, "min", INF, True),
        (INF, "min", INF, False),
        (INF, "min", 1e308, False),
        (INF, "max", 1e308, False),
        (INF, "max", INF, False),
        (-INF, "max", -INF, False),
        (-1e308, "max", -INF, True),
    ],
)
def test_decide(value: float, mode: str, best: float | None, passes: bool) -> None:
    assert decide(value, mode, best) is passes


# --- read_json_metric ---------------------------------------------------------------------


def write(path: Path, content: Any) -> Path:
    """Write ``content``: bytes and str as they are, anything else as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def jsonl(*records: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


STEPS_1_TO_3 = [{"step": s, "val_loss": s / 10, "loss": s} for s in (1, 2, 3)]


def test_a_json_lines_file_being_written_keeps_its_complete_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", jsonl({"step": 1, "m": 0.5}) + '{"step": 2, "m"')
    assert read_json_metric(path, "m", 1, per_checkpoint=False) == 0.5
    assert read_json_metric(path, "m", 2, per_checkpoint=False) is None


@pytest.mark.parametrize(
    "content",
    [STEPS_1_TO_3, jsonl(*STEPS_1_TO_3), jsonl(*STEPS_1_TO_3).replace("\n", "\r\n")],
    ids=["list", "json-lines", "json-lines-crlf"],
)
@pytest.mark.parametrize(("step", "expected"), [(1, 0.1), (2, 0.2), (3, 0.3), (4, None)])
def test_a_list_or_json_lines(
    tmp_path: Path, content: Any, step: int, expected: float | None
) -> None:
    path = write(tmp_path / "m.json", content)
    assert read_json_metric(path, "val_loss", step, per_checkpoint=False) == expected


@pytest.mark.parametrize(("step", "expected"), [(5, 0.25), (4, None), (6, None), (None, None)])
def test_a_single_object(tmp_path: Path, step: int | None, expected: float | None) -> None:
    path = write(tmp_path / "m.json", {"step": 5, "val_loss": 0.25})
    assert read_json_metric(path, "val_loss", step, per_checkpoint=False) == expected


def test_a_pretty_printed_single_object(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", json.dumps({"step": 5, "val_loss": 0.25}, indent=2))
    assert read_json_metric(path, "val_loss", 5, per_checkpoint=False) == 0.25


@pytest.mark.parametrize("as_lines", [False, True])
def test_the_last_matching_record_wins(tmp_path: Path, as_lines: bool) -> None:
    records = [
        {"step": 2, "val_loss": 0.9},
        {"step": 3, "val_loss": 0.5},
        {"step": 2, "val_loss": 0.4},  # a trainer restarted from an older checkpoint
        {"step": 2, "loss": 7.0},  # another metric at the same step does not count
        {"step": 4, "val_loss": 0.1},
    ]
    path = write(tmp_path / "m.json", jsonl(*records) if as_lines else records)
    assert read_json_metric(path, "val_loss", 2, per_checkpoint=False) == 0.4
    assert read_json_metric(path, "loss", 2, per_checkpoint=False) == 7.0
    assert read_json_metric(path, "loss", 3, per_checkpoint=False) is None


def test_records_that_are_not_objects_are_skipped(tmp_path: Path) -> None:
    records = [5, "text", None, [1, 2], {"step": 1, "m": 1.5}, {"m": 9.0}]
    path = write(tmp_path / "m.json", records)
    assert read_json_metric(path, "m", 1, per_checkpoint=False) == 1.5


@pytest.mark.parametrize("content", ["5", '"step"', "null", "[]", "{}"])
def test_a_file_with_no_records_for_the_metric(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "m.json", content)
    assert read_json_metric(path, "m", 1, per_checkpoint=False) is None


@pytest.mark.parametrize(("value", "expected"), [(3, 3.0), (-2, -2.0), (0, 0.0), (1e-300, 1e-300)])
def test_numbers_come_back_as_floats(tmp_path: Path, value: float, expected: float) -> None:
    path = write(tmp_path / "m.json", {"step": 1, "m": value})
    got = read_json_metric(path, "m", 1, per_checkpoint=False)
    assert got == expected
    assert type(got) is float


@pytest.mark.parametrize(("text", "check"), [("NaN", math.isnan), ("Infinity", math.isinf)])
def test_nan_and_infinity_are_read(tmp_path: Path, text: str, check: Any) -> None:
    # Python's json writes them; decide() then refuses NaN.
    path = write(tmp_path / "m.json", '{"step": 1, "m": ' + text + "}")
    got = read_json_metric(path, "m", 1, per_checkpoint=False)
    assert got is not None and check(got)


def test_a_per_checkpoint_record_may_leave_out_the_step(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", {"val_loss": 0.5})
    assert read_json_metric(path, "val_loss", 7, per_checkpoint=True) == 0.5
    assert read_json_metric(path, "val_loss", None, per_checkpoint=True) == 0.5
    # A shared file must say which step a record is for.
    assert read_json_metric(path, "val_loss", 7, per_checkpoint=False) is None


def test_a_per_checkpoint_record_with_another_step_does_not_count(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", {"step": 6, "val_loss": 0.5})
    assert read_json_metric(path, "val_loss", 7, per_checkpoint=True) is None
    write(path, [{"step": 7, "val_loss": 0.5}, {"val_loss": 0.2}, {"step": 6, "val_loss": 0.1}])
    assert read_json_metric(path, "val_loss", 7, per_checkpoint=True) == 0.2


def test_a_missing_file_is_not_there_yet(tmp_path: Path) -> None:
    assert read_json_metric(tmp_path / "nope.json", "m", 1, per_checkpoint=False) is None
    assert read_json_metric(tmp_path / "no" / "dir.json", "m", 1, per_checkpoint=True) is None


def test_a_folder_in_place_of_the_file_is_an_os_error(tmp_path: Path) -> None:
    # The supervisor reports OSError and ValueError as gate_metric_unreadable.
    (tmp_path / "m.json").mkdir()
    with pytest.raises(OSError):
        read_json_metric(tmp_path / "m.json", "m", 1, per_checkpoint=False)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "   \n",
        "{",
        '{"step": 1, "m": 0.',  # a single object being written
        '[{"step": 1, "m": 0.5}, {"step": 2',  # a list being written
        "step,m\n1,0.5\n",  # CSV
        "not json at all",
        b"\xff\xfe{\x00",  # not UTF-8
        b'{"step": 1, "m": 0.5}\x00\x00\x00',  # a zero-filled tail
    ],
)
def test_a_file_that_does_not_parse_is_not_there_yet(tmp_path: Path, content: str | bytes) -> None:
    path = write(tmp_path / "m.json", content)
    assert read_json_metric(path, "m", 1, per_checkpoint=False) is None
    assert read_json_metric(path, "m", 1, per_checkpoint=True) is None


@pytest.mark.parametrize("value", ["0.5", "", [0.5], {"v": 0.5}, True, False], ids=repr)
@pytest.mark.parametrize("per_checkpoint", [False, True])
def test_a_value_that_is_not_a_number_names_the_file(
    tmp_path: Path, value: Any, per_checkpoint: bool
) -> None:
    path = write(
        tmp_path / "metrics.json", [{"step": 1, "val_loss": 0.1}, {"step": 1, "val_loss": value}]
    )
    with pytest.raises(ValueError) as info:
        read_json_metric(path, "val_loss", 1, per_checkpoint=per_checkpoint)
    message = str(info.value)
    assert str(path) in message
    assert "'val_loss'" in message
    assert "not a number" in message
    assert repr(value) in message


def test_a_bad_value_at_another_step_does_not_matter(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", [{"step": 1, "m": "oops"}, {"step": 2, "m": 0.5}])
    assert read_json_metric(path, "m", 2, per_checkpoint=False) == 0.5


# --- MetricReader -------------------------------------------------------------------------


def json_gate(json_file: Path | str, metric: str = "val_loss") -> Gate:
    return Gate(metric=metric, json_file=str(json_file))


@pytest.mark.parametrize(
    ("template", "name", "step", "filename"),
    [
        ("eval-{name}.json", "ckpt-5", 5, "eval-ckpt-5.json"),
        ("eval-{step}.json", "ckpt-5", 5, "eval-5.json"),
        ("{name}/{step}.json", "model.ckpt-120", 120, "model.ckpt-120/120.json"),
        ("eval-{step}-{name}.jsonl", "ckpt-0", 0, "eval-0-ckpt-0.jsonl"),
        ("eval-{name}.json", "weights.h5", None, "eval-weights.h5.json"),
        ("eval-{step}.json", "final", None, "eval-.json"),
    ],
)
def test_a_file_per_checkpoint(
    tmp_path: Path, template: str, name: str, step: int | None, filename: str
) -> None:
    gate = json_gate(tmp_path / template)
    reader = MetricReader()
    assert reader.read(gate, name, step) is None  # not written yet
    write(tmp_path / filename, {"val_loss": 0.125})  # no "step" needed in a per-checkpoint file
    assert reader.read(gate, name, step) == 0.125
    # Other checkpoints have their own files.
    assert reader.read(gate, "other-ckpt", 999) is None


def test_a_file_per_checkpoint_with_a_step_that_does_not_match(tmp_path: Path) -> None:
    gate = json_gate(tmp_path / "eval-{name}.json")
    write(tmp_path / "eval-ckpt-5.json", {"step": 4, "val_loss": 0.5})
    assert MetricReader().read(gate, "ckpt-5", 5) is None


def test_a_shared_file_needs_the_step(tmp_path: Path) -> None:
    path = write(tmp_path / "metrics.jsonl", jsonl({"val_loss": 0.9}, {"step": 5, "val_loss": 0.5}))
    gate = json_gate(path)
    reader = MetricReader()
    assert reader.read(gate, "ckpt-5", 5) == 0.5
    assert reader.read(gate, "ckpt-6", 6) is None
    with path.open("a") as f:
        f.write(json.dumps({"step": 6, "val_loss": 0.4}) + "\n")
    assert reader.read(gate, "ckpt-6", 6) == 0.4


def test_literal_braces_in_the_file_name(tmp_path: Path) -> None:
    gate = json_gate(str(tmp_path / "m{{x}}-{step}.json"))
    write(tmp_path / "m{x}-3.json", {"step": 3, "val_loss": 0.5})
    assert MetricReader().read(gate, "ckpt-3", 3) == 0.5


def test_a_bad_value_in_a_per_checkpoint_file_raises(tmp_path: Path) -> None:
    gate = json_gate(tmp_path / "eval-{step}.json")
    path = write(tmp_path / "eval-3.json", {"val_loss": "high"})
    with pytest.raises(ValueError, match=str(path)):
        MetricReader().read(gate, "ckpt-3", 3)


def tb_gate(logdir: Path, metric: str = "val_loss", tag: str = "") -> Gate:
    return Gate(metric=metric, tensorboard_dir=str(logdir), tag=tag)


def test_tensorboard_values_by_step(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    write_events(
        logs / "events.out.tfevents.1.h",
        event(1, simple("val_loss", 0.5), simple("loss", 2.0)),
        event(2, simple("val_loss", 0.25)),
    )
    reader = MetricReader()
    gate = tb_gate(logs)
    assert reader.read(gate, "ckpt-1", 1) == 0.5
    assert reader.read(gate, "ckpt-2", 2) == 0.25
    assert reader.read(gate, "ckpt-3", 3) is None
    assert reader.read(tb_gate(logs, metric="loss"), "ckpt-1", 1) == 2.0
    # The same reader sees records appended later (the evaluation lands after the checkpoint).
    write_events(logs / "events.out.tfevents.1.h", event(3, simple("val_loss", 0.125)))
    assert reader.read(gate, "ckpt-3", 3) == 0.125


def test_tensorboard_tag_overrides_the_metric_name(tmp_path: Path) -> None:
    write_events(
        tmp_path / "events.out.tfevents.1.h",
        event(4, simple("epoch_loss", 0.75), simple("val_loss", 9.0)),
    )
    gate = tb_gate(tmp_path, metric="val_loss", tag="epoch_loss")
    assert MetricReader().read(gate, "ckpt-4", 4) == 0.75
    assert MetricReader().read(tb_gate(tmp_path, metric="val_loss"), "ckpt-4", 4) == 9.0
    assert MetricReader().read(tb_gate(tmp_path, metric="other"), "ckpt-4", 4) is None


def test_tensorboard_needs_a_step(tmp_path: Path) -> None:
    # proto3 leaves step 0 out: such an event is step 0, not "no step".
    write_events(tmp_path / "events.out.tfevents.1.h", event(None, simple("val_loss", 0.5)))
    reader = MetricReader()
    assert reader.read(tb_gate(tmp_path), "ckpt", None) is None
    assert reader.read(tb_gate(tmp_path), "ckpt-0", 0) == 0.5
    # Without a step the event files are not even read: a file in place of the folder is fine.
    not_a_dir = tmp_path / "events.out.tfevents.1.h"
    assert reader.read(tb_gate(not_a_dir), "ckpt", None) is None
    with pytest.raises(OSError):
        reader.read(tb_gate(not_a_dir), "ckpt-0", 0)


def test_a_missing_tensorboard_dir_is_not_there_yet(tmp_path: Path) -> None:
    assert MetricReader().read(tb_gate(tmp_path / "logs"), "ckpt-1", 1) is None


def test_json_file_wins_over_nothing_else(tmp_path: Path) -> None:
    # parse_gate refuses both sources; a Gate built with both reads the JSON file.
    write_events(tmp_path / "logs" / "events.out.tfevents.1.h", event(1, simple("m", 9.0)))
    path = write(tmp_path / "m.json", {"step": 1, "m": 1.0})
    gate = Gate(metric="m", json_file=str(path), tensorboard_dir=str(tmp_path / "logs"))
    assert MetricReader().read(gate, "ckpt-1", 1) == 1.0


# --- command_argv -------------------------------------------------------------------------


@pytest.mark.parametrize(("step", "step_text"), [(1200, "1200"), (0, "0"), (None, ""), (-1, "-1")])
def test_command_argv_fills_every_placeholder(step: int | None, step_text: str) -> None:
    gate = Gate(
        command=(
            "/usr/bin/check",
            "--dir={export_dir}",
            "{checkpoint}",
            "{model}",
            "step={step}",
            "{model}/{model}",
            "{{literal}}",
            "plain",
        )
    )
    argv = command_argv(gate, Path("/srv/m/.tmp-7"), Path("/train/ckpt-1200"), "m", step)
    assert argv == [
        "/usr/bin/check",
        "--dir=/srv/m/.tmp-7",
        "/train/ckpt-1200",
        "m",
        f"step={step_text}",
        "m/m",
        "{literal}",
        "plain",
    ]
    assert gate.command[1] == "--dir={export_dir}"  # the gate is not modified


def test_command_argv_keeps_braces_in_the_values() -> None:
    gate = Gate(command=("check", "{export_dir}", "{model}"))
    argv = command_argv(gate, Path("/srv/{x}"), Path("/c"), "m{0}", 1)
    assert argv == ["check", "/srv/{x}", "m{0}"]


def test_command_argv_of_no_command() -> None:
    assert command_argv(Gate(), Path("/e"), Path("/c"), "m", 1) == []


# --- through parse_config -----------------------------------------------------------------


def model_with_gate(gate: Any, **overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "name": "m",
        "checkpoint_dir": "/train/m/ckpts",
        "base_path": "/serve/m",
        "builder": "trainer.model:build",
        "gate": gate,
    }
    table.update(overrides)
    return table


def config_problems(gate: Any, **overrides: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"models": [model_with_gate(gate, **overrides)]}, "t.toml", Path("/etc"))
    return info.value.problems


METRIC = {"metric": "val_loss", "json_file": "metrics.json"}

CONFIG_ERRORS = [
    ({**METRIC, "colour": "red"}, "colour", "unknown key; known keys are better_than, command"),
    ({**METRIC, "metrics": "x"}, "metrics", "unknown key"),
    ({**METRIC, "mode": "lowest"}, "mode", "must be one of 'min', 'max' (got 'lowest')"),
    ({**METRIC, "mode": "MIN"}, "mode", "must be one of 'min', 'max'"),
    ({**METRIC, "mode": 1}, "mode", "must be a string, got int 1"),
    ({**METRIC, "better_than": "best"}, "better_than", 'must be a number or "last_published"'),
    ({**METRIC, "better_than": "last"}, "better_than", 'must be a number or "last_published"'),
    ({**METRIC, "better_than": ""}, "better_than", 'must be a number or "last_published"'),
    ({**METRIC, "better_than": NAN}, "better_than", "must be a finite number (got nan)"),
    ({**METRIC, "better_than": INF}, "better_than", "must be a finite number (got inf)"),
    ({**METRIC, "better_than": -INF}, "better_than", "must be a finite number (got -inf)"),
    ({**METRIC, "better_than": True}, "better_than", "must be a string or a number, got bool"),
    ({**METRIC, "better_than": [1]}, "better_than", "must be a string or a number, got list"),
    ({**METRIC, "wait_seconds": -1}, "wait_seconds", "must be a finite number, 0 or more"),
    ({**METRIC, "wait_seconds": -0.5}, "wait_seconds", "0 or more (got -0.5)"),
    ({**METRIC, "wait_seconds": INF}, "wait_seconds", "must be a finite number"),
    ({**METRIC, "wait_seconds": NAN}, "wait_seconds", "must be a finite number"),
    ({**METRIC, "wait_seconds": "10"}, "wait_seconds", "must be a number, got str"),
    ({**METRIC, "metric": 5}, "metric", "must be a string, got int 5"),
    ({**METRIC, "tag": ["a"]}, "tag", "must be a string, got list"),
    ({**METRIC, "tensorboard_dir": 1}, "tensorboard_dir", "must be a string"),
    (
        {**METRIC, "command": ["check", "{foo}"]},
        "command",
        "unknown placeholder {foo} in '{foo}'; known: {export_dir}, {checkpoint}, {model}, {step}",
    ),
    ({**METRIC, "command": ["check", "{name}"]}, "command", "unknown placeholder {name}"),
    ({**METRIC, "command": ["check", "{"]}, "command", "bad braces in '{'"),
    ({**METRIC, "command": ["check", "x}"]}, "command", "bad braces"),
    ({**METRIC, "command": ["check", "{0}"]}, "command", "unknown placeholder {0}"),
    ({**METRIC, "command": ["check", 3]}, "command", "must be a list of strings"),
    ({**METRIC, "command": "check {export_dir}"}, "command", "must be a list, got str"),
    (
        {"metric": "m", "json_file": "m-{epoch}.json"},
        "json_file",
        "unknown placeholder {epoch} in 'm-{epoch}.json'; known: {name}, {step}",
    ),
    ({"metric": "m", "json_file": "m-{export_dir}.json"}, "json_file", "unknown placeholder"),
    ({"metric": "m", "json_file": "m-{.json"}, "json_file", "bad braces"),
    ({"metric": "m", "json_file": "m-{}.json"}, "json_file", "unknown placeholder {}"),
    ({"metric": "m", "json_file": "m-{step!z}.json"}, "json_file", "bad format spec"),
    ({"metric": "m", "json_file": ["m.json"]}, "json_file", "must be a string, got list"),
]


@pytest.mark.parametrize(
    ("gate", "key", "fragment"),
    CONFIG_ERRORS,
    ids=[f"{c[1]}-{i}" for i, c in enumerate(CONFIG_ERRORS)],
)
def test_config_gate_problems_name_the_key(gate: dict[str, Any], key: str, fragment: str) -> None:
    problems = config_problems(gate)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{WHERE}.{key}: "), problems[0]
    assert fragment in problems[0], problems[0]


def test_config_gate_problems_are_all_reported() -> None:
    problems = config_problems(
        {**METRIC, "mode": "up", "better_than": "best", "wait_seconds": -1, "x": 1}
    )
    assert sorted(p.split(":")[0] for p in problems) == [
        f"{WHERE}.better_than",
        f"{WHERE}.mode",
        f"{WHERE}.wait_seconds",
        f"{WHERE}.x",
    ]


@pytest.mark.parametrize("gate", ["val_loss", ["val_loss"], 1])
def test_config_gate_must_be_a_table(gate: Any) -> None:
    problems = config_problems(gate)
    assert len(problems) == 1, problems
    assert problems[0].startswith("models[0] (m).gate: must be a table"), problems[0]


@pytest.mark.parametrize(
    ("gate", "expected"),
    [
        (
            {"json_file": "m.json"},
            [
                f'{WHERE}.json_file: only used with metric; add metric = "..." or remove it',
                f"{WHERE}: a gate needs metric or command (or remove the table)",
            ],
        ),
        (
            {"metric": "m"},
            [
                f"{WHERE}.metric: give exactly one of json_file or tensorboard_dir to read "
                "'m' from (got neither)"
            ],
        ),
        (
            {"metric": "m", "json_file": "a.json", "tensorboard_dir": "logs"},
            [
                f"{WHERE}.metric: give exactly one of json_file or tensorboard_dir to read "
                "'m' from (got json_file, tensorboard_dir)"
            ],
        ),
        ({"mode": "max"}, [f"{WHERE}: a gate needs metric or command (or remove the table)"]),
    ],
)
def test_config_gate_combination_problems(gate: dict[str, Any], expected: list[str]) -> None:
    assert config_problems(gate) == expected


def test_config_gate_resolves_against_the_resolved_checkpoint_dir(tmp_path: Path) -> None:
    table = model_with_gate(
        {
            "metric": "val_loss",
            "json_file": "eval/{step}.json",
            "mode": "max",
            "better_than": 3,
            "wait_seconds": 5,
            "command": ["check", "{export_dir}"],
        },
        checkpoint_dir="runs/../ckpts",
    )
    cfg = parse_config({"models": [table]}, "t.toml", tmp_path)
    assert cfg.models[0].gate == Gate(
        metric="val_loss",
        mode="max",
        better_than=3.0,
        json_file=str(tmp_path / "ckpts" / "eval" / "{step}.json"),
        wait_seconds=5.0,
        command=("check", "{export_dir}"),
    )


def test_config_without_a_gate_table_has_a_disabled_gate() -> None:
    table = model_with_gate({})
    del table["gate"]
    cfg = parse_config({"models": [table]}, "t.toml", Path("/etc"))
    assert cfg.models[0].gate == Gate()
    assert not cfg.models[0].gate.enabled


def test_config_with_an_empty_gate_table_has_a_disabled_gate() -> None:
    # An empty [models.gate] says nothing; it is accepted as no gate.
    cfg = parse_config({"models": [model_with_gate({})]}, "t.toml", Path("/etc"))
    assert cfg.models[0].gate == Gate()


# --- braces outside the template ----------------------------------------------------------


def test_braces_in_the_checkpoint_dir_are_not_placeholders(tmp_path: Path) -> None:
    # json_file is a template, the checkpoint dir it is resolved against is not.
    ckpt_dir = tmp_path / "run{1}" / "exp{name}"
    gate, problems = parse({"metric": "val_loss", "json_file": "eval-{step}.json"}, ckpt_dir)
    assert problems == []
    write(ckpt_dir / "eval-7.json", {"val_loss": 0.5})
    assert MetricReader().read(gate, "ckpt-7", 7) == 0.5


def test_a_shared_file_in_a_braced_checkpoint_dir(tmp_path: Path) -> None:
    # "{name}" in the folder must not make the shared file count as per checkpoint.
    ckpt_dir = tmp_path / "{name}"
    gate, _ = parse({"metric": "val_loss", "json_file": "metrics.json"}, ckpt_dir)
    write(ckpt_dir / "metrics.json", [{"step": 3, "val_loss": 0.5}, {"val_loss": 0.9}])
    reader = MetricReader()
    assert reader.read(gate, "ckpt-3", 3) == 0.5
    assert reader.read(gate, "ckpt-4", 4) is None


@pytest.mark.parametrize(
    ("template", "filename"),
    [("eval-{step:>5}.json", "eval-    7.json"), ("eval-{name!s}.json", "eval-ckpt-7.json")],
)
def test_placeholders_with_a_format_spec_name_a_file_per_checkpoint(
    tmp_path: Path, template: str, filename: str
) -> None:
    gate, problems = parse({"metric": "val_loss", "json_file": template}, tmp_path)
    assert problems == []
    write(tmp_path / filename, {"val_loss": 0.5})  # no "step": it is a file per checkpoint
    assert MetricReader().read(gate, "ckpt-7", 7) == 0.5


def test_literal_braces_around_a_placeholder_name_are_not_a_placeholder(tmp_path: Path) -> None:
    gate, _ = parse({"metric": "val_loss", "json_file": "m{{step}}.json"}, tmp_path)
    write(tmp_path / "m{step}.json", [{"step": 3, "val_loss": 0.5}, {"val_loss": 0.9}])
    assert MetricReader().read(gate, "ckpt-3", 3) == 0.5


@pytest.mark.parametrize(
    ("key", "value"), [("json_file", "m-{step.real}.json"), ("command", ["check", "{model.x}"])]
)
def test_an_attribute_field_is_a_problem_not_a_crash(key: str, value: Any) -> None:
    problems = config_problems({**METRIC, key: value})
    assert len(problems) == 1 and problems[0].startswith(f"{WHERE}.{key}: "), problems
