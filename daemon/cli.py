"""The ``ckpt-exporter`` command line.

``run`` is the daemon; ``export``, ``validate``, ``verify``, ``status``,
``rollback``, ``pin``, ``unpin`` and ``check-config`` are for people and
scripts; ``demo`` shows the whole thing on a tiny training job. Exit codes
come from :mod:`daemon.exitcodes` (78: invalid config or unknown
``--model``); the operator commands (``rollback``, ``pin``, ``unpin``) exit 1
when they refuse (the message on stderr says why) and 75 when the base-path
lock stayed busy. ``verify`` exits 0 when the version matches its manifest,
:data:`NOT_INTACT` (65) when a file changed, went missing or was added, 1
when it cannot verify (no manifest, not a folder, an unusable bucket) and 75
when the object store kept failing. User errors never end in a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon import __version__, exitcodes, logs, protocol
from daemon.basepath.catalog import planning_history, published_versions
from daemon.basepath.label_requests import read_labels, request_move
from daemon.basepath.manifest import ManifestError, VerifyReport, verify_version
from daemon.basepath.operations import (
    LOCK_TIMEOUT_SECONDS,
    LockBusy,
    OperationError,
    accept_signature,
    load_rolled_back,
    pin_version,
    read_pins,
    rollback,
    tree_bytes,
    unpin_version,
)
from daemon.basepath.records import read_rejected
from daemon.config.builders import check_builders
from daemon.config.loading import Config, ConfigError, DaemonConfig, ModelConfig, load_config
from daemon.objectstore.client import ObjectStoreError
from daemon.objectstore.clients import ClientMissing
from daemon.objectstore.url import Location, parse_url, url_scheme
from daemon.rules.planner import plan
from daemon.sources import SOURCES

#: Exit status of an operator command (rollback, pin, unpin) that refused or
#: failed, and of ``verify`` when it cannot verify.
REFUSED = 1
#: Exit status of ``verify`` when the version does not match its manifest
#: (BSD sysexits' EX_DATAERR: the data is not what it should be).
NOT_INTACT = 65


def _load(path: str, *, builders: bool = False) -> Config:
    """The config at ``path``; with ``builders``, also check that every builder module exists.

    Operator commands (status, rollback, pin) skip the builder check: they
    must work in an emergency even when the training code has moved.
    """
    try:
        cfg = load_config(Path(path))
        if builders:
            check_builders(cfg)
        return cfg
    except ConfigError as e:
        print(f"ckpt-exporter: {e}", file=sys.stderr)
        raise SystemExit(exitcodes.CONFIG) from None


def _error(message: str) -> None:
    print(f"ckpt-exporter: {message}", file=sys.stderr)


def _pick_model(cfg: Config, name: str | None) -> ModelConfig | None:
    """The model named ``name``, or the only one when ``name`` is None; else None (said)."""
    names = [m.name for m in cfg.models]
    if name is None and len(names) == 1:
        name = names[0]
    for m in cfg.models:
        if m.name == name:
            return m
    _error(f"--model must be one of {', '.join(names)}")
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.supervisor import Supervisor

    cfg = _load(args.config, builders=True)
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
    cfg = _load(args.config, builders=True)
    for m in cfg.models:
        print(
            f"{m.name}: {m.checkpoint_dir} -> {m.base_path} "
            f"(source={m.source}, builder={m.builder}, export_policy={m.export_policy}, "
            f"version_policy={m.version_policy}, keep_versions={m.keep_versions})"
        )
    print(f"config OK: {cfg.path}")
    return exitcodes.OK


def foreground(d: DaemonConfig) -> DaemonConfig:
    """``d`` without the caps that keep the daemon's children below a trainer.

    ``ckpt-exporter export`` is someone waiting for a result now: its children
    run at the caller's priority, with TensorFlow's thread pools across every
    CPU (``--background`` keeps the config's ``worker_nice``,
    ``worker_io_class`` and ``worker_threads``).
    """
    return dataclasses.replace(
        d, worker_nice=0, worker_io_class="default", worker_threads=os.cpu_count() or 1
    )


def cmd_export(args: argparse.Namespace) -> int:
    from daemon.supervisor import Supervisor

    cfg = _load(args.config, builders=True)
    model = _pick_model(cfg, args.model)
    if model is None:
        return exitcodes.CONFIG
    args.model = model.name
    if not args.background:
        cfg = dataclasses.replace(cfg, daemon=foreground(cfg.daemon))
    logs.configure(args.log_format or cfg.daemon.log_format, cfg.daemon.log_level)
    sup = Supervisor(cfg, logs.get_logger())
    sup.install_signal_handlers()
    code, summary = sup.export_once(args.model, Path(args.checkpoint) if args.checkpoint else None)
    print(summary)
    return code


def run_validator(
    path: Path,
    checkpoint: Path | None = None,
    timeout: float = 600.0,
    *,
    sample_inputs: Path | None = None,
    golden_outputs: Path | None = None,
) -> dict[str, Any]:
    """Run the validator child on any SavedModel (no reference outputs).

    With ``checkpoint`` (a TensorFlow checkpoint prefix) it also checks that
    every variable of the SavedModel holds a value from that checkpoint; with
    ``sample_inputs`` the signatures run on them, and ``golden_outputs`` are
    compared with what they answer.
    """

    with tempfile.TemporaryDirectory(prefix="ckpt-exporter-validate-") as tmp:
        req = Path(tmp) / "request.json"
        result = Path(tmp) / "result.json"
        # No parent_pid, limits or log: a one-off check at the user's own priority,
        # its output captured here.
        request: protocol.ValidateRequest = {
            "saved_model": str(path.resolve()),
            "result": str(result),
        }
        if checkpoint is not None:
            request["checkpoint"] = str(checkpoint.resolve())
        if sample_inputs is not None:
            request["sample_inputs"] = str(sample_inputs.resolve())
        if golden_outputs is not None:
            request["golden_outputs"] = str(golden_outputs.resolve())
        req.write_text(json.dumps(request))
        proc = subprocess.run(
            protocol.child_command(protocol.VALIDATOR, req),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        data = protocol.read_result(result)
        if data is None:
            tail = proc.stdout.decode(errors="replace")[-2000:]
            return {
                "ok": False,
                "reason": "child_crashed",
                "error": f"validator exited {proc.returncode}: {tail}",
            }
        return data


def cmd_validate(args: argparse.Namespace) -> int:
    def optional(value: str | None) -> Path | None:
        return Path(value) if value else None

    result = run_validator(
        Path(args.path),
        optional(args.checkpoint),
        sample_inputs=optional(args.sample_inputs),
        golden_outputs=optional(args.golden_outputs),
    )
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for check in result.get("checks", []):
            verdict = "ok" if check.get("ok") else f"FAILED ({check.get('reason')})"
            print(f"check {check['check']}: {verdict} in {check.get('seconds')} s")
        for name, sig in sorted(result.get("signatures", {}).items()):
            verdict = "ok" if sig.get("ok") else f"FAILED: {sig.get('error')}"
            print(
                f"  signature {name} ({sig.get('method')}): inputs {sig.get('inputs')} "
                f"({sig.get('inputs_from')}) -> {verdict}"
            )
        if result.get("warmup"):
            w = result["warmup"]
            print(f"  warmup: {w['records']} records replayed ({w['replayed']})")
        if result.get("weights"):
            w = result["weights"]
            print(f"  weights: all {w['variables']} variables hold values from {w['checkpoint']}")
        print(
            f"{args.path}: " + ("valid" if result.get("ok") else f"INVALID: {result.get('error')}")
        )
    return exitcodes.OK if result.get("ok") else 1


def _print_verify_report(report: VerifyReport) -> None:
    """The human form of a :class:`VerifyReport` on stdout: one line per difference, a verdict."""
    for c in report.changed:
        found = c.found_sha256[:16] if c.found_sha256 else "not hashed"
        print(
            f"changed: {c.path} (sha256 {c.expected_sha256[:16]}..., {c.expected_bytes} bytes "
            f"-> {found}..., {c.found_bytes} bytes)"
        )
    for rel in report.missing:
        print(f"missing: {rel}")
    for rel in report.unlisted:
        print(f"not listed: {rel}")
    ckpt = report.checkpoint
    origin = f"checkpoint {ckpt.get('prefix')} (step {ckpt.get('step')})" if ckpt else "unknown"
    if report.intact:
        print(f"{report.location}: intact ({report.listed} files as published from {origin})")
    else:
        print(
            f"{report.location}: NOT INTACT: {len(report.changed)} changed, "
            f"{len(report.missing)} missing, {len(report.unlisted)} not listed "
            f"(of {report.listed} files listed)"
        )
    if not report.commit_record:
        _error(f"warning: {report.location} has no commit record: it was never fully published")


def cmd_verify(args: argparse.Namespace) -> int:
    text: str = args.location
    try:
        location: Location = (
            parse_url(text, args.endpoint_url or "") if url_scheme(text) else Path(text)
        )
    except ValueError as e:
        _error(str(e))
        return REFUSED
    try:
        report = verify_version(location)
    except (ManifestError, ClientMissing) as e:
        _error(str(e))
        return REFUSED
    except ObjectStoreError as e:
        _error(f"cannot read {text}: {e}")
        return exitcodes.TRANSIENT_FAILURE if e.kind == "transient" else REFUSED
    except OSError as e:
        _error(f"cannot read {text}: {e}")
        return REFUSED
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        _print_verify_report(report)
    return exitcodes.OK if report.intact else NOT_INTACT


def _iso_utc(timestamp: Any) -> str | None:
    """ISO-8601 UTC (``2024-05-01T12:00:00Z``) for a Unix time from metadata, or None."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float) or timestamp <= 0:
        return None
    try:
        return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return None


