"""``ckpt-exporter demo``: a real training job, the real daemon, a few versions.

Creates a workspace, writes a config for it, starts :mod:`daemon.demo.trainer`
as a subprocess and runs the supervisor in this process until the trainer has
finished and ``versions`` versions are published (or something fails), then
prints where everything is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon import exitcodes, logs
from daemon.config.loading import load_config
from daemon.objectstore.url import Location
from daemon.protocol import ValidationResult

#: The demo gives up (and says so) if it has not finished by then.
DEMO_TIMEOUT_SECONDS = 900

CONFIG_TEMPLATE = """\
# Written by `ckpt-exporter demo`. Every key is documented in config.example.toml.
[daemon]
metrics_address = "127.0.0.1:0"   # any free port; the log says which
log_format = "console"
rescan_interval_seconds = 5

[[models]]
name = "demo"
checkpoint_dir = "checkpoints"
base_path = "serving/demo"
builder = "daemon.demo.model:build_model"
checkpoint_key = "model"
export_policy = "all"
keep_versions = 5
"""


def run_demo(workspace: Path | None, versions: int) -> int:
    ws = workspace or Path(tempfile.mkdtemp(prefix="ckpt-exporter-demo-"))
    ws = ws.resolve()
    ws.mkdir(parents=True, exist_ok=True)
    config_path = ws / "config.toml"
    config_path.write_text(CONFIG_TEMPLATE)
    cfg = load_config(config_path)
    model = cfg.models[0]
    logs.configure("console" if sys.stderr.isatty() else "json", "info")
    print(
        f"demo: workspace {ws}\ndemo: training a small Keras model; a checkpoint every few "
        f"seconds, {versions} in all",
        flush=True,
    )

    from daemon.supervisor import Supervisor

    published: list[tuple[int, Location, ValidationResult]] = []

    def on_published(
        _model: str, version: int, path: Location, validation: ValidationResult
    ) -> None:
        parts = []
        for name, s in sorted(validation["signatures"].items()):
            # A linked export has no exporter outputs, so no difference to show.
            diff = s.get("max_abs_diff")
            shown = f" (max diff {diff:.1g})" if diff is not None else ""
            parts.append(f"{name} {'ok' if s.get('ok') else 'FAILED'}{shown}")
        weights = validation.get("weights")
        if weights:
            parts.append(f"{weights['variables']} weights matched by {weights['matched_by']}")
        summary = ", ".join(parts)
        print(f"demo: version {version} is live at {path}  [validated: {summary}]", flush=True)
        published.append((version, path, validation))

    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    trainer_log = (ws / "trainer.log").open("ab")
    # The trainer's progress lines go to the terminal; TensorFlow's start-up
    # chatter on stderr goes to trainer.log.
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.demo.trainer",
            str(model.checkpoint_dir),
            "--checkpoints",
            str(versions),
            "--interval",
            "4",
        ],
        env=env,
        stderr=trainer_log,
    )
    sup = Supervisor(cfg, logs.get_logger(), on_published=on_published)
    sup.install_signal_handlers()
    deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS

    def finished() -> bool:
        if len(published) >= versions and trainer.poll() is not None:
            return True
        return time.monotonic() > deadline

    try:
        sup.run(until=finished)
    finally:
        if trainer.poll() is None:
            trainer.terminate()
            trainer.wait(timeout=30)
        trainer_log.close()
    ok = len(published) >= versions and trainer.returncode == 0
    exe = Path(sys.executable).parent / "ckpt-exporter"
    cmd = str(exe) if exe.exists() else "ckpt-exporter"
    print()
    print("demo: " + ("done" if ok else "did NOT finish as expected (see the log above)"))
    print(f"  config          {config_path}")
    print(f"  checkpoints     {model.checkpoint_dir}")
    print(
        f"  TF Serving base {model.base_path}  (versions: "
        f"{', '.join(str(v) for v, _, _ in published) or 'none'})"
    )
    print(f"  status          {cmd} status --config {config_path}")
    print(f"  validate        {cmd} validate {model.base_path}/<version>")
    print(
        "  serve it        docker run -p 8501:8501 -v "
        f"{model.base_path.parent}:/models -e MODEL_NAME=demo tensorflow/serving"
    )
    return exitcodes.OK if ok else exitcodes.SOFTWARE
