"""The Prometheus scrape config and alert rules shown in README.md, checked by promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from daemon.supervisor.metrics import Metrics

README = Path(__file__).resolve().parent.parent / "README.md"
SCRAPE = "# prometheus.yml"
RULES = "# ckpt-exporter.rules.yml"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package 'prometheus'; .ci/run installs it)",
)


def readme_block(first_line: str) -> str:
    """The one ```yaml block of README.md whose first line is ``first_line``."""
    blocks = re.findall(r"^```yaml\n(.*?)^```$", README.read_text(), flags=re.S | re.M)
    found = [b for b in blocks if b.startswith(first_line + "\n")]
    assert len(found) == 1, f"README.md needs one ```yaml block starting with {first_line!r}"
    return found[0]


def promtool(*args: str, cwd: Path) -> str:
    r = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    return out


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """The README's prometheus.yml and rules file, side by side as rule_files expects."""
    (tmp_path / "prometheus.yml").write_text(readme_block(SCRAPE))
    (tmp_path / "ckpt-exporter.rules.yml").write_text(readme_block(RULES))
    return tmp_path


def test_scrape_config_targets_the_default_metrics_address() -> None:
    scrape = readme_block(SCRAPE)
    assert re.search(r"^\s*-?\s*job_name: ckpt-exporter$", scrape, re.M)
    assert '"127.0.0.1:9725"' in scrape
    assert re.search(r"^\s*scrape_interval: 15s$", scrape, re.M)
    assert re.search(r"^rule_files:\n\s+- ckpt-exporter\.rules\.yml$", scrape, re.M)


@needs_promtool
def test_scrape_config_passes_promtool_and_loads_the_rules(files: Path) -> None:
    out = promtool("check", "config", "prometheus.yml", cwd=files)
    assert "SUCCESS" in out
    # check config also checks the rule files it names: proof they are wired in.
    assert "Checking ckpt-exporter.rules.yml" in out and "SUCCESS: 3 rules found" in out, out


@needs_promtool
def test_rules_pass_promtool(files: Path) -> None:
    out = promtool("check", "rules", "ckpt-exporter.rules.yml", cwd=files)
    assert "SUCCESS: 3 rules found" in out, out


def test_rules_use_metrics_and_labels_the_daemon_exports() -> None:
    metrics = Metrics()
    metrics.init_model("m")
    exposition = generate_latest(metrics.registry).decode()
    samples = re.findall(r"^(ckpt_exporter_\w+)(?:\{(.*)\})? ", exposition, re.M)
    names = {name for name, _ in samples}
    rules = readme_block(RULES)
    used = set(re.findall(r"\bckpt_exporter_\w+", rules))
    assert used == {
        "ckpt_exporter_last_publish_timestamp_seconds",
        "ckpt_exporter_pending_checkpoints",
        "ckpt_exporter_export_failures_total",
    }
    assert used <= names, f"not exported by the daemon: {sorted(used - names)}"
    # Every series the rules select on or print carries those labels.
    for name in used:
        assert all('model="m"' in labels for n, labels in samples if n == name), name
    failures = [labels for n, labels in samples if n == "ckpt_exporter_export_failures_total"]
    assert any('phase="validate"' in f and "reason=" in f for f in failures), failures


def _series(model: str, *, published_at: int, pending: str) -> str:
    return f"""
      - series: 'ckpt_exporter_last_publish_timestamp_seconds{{model="{model}"}}'
        values: '{published_at}+0x600'
      - series: 'ckpt_exporter_pending_checkpoints{{model="{model}"}}'
        values: '{pending}'"""


@needs_promtool
def test_no_publish_alert_fires_only_while_checkpoints_are_pending(files: Path) -> None:
    # promtool starts the clock at 0, so time() at eval_time 7h is 25200 s.
    # "stuck" last published at 0 and has checkpoints pending throughout;
    # "idle" published just as long ago but has nothing pending (training
    # stopped: no alert); "fresh" published at 5 h; "drained" was pending
    # until 6 h 30 min, then caught up.
    series = (
        _series("stuck", published_at=0, pending="3+0x600")
        + _series("idle", published_at=0, pending="0+0x600")
        + _series("fresh", published_at=18000, pending="2+0x600")
        + _series("drained", published_at=0, pending="1+0x389 0+0x210")
    )
    stuck = """
          - exp_labels: {severity: warning, model: stuck}
            exp_annotations:
              summary: "stuck: checkpoints pending, no version published for 6 h\""""
    (files / "no_publish_test.yml").write_text(
        f"""
rule_files: [ckpt-exporter.rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:{series}
    alert_rule_test:
      # 6 h passed at 6:00, but the condition must hold for 15 min first.
      - eval_time: 6h10m
        alertname: CkptExporterNoPublish
        exp_alerts: []
      - eval_time: 6h20m
        alertname: CkptExporterNoPublish
        exp_alerts:{stuck}
          - exp_labels: {{severity: warning, model: drained}}
            exp_annotations:
              summary: "drained: checkpoints pending, no version published for 6 h"
      - eval_time: 7h
        alertname: CkptExporterNoPublish
        exp_alerts:{stuck}
"""
    )
    assert "SUCCESS" in promtool("test", "rules", "no_publish_test.yml", cwd=files)


@needs_promtool
def test_validation_and_down_alerts_fire(files: Path) -> None:
    (files / "other_rules_test.yml").write_text(
        """
rule_files: [ckpt-exporter.rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'ckpt_exporter_export_failures_total{model="m",phase="validate",reason="timeout"}'
        values: '0 0 0 1 1 1'
      - series: 'ckpt_exporter_export_failures_total{model="m",phase="export",reason="timeout"}'
        values: '0 0 0 1 1 1'
      - series: 'up{job="ckpt-exporter",instance="trainer:9725"}'
        values: '1 1 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 2m
        alertname: CkptExporterValidationFailures
        exp_alerts: []
      # Only the validate phase counts, not the same reason in another phase.
      - eval_time: 5m
        alertname: CkptExporterValidationFailures
        exp_alerts:
          - exp_labels:
              severity: warning
              model: m
              phase: validate
              reason: timeout
            exp_annotations:
              summary: "m: validation failed (timeout)"
      # Down since 2m: not for 5 min yet at 6m, firing at 7m.
      - eval_time: 6m
        alertname: CkptExporterDown
        exp_alerts: []
      - eval_time: 7m
        alertname: CkptExporterDown
        exp_alerts:
          - exp_labels: {severity: critical, job: ckpt-exporter, instance: "trainer:9725"}
            exp_annotations:
              summary: "ckpt-exporter on trainer:9725 is down"
"""
    )
    assert "SUCCESS" in promtool("test", "rules", "other_rules_test.yml", cwd=files)