def model_status(cfg: Config) -> list[dict[str, Any]]:
    """Per model, read from disk only: the facts the daemon's metrics expose.

    ``pending`` is planned exactly as the daemon plans (published, rejected
    and rolled-back checkpoints excluded, the rolled-back floor raising the
    watermark), without the minimum interval and without a running export.
    """
    rows = []
    for m in cfg.models:
        scan_error = None
        try:
            checkpoints = SOURCES[m.source].scanner(m.options).scan(m.checkpoint_dir).checkpoints
        except OSError as e:
            scan_error, checkpoints = str(e), []
        published = sorted(published_versions(m.base_path, m.name), key=lambda p: p.version)
        rejected = read_rejected(m.base_path)
        rolled_back = load_rolled_back(m.base_path)
        decision = plan(
            checkpoints,
            rolled_back.apply(planning_history(published, rejected)),
            export_policy=m.export_policy,
            min_interval_seconds=0,
            now=time.time(),
        )
        newest_ckpt = checkpoints[-1] if checkpoints else None
        newest = published[-1] if published else None
        rows.append(
            {
                "model": m.name,
                "checkpoint_dir": str(m.checkpoint_dir),
                "base_path": str(m.base_path),
                "newest_checkpoint": newest_ckpt.name if newest_ckpt else None,
                "newest_checkpoint_step": newest_ckpt.step if newest_ckpt else None,
                "newest_version": newest.version if newest else None,
                "newest_version_step": newest.step if newest else None,
                "pending": None if scan_error else decision.pending,
                "versions_on_disk": len(published),
                "last_publish": _iso_utc(newest.metadata.get("published_at")) if newest else None,
                "pinned": sorted(read_pins(m.base_path)),
                "labels": _labels(cfg, m),
                "rejected": len(rejected),
                "rolled_back": len(rolled_back.fingerprints),
                "newest_version_bytes": tree_bytes(newest.path) if newest else None,
                "scan_error": scan_error,
            }
        )
    return rows


