"""Weight parity modes on bundles written here (no TensorFlow), and the command source's flag."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from daemon.children import runtime, validator
from daemon.config.loading import ConfigError, parse_config
from daemon.formats import bundle, crc32c
from daemon.sources import SOURCES


def test_command_exports_are_checked_against_their_checkpoint() -> None:
    assert SOURCES["command"].weights_in_checkpoint
    model = {"name": "m", "checkpoint_dir": "/t", "base_path": "/s", "source": "command"}
    cfg = parse_config({"models": [{**model, "command": {"argv": ["x"]}}]}, "t.toml", Path("/"))
    assert cfg.models[0].options["weight_parity"] == "all"
    with pytest.raises(ConfigError) as e:
        parse_config(
            {"models": [{**model, "command": {"argv": ["x"], "weight_parity": "some"}}]},
            "t.toml",
            Path("/"),
        )
    assert "command.weight_parity" in str(e.value)


DT_FLOAT = 1


def _floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _write_bundle(prefix: Path, tensors: dict[str, bytes]) -> None:
    data = bytearray()
    entries = {}
    for key, raw in tensors.items():
        entries[key] = bundle.Entry(
            DT_FLOAT, (len(raw) // 4,), 0, len(data), len(raw), crc32c.masked(raw), False
        )
        data += raw
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    Path(f"{prefix}.index").write_bytes(bundle.encode_index(1, entries))


def _export(tmp_path: Path, saved: dict[str, bytes]) -> tuple[str, str]:
    checkpoint = tmp_path / "ckpt" / "ckpt-1"
    _write_bundle(
        checkpoint,
        {
            "model/kernel/.ATTRIBUTES/VARIABLE_VALUE": _floats(1, 2, 3),
            "model/bias/.ATTRIBUTES/VARIABLE_VALUE": _floats(4),
        },
    )
    _write_bundle(tmp_path / "export" / "variables" / "variables", saved)
    return str(tmp_path / "export"), str(checkpoint)


def test_partial_parity_counts_and_names_variables_of_the_exporters_own(tmp_path: Path) -> None:
    export, checkpoint = _export(
        tmp_path,
        {
            "variables/0/.ATTRIBUTES/VARIABLE_VALUE": _floats(1, 2, 3),
            "variables/1/.ATTRIBUTES/VARIABLE_VALUE": _floats(4),
            "mean/.ATTRIBUTES/VARIABLE_VALUE": _floats(0.5, 0.5, 0.5),
        },
    )
    with pytest.raises(runtime.ChildFailure, match="1 of 3 variables") as e:
        validator.weight_parity(export, checkpoint)
    assert e.value.reason == "weight_mismatch"
    report = validator.weight_parity(export, checkpoint, "partial")
    assert report["variables"] == 3 and report["matched"] == 2
    assert report["unmatched"] == ["mean/.ATTRIBUTES/VARIABLE_VALUE"]


def test_partial_parity_fails_when_nothing_matched(tmp_path: Path) -> None:
    export, checkpoint = _export(
        tmp_path,
        {
            "variables/0/.ATTRIBUTES/VARIABLE_VALUE": _floats(0, 0, 0),
            "variables/1/.ATTRIBUTES/VARIABLE_VALUE": _floats(0),
        },
    )
    with pytest.raises(runtime.ChildFailure, match="2 of 2 variables") as e:
        validator.weight_parity(export, checkpoint, "partial")
    assert e.value.reason == "weight_mismatch"


def test_full_parity_reports_every_variable_matched(tmp_path: Path) -> None:
    export, checkpoint = _export(
        tmp_path,
        {
            "variables/0/.ATTRIBUTES/VARIABLE_VALUE": _floats(1, 2, 3),
            "variables/1/.ATTRIBUTES/VARIABLE_VALUE": _floats(4),
        },
    )
    report = validator.weight_parity(export, checkpoint)
    assert (report["variables"], report["matched"], report["matched_by"]) == (2, 2, "value")
    assert "unmatched" not in report
