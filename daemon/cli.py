"""The ``ckpt-exporter`` command line.

``run`` is the daemon; ``export``, ``validate``, ``status`` and ``check-config``
are for people and scripts; ``demo`` shows the whole thing on a tiny training
job. Exit codes come from :mod:`daemon.exitcodes` (78: invalid config).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from daemon import __version__, exitcodes, logs
from daemon.config import Config, ConfigError, load_config
from daemon.planner import plan
from daemon.rejected import read_rejected
from daemon.sources import SOURCES
from daemon.versions import published_versions, scan_base_path


def _load(path: str) -> Config:
    try:
        return load_config(Path(path))
    except ConfigError as e:
        print(f"ckpt-exporter: {e}", file=sys.stderr)
        raise SystemExit(exitcodes.CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.supervisor import Supervisor

    cfg = _load(args.config)
    logs.configure(args.log_format or cfg.daemon.log_format, cfg.daemon.log_level)
    sup = Supervisor(cfg, logs.get_logger(), log_format_override=args.log_format)
    sup.install_signal_handlers()
    try:
        return sup.run()
    except OSError as e:
        # e.g. the metrics port is taken: say which, and do not restart-loop silently.
        logs.get_logger().error(
            "start_failed", error=str(e), metrics_address=cfg.daemon.metrics_address
        )
        return exitcodes.SOFTWARE


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    for m in cfg.models:
        print(
            f"{m.name}: {m.checkpoint_dir} -> {m.base_path} "
            f"(source={m.source}, builder={m.builder}, export_policy={m.export_policy}, "
            f"version_policy={m.version_policy}, keep_versions={m.keep_versions})"
        )
    print(f"config OK: {cfg.path}")
    return exitcodes.OK


def cmd_export(args: argparse.Namespace) -> int:
    from daemon.supervisor import Supervisor

    cfg = _load(args.config)
    names = [m.name for m in cfg.models]
    if args.model is None and len(names) == 1:
        args.model = names[0]
    if args.model not in names:
        print(f"ckpt-exporter: --model must be one of {', '.join(names)}", file=sys.stderr)
        return exitcodes.CONFIG
    logs.configure(args.log_format or cfg.daemon.log_format, cfg.daemon.log_level)
    sup = Supervisor(cfg, logs.get_logger())
    sup.install_signal_handlers()
    code, summary = sup.export_once(args.model, Path(args.checkpoint) if args.checkpoint else None)
    print(summary)
    return code


def run_validator(path: Path, timeout: float = 600.0) -> dict[str, Any]:
    """Run the validator child on any SavedModel (no reference outputs)."""
    from daemon import child

    with tempfile.TemporaryDirectory(prefix="ckpt-exporter-validate-") as tmp:
        req = Path(tmp) / "request.json"
        result = Path(tmp) / "result.json"
        req.write_text(json.dumps({"saved_model": str(path.resolve()), "result": str(result)}))
        proc = subprocess.run(
            child.child_command("daemon.validate", req),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        data = child.read_result(result)
        if data is None:
            tail = proc.stdout.decode(errors="replace")[-2000:]
            return {
                "ok": False,
                "reason": "child_crashed",
                "error": f"validator exited {proc.returncode}: {tail}",
            }
        return data


def cmd_validate(args: argparse.Namespace) -> int:
    result = run_validator(Path(args.path))
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for name, sig in sorted(result.get("signatures", {}).items()):
            verdict = "ok" if sig.get("ok") else f"FAILED: {sig.get('error')}"
            print(f"{name} ({sig.get('method')}): inputs {sig.get('inputs')} -> {verdict}")
        print(
            f"{args.path}: " + ("valid" if result.get("ok") else f"INVALID: {result.get('error')}")
        )
    return exitcodes.OK if result.get("ok") else 1


def model_status(cfg: Config) -> list[dict[str, Any]]:
    """Per model: newest checkpoint, newest version, pending, versions on disk (read-only)."""
    from daemon.planner import History

    rows = []
    for m in cfg.models:
        scan = SOURCES[m.source]().scan(m.checkpoint_dir)
        published = published_versions(m.base_path, m.name)
        rejected = read_rejected(m.base_path)
        history = History(
            published_fingerprints=frozenset(p.fingerprint for p in published),
            watermark_ns=max((p.written_ns for p in published), default=0),
            rejected=frozenset(rejected),
        )
        decision = plan(
            scan.checkpoints,
            history,
            export_policy=m.export_policy,
            min_interval_seconds=0,
            now=time.time(),
        )
        newest = scan.checkpoints[-1] if scan.checkpoints else None
        all_versions = scan_base_path(m.base_path)
        rows.append(
            {
                "model": m.name,
                "checkpoint_dir": str(m.checkpoint_dir),
                "base_path": str(m.base_path),
                "newest_checkpoint": newest.name if newest else None,
                "newest_checkpoint_step": newest.step if newest else None,
                "newest_version": max((v.version for v in all_versions), default=None),
                "pending": decision.pending,
                "versions_on_disk": len(published),
                "rejected": len(rejected),
            }
        )
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    rows = model_status(_load(args.config))
    if args.json:
        print(json.dumps(rows, indent=2))
        return exitcodes.OK
    cols = [
        "model",
        "newest_checkpoint",
        "newest_version",
        "pending",
        "versions_on_disk",
        "rejected",
    ]
    table = [cols] + [[str(r[c]) if r[c] is not None else "-" for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return exitcodes.OK


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo.run import run_demo

    return run_demo(
        workspace=Path(args.workspace) if args.workspace else None, versions=args.versions
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckpt-exporter",
        description="Export TensorFlow checkpoints to validated TF Serving versions.",
    )
    p.add_argument("--version", action="version", version=f"ckpt-exporter {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--config",
            "-c",
            default="/etc/ckpt-exporter/config.toml",
            help="TOML config file (default: %(default)s)",
        )

    def with_log_format(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--log-format", choices=["auto", "json", "console"], help="override [daemon].log_format"
        )

    sp = sub.add_parser("run", help="run the daemon")
    with_config(sp)
    with_log_format(sp)
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("check-config", help="validate a config file and exit")
    with_config(sp)
    sp.set_defaults(func=cmd_check_config)

    sp = sub.add_parser("export", help="export one checkpoint now through the same pipeline")
    with_config(sp)
    with_log_format(sp)
    sp.add_argument("--model", help="model name (optional with a single model)")
    sp.add_argument("--checkpoint", help="checkpoint prefix (default: the newest complete one)")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("validate", help="validate a SavedModel the way TF Serving loads it")
    sp.add_argument("path", help="SavedModel directory (for example a version folder)")
    sp.add_argument("--json", action="store_true", help="print the full report as JSON")
    sp.set_defaults(func=cmd_validate)

    sp = sub.add_parser("status", help="per model: newest checkpoint, version, pending")
    with_config(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("demo", help="train a tiny model and run the daemon on it")
    sp.add_argument("--workspace", help="folder for the demo (default: a new temporary one)")
    sp.add_argument("--versions", type=int, default=3, help="stop after this many versions")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