def _labels(cfg: Config, m: ModelConfig) -> dict[str, int] | None:
    """The labels the model config file gives the model now (None without [serving_config])."""
    if cfg.serving is None:
        return None
    state = read_labels(m.base_path)
    return dict(state.written) if state is not None else {}


def _human_bytes(n: Any) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


#: The table of ``status``: JSON key, column header, how to show a value that is not None.
STATUS_COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("model", "MODEL", str),
    ("newest_checkpoint", "CHECKPOINT", str),
    ("newest_checkpoint_step", "STEP", str),
    ("newest_version", "VERSION", str),
    ("newest_version_step", "VERSION_STEP", str),
    ("pending", "PENDING", str),
    ("versions_on_disk", "VERSIONS", str),
    ("last_publish", "LAST_PUBLISH", str),
    ("pinned", "PINNED", lambda v: ",".join(map(str, v)) or "-"),
    ("labels", "LABELS", lambda v: ",".join(f"{k}={n}" for k, n in sorted(v.items())) or "-"),
    ("rejected", "REJECTED", str),
    ("rolled_back", "ROLLED_BACK", str),
    ("newest_version_bytes", "SIZE", _human_bytes),
)


def cmd_status(args: argparse.Namespace) -> int:
    rows = model_status(_load(args.config))
    if args.json:
        print(json.dumps(rows, indent=2))
        return exitcodes.OK
    table = [[header for _key, header, _fmt in STATUS_COLUMNS]]
    for r in rows:
        table.append(
            [fmt(r[key]) if r[key] is not None else "-" for key, _h, fmt in STATUS_COLUMNS]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(STATUS_COLUMNS))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for r in rows:
        if r["scan_error"]:
            _error(f"{r['model']}: cannot scan {r['checkpoint_dir']}: {r['scan_error']}")
    return exitcodes.OK


