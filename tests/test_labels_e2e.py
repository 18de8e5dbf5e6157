"""Version labels end to end: a trainer, the daemon writing TF Serving's model config, a poller.

A real trainer writes checkpoints while ``ckpt-exporter run`` publishes them
with a ``[serving_config]`` table. Beside them a stand-in for TF Serving's
config poller re-reads the file every 50 ms, parses it with TF Serving's own
protos, "loads" each listed version some time after it first sees it (less
than ``load_wait_seconds``), and checks what the server would: a listed
version is complete in the base path (never partial), and every label points
at a loaded version (else the server refuses the whole file). Then rollback
and promotion by hand, through the real CLI.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, child_env, train, write_config

from daemon.basepath.layout import METADATA_RELPATH
from daemon.rules.labels import ModelEntry
from daemon.tfserving.model_config import parse_entries

pytestmark = pytest.mark.e2e

LOAD_WAIT = 1.5


class Poller(threading.Thread):
    """TF Serving's config poller, as far as versions and labels go."""

    def __init__(self, config: Path, seed: int) -> None:
        super().__init__(daemon=True)
        self.config, self.rng = config, random.Random(seed)
        self.stop = threading.Event()
        self.violations: list[str] = []
        self.ready_at: dict[int, float] = {}
        self.entry: ModelEntry | None = None
        self.reads = 0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                text = self.config.read_text()
            except FileNotFoundError:
                continue
            self.reads += 1
            models = parse_entries(text)
            if not models:
                continue  # no version yet: the file lists no model
            ((base, entry),) = models.values()
            self.check(Path(base), entry, time.time())

    def check(self, base: Path, entry: ModelEntry, now: float) -> None:
        for v in entry.versions:
            folder = base / str(v)
            needed = ["saved_model.pb", "variables/variables.index", str(METADATA_RELPATH)]
            missing = [n for n in needed if not (folder / n).exists()]
            if missing:
                self.violations.append(f"version {v} listed while {missing} missing")
            self.ready_at.setdefault(v, now + self.rng.uniform(0, 0.8 * LOAD_WAIT))
        for v in list(self.ready_at):
            if v not in entry.versions:
                del self.ready_at[v]  # unloaded
        loaded = {v for v, t in self.ready_at.items() if t <= now}
        bad = {k: v for k, v in entry.labels.items() if v not in loaded}
        if bad:
            self.violations.append(f"config refused: {bad} not loaded (loaded: {loaded})")
        self.entry = entry


def _cli(config: Path, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "daemon", *args, "--config", str(config)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _wait(poller: Poller, daemon: Daemon, labels: dict[str, int], what: str) -> None:
    daemon.wait_for(
        lambda _ev: poller.entry is not None and dict(poller.entry.labels) == labels,
        timeout=180,
        what=f"{what}: labels {labels} (now {poller.entry})",
    )


def test_labels_follow_publications_and_operators(tmp_path: Path) -> None:
    served = tmp_path / "serving" / "models.config"
    config = write_config(tmp_path, daemon={"rescan_interval_seconds": 0.5})
    with config.open("a") as f:
        f.write(f'\n[serving_config]\npath = "{served}"\nload_wait_seconds = {LOAD_WAIT}\n')
    seed = random.randrange(1 << 30)
    print(f"poller seed {seed}")
    poller = Poller(served, seed)
    poller.start()
    trainer = train(tmp_path / "ckpts", 3, interval=3.0, wait=False)
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        _wait(poller, daemon, {"canary": 3, "stable": 3}, "three versions, promoted at once")
        assert trainer.wait(timeout=60) == 0
        assert poller.entry is not None and poller.entry.versions == (3,)

        out = _cli(config, "rollback", "--to", "2")
        assert "back to version 2" in out
        _wait(poller, daemon, {"canary": 2, "stable": 2}, "rollback by label")
        assert (tmp_path / "serving" / "m" / "3" / "saved_model.pb").exists()  # nothing deleted
        assert poller.entry.versions == (2,)

        _cli(config, "promote", "3")
        _wait(poller, daemon, {"canary": 2, "stable": 3}, "promotion by hand")
        status = _cli(config, "status")
        assert "canary=2,stable=3" in status
    finally:
        poller.stop.set()
        poller.join()
        code = daemon.stop()
        if trainer.poll() is None:
            trainer.kill()
    assert code == 0
    assert poller.reads > 10
    assert not poller.violations, poller.violations[:5]
