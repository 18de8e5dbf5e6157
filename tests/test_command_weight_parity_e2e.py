"""source = "command": the external exporter's SavedModel is proven against the checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, train, version_dirs, write_config

from daemon.basepath.layout import REPORT_RELPATH

EXPORTER = str(Path(__file__).parent / "builders" / "external_exporter.py")


@pytest.mark.e2e
def test_a_command_export_passes_weight_parity_against_its_checkpoint(
    tmp_path: Path, daemons: Any
) -> None:
    train(tmp_path / "ckpts", 1)
    config = write_config(tmp_path, builder="", source="command")
    argv = [sys.executable, EXPORTER, "--checkpoint_dir", "{checkpoint_dir}"]
    argv += ["--output", "{output_dir}"]
    config.write_text(
        config.read_text() + f"\n[models.command]\nargv = {json.dumps(argv)}\n"
        'saved_model_subdir = "saved_model"\n'
    )
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    ev = d.wait_for(lambda ev: any(e["event"] == "published" for e in ev), what="a version")
    validated = next(e for e in ev if e["event"] == "validated")
    assert validated["weights_matched"] > 0

    (version,) = version_dirs(tmp_path / "serving" / "m").values()
    report = json.loads((version / REPORT_RELPATH).read_text())
    weights = report["weights"]
    assert weights["checkpoint"].endswith("ckpt-5")
    assert weights["matched"] == weights["variables"] == validated["weights_matched"] > 0
    parity = next(c for c in report["checks"] if c["check"] == "weight_parity")
    assert parity["ok"] and "skipped" not in parity
    assert d.stop() == 0