def _operation(args: argparse.Namespace, action: Callable[[ModelConfig], int]) -> int:
    """Run an operator command on the chosen model; refusals become one line on stderr."""
    cfg = _load(args.config)
    model = _pick_model(cfg, args.model)
    if model is None:
        return exitcodes.CONFIG
    try:
        return action(model)
    except LockBusy as e:
        _error(f"{model.name}: {e}")
        return exitcodes.TRANSIENT_FAILURE
    except OperationError as e:
        _error(f"{model.name}: {e}")
        return REFUSED
    except OSError as e:
        _error(f"{model.name}: {e}")
        return REFUSED


def _pins_text(pins: frozenset[int]) -> str:
    return ", ".join(map(str, sorted(pins))) or "none"


def cmd_rollback(args: argparse.Namespace) -> int:
    serving = _load(args.config).serving

    def by_label(m: ModelConfig) -> int:
        assert serving is not None
        target = args.to if args.to is not None else _previous_stable(m, serving.stable_label)
        request_move(m.base_path, m.name, "rollback", target, lock_timeout=args.lock_timeout)
        print(
            f"{m.name}: asked the daemon to move {serving.canary_label} and "
            f"{serving.stable_label} back to version {target} (nothing is deleted); "
            "it does so at its next rescan, once that version is loaded"
        )
        return exitcodes.OK

    def action(m: ModelConfig) -> int:
        result = rollback(m.base_path, m.name, args.to, lock_timeout=args.lock_timeout)
        for mv in result.moved:
            print(
                f"{m.name}: version {mv.version} moved out of sight to {mv.destination}; "
                f"its checkpoint {mv.checkpoint or '(unknown)'} will not be exported again"
            )
        print(
            f"{m.name}: rolled back to version {result.target}; "
            f"TF Serving will serve version {result.highest_remaining}"
        )
        for w in result.warnings:
            _error(f"{m.name}: warning: {w}")
        return exitcodes.OK

    return _operation(args, by_label if serving is not None else action)


