"""The Prometheus scrape config and alert rules shown in the README, checked by promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package 'prometheus'; .ci/run installs it)",
)


def _block(first_line: str) -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(first_line + "\n")]
    assert len(found) == 1, f"README needs one ```yaml block starting with {first_line!r}"
    return found[0]


def _promtool(*args: str, cwd: Path) -> str:
    r = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "prometheus.yml").write_text(_block("# prometheus.yml"))
    (tmp_path / "ckpt-exporter.rules.yml").write_text(_block("# ckpt-exporter.rules.yml"))
    return tmp_path


def test_scrape_config_and_rules_pass_promtool(files: Path) -> None:
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml", cwd=files)
    out = _promtool("check", "rules", "ckpt-exporter.rules.yml", cwd=files)
    assert "SUCCESS: 3 rules found" in out


def test_alert_rules_fire_when_they_should(files: Path) -> None:
    # Series start at t=0; time() at 7h is 25200 s. Model "stuck" last published
    # at t=0 and has pending checkpoints; "quiet" has nothing pending; "fresh"
    # published an hour ago.
    (files / "rules_test.yml").write_text(
        """
rule_files: [ckpt-exporter.rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'ckpt_exporter_last_publish_timestamp_seconds{model="stuck"}'
        values: '0+0x480'
      - series: 'ckpt_exporter_pending_checkpoints{model="stuck"}'
        values: '3+0x480'
      - series: 'ckpt_exporter_last_publish_timestamp_seconds{model="quiet"}'
        values: '0+0x480'
      - series: 'ckpt_exporter_pending_checkpoints{model="quiet"}'
        values: '0+0x480'
      - series: 'ckpt_exporter_last_publish_timestamp_seconds{model="fresh"}'
        values: '21600+0x480'
      - series: 'ckpt_exporter_pending_checkpoints{model="fresh"}'
        values: '1+0x480'
      - series: 'ckpt_exporter_export_failures_total{model="m",phase="validate",reason="nan"}'
        values: '0 0 0 1 1 1'
      - series: 'ckpt_exporter_export_failures_total{model="m",phase="export",reason="timeout"}'
        values: '0 0 0 1 1 1'
      - series: 'up{job="ckpt-exporter",instance="trainer:9725"}'
        values: '1 1 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 7h
        alertname: CkptExporterNoPublish
        exp_alerts:
          - exp_labels: {severity: warning, model: stuck}
            exp_annotations:
              summary: "stuck: checkpoints pending, no version published for 6 h"
      - eval_time: 5m
        alertname: CkptExporterValidationFailures
        exp_alerts:
          - exp_labels:
              severity: warning
              model: m
              phase: validate
              reason: nan
            exp_annotations:
              summary: "m: validation failed (nan)"
      - eval_time: 4m
        alertname: CkptExporterDown
        exp_alerts: []
      - eval_time: 8m
        alertname: CkptExporterDown
        exp_alerts:
          - exp_labels: {severity: critical, job: ckpt-exporter, instance: "trainer:9725"}
            exp_annotations:
              summary: "ckpt-exporter on trainer:9725 is down"
"""
    )
    assert "SUCCESS" in _promtool("test", "rules", "rules_test.yml", cwd=files)