def _previous_stable(m: ModelConfig, stable: str) -> int:
    """The highest version of ``m`` below the one its stable label wants (for rollback)."""
    state = read_labels(m.base_path)
    current = state.want.get(stable) if state is not None else None
    owned = sorted(p.version for p in published_versions(m.base_path, m.name))
    below = [v for v in owned if current is None or v < current]
    if not below:
        raise OperationError(
            f"model {m.name!r} has no version below {current} to roll back to "
            f"(available: {', '.join(map(str, owned)) or 'none'})"
        )
    return below[-1]


def cmd_promote(args: argparse.Namespace) -> int:
    serving = _load(args.config).serving

    def action(m: ModelConfig) -> int:
        if serving is None:
            raise OperationError(
                "promote moves version labels, which need a [serving_config] table "
                "(README: Version labels)"
            )
        version = args.version
        if version is None:
            state = read_labels(m.base_path)
            version = state.want.get(serving.canary_label) if state is not None else None
            if version is None:
                raise OperationError(f"model {m.name!r} has no canary version to promote yet")
        request_move(m.base_path, m.name, "promote", version, lock_timeout=args.lock_timeout)
        print(
            f"{m.name}: asked the daemon to make version {version} {serving.stable_label}; "
            "it does so at its next rescan, once that version is loaded"
        )
        return exitcodes.OK

    return _operation(args, action)


def cmd_pin(args: argparse.Namespace) -> int:
    def action(m: ModelConfig) -> int:
        already = args.version in read_pins(m.base_path)
        pins = pin_version(m.base_path, m.name, args.version, lock_timeout=args.lock_timeout)
        what = "was already pinned" if already else "pinned: retention keeps it"
        print(f"{m.name}: version {args.version} {what} (pinned: {_pins_text(pins)})")
        return exitcodes.OK

    return _operation(args, action)


def cmd_unpin(args: argparse.Namespace) -> int:
    def action(m: ModelConfig) -> int:
        pins = unpin_version(m.base_path, m.name, args.version, lock_timeout=args.lock_timeout)
        print(
            f"{m.name}: version {args.version} unpinned: retention may remove it "
            f"(pinned: {_pins_text(pins)})"
        )
        return exitcodes.OK

    return _operation(args, action)


def cmd_accept_signature(args: argparse.Namespace) -> int:
    args.model = args.model_name or args.model

    def action(m: ModelConfig) -> int:
        accept_signature(m.base_path, m.name)
        print(
            f"{m.name}: the next version published may change its signatures "
            "(once: publishing it consumes the acceptance)"
        )
        return exitcodes.OK

    return _operation(args, action)


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
    sp.add_argument(
        "--background",
        action="store_true",
        help="run the children below other work as the daemon does (worker_nice, "
        "worker_io_class, worker_threads); by default they use every CPU at your priority",
    )
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("validate", help="validate a SavedModel the way TF Serving loads it")
    sp.add_argument("path", help="SavedModel directory (for example a version folder)")
    sp.add_argument("--json", action="store_true", help="print the full report as JSON")
    sp.add_argument(
        "--checkpoint",
        help="checkpoint prefix the SavedModel was exported from: also prove every "
        "variable holds a value from it (weight parity)",
    )
    sp.add_argument(
        "--sample-inputs",
        help=".npz with one array per signature input (INPUT, or SIGNATURE/INPUT): run on these",
    )
    sp.add_argument(
        "--golden-outputs",
        help=".npz of the outputs expected for --sample-inputs (OUTPUT, or SIGNATURE/OUTPUT)",
    )
    sp.set_defaults(func=cmd_validate)

    sp = sub.add_parser(
        "verify",
        help="re-hash a published version against its manifest (changed, missing, added files)",
        description="Re-hash every file listed in the version's "
        "assets.extra/ckpt_exporter_manifest.json and report files whose size or SHA-256 "
        "changed, files missing and files present but not listed (the commit record "
        "assets.extra/ckpt_exporter.json, written after the manifest, is not listed). "
        "On an object store each object is downloaded to a temporary file and hashed.",
        epilog="exit status: 0 intact; 65 not intact (a file changed, is missing or was "
        "added); 1 cannot verify (no manifest: a version from before manifests or not "
        "ckpt-exporter's; not a folder; an unusable bucket; the reason is on stderr); "
        "75 the object store kept failing (try again)",
    )
    sp.add_argument(
        "location",
        metavar="PATH_OR_URL",
        help="a version folder (/srv/models/m/7) or a version in a bucket (gs://b/models/m/7, "
        "s3://b/models/m/7)",
    )
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="the object store's endpoint (an S3-compatible store); default: the client "
        "library's own configuration (AWS_ENDPOINT_URL_S3, STORAGE_EMULATOR_HOST)",
    )
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser(
        "status",
        help="per model: checkpoints, versions, pending, pins, rejected (the metrics' facts)",
        description="Per model, read from disk: newest checkpoint and step, newest version "
        "published by ckpt-exporter and its step, pending checkpoints, versions on disk, "
        "last publication (UTC), pinned versions, rejected and rolled-back checkpoints, "
        "size of the newest version.",
    )
    with_config(sp)
    sp.add_argument("--json", action="store_true", help="print the rows as JSON")
    sp.set_defaults(func=cmd_status)

    op_exits = (
        "exit status: 0 done; 1 refused or failed (the reason is on stderr); "
        "75 the base-path lock stayed busy (a publication in progress: try again); "
        "78 invalid config or unknown --model"
    )

    def operator(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=description, epilog=op_exits)
        with_config(sp)
        sp.add_argument("--model", help="model name (optional with a single model)")
        sp.add_argument(
            "--lock-timeout",
            type=float,
            default=LOCK_TIMEOUT_SECONDS,
            metavar="SECONDS",
            help="how long to wait for a publication in progress (default: %(default)s)",
        )
        return sp

    sp = operator(
        "rollback",
        "take the newest versions out of TF Serving's sight; never export them again",
        "Move every version newer than the target into .ckpt-exporter/rolled-back/ "
        "(kept, not deleted), oldest first, so TF Serving goes straight from the newest "
        "version to the target, and record their checkpoints so the daemon never exports "
        "them (or older ones) again. Versions not made by ckpt-exporter are never touched. "
        "With [serving_config], move the canary and stable labels back to the target "
        "instead, deleting nothing.",
    )
    sp.add_argument(
        "--to",
        type=int,
        metavar="VERSION",
        help="version to serve (default: the second-newest version of the model; with "
        "[serving_config], the highest version below the stable one)",
    )
    sp.set_defaults(func=cmd_rollback)

    sp = operator(
        "promote",
        "make a version stable (with [serving_config])",
        "Ask the daemon to point the stable label at VERSION (default: the canary) in "
        "TF Serving's model config file, once the server has loaded it.",
    )
    sp.add_argument("version", type=int, nargs="?", metavar="VERSION")
    sp.set_defaults(func=cmd_promote)

    sp = operator(
        "pin",
        "protect a version from retention (keep_versions)",
        "Protect a version published by ckpt-exporter from retention: it is kept in "
        "addition to the newest keep_versions versions.",
    )
    sp.add_argument("version", type=int, metavar="VERSION")
    sp.set_defaults(func=cmd_pin)

    sp = operator("unpin", "let retention remove a pinned version again", "Remove a pin.")
    sp.add_argument("version", type=int, metavar="VERSION")
    sp.set_defaults(func=cmd_unpin)

    sp = operator(
        "accept-signature",
        "let the next version change its SignatureDefs (once)",
        "Let the next version of MODEL the daemon publishes break the signature contract "
        "(a signature, input or output removed or renamed, a dtype, method or shape "
        "changed): writes .ckpt-exporter/signature_accepted.json, which publishing that "
        "version consumes. A checkpoint already refused as signature_changed stays "
        "rejected; the next one is exported.",
    )
    sp.add_argument("model_name", nargs="?", metavar="MODEL", help="model name (or --model)")
    sp.set_defaults(func=cmd_accept_signature)

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
