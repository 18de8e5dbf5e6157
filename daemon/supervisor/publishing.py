"""The publish step of a job, and retention: one validated export becomes the next version.

:meth:`Publisher.publish` returns what happened (:class:`Published`,
:class:`Skipped`, :class:`LockBusy` or :class:`PublishFailed`) and ends
nothing itself; the pipeline acts on it. Under the base-path lock it re-reads
the base path (another publisher may have published the same checkpoint, or
``ckpt-exporter rollback`` ruled it out meanwhile), chooses the version by
the model's ``version_policy`` (never a number that was rolled back), writes
the export's provenance manifest (:mod:`daemon.basepath.manifest`: every
file hashed, so on an object store this runs in the I/O threads with the
upload), renames the export into place
(:func:`daemon.basepath.publish.publish`) and applies retention from a
fresh listing, so that a pin or a rollback cannot race a deletion.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.basepath.catalog import published_versions
from daemon.basepath.layout import REPORT_RELPATH
from daemon.basepath.manifest import (
    build_manifest,
    builder_provenance,
    config_sha256,
    write_manifest,
)
from daemon.basepath.operations import RolledBack, load_rolled_back, read_pins
from daemon.basepath.publish import BasePathLock, publish, remove_version
from daemon.config.builders import model_builder_file
from daemon.objectstore.client import CONFIGURATION_KINDS, ObjectStoreError
from daemon.objectstore.url import Location
from daemon.rules.versions import VersionError, next_version, plan_retention, step_version
from daemon.sources import Checkpoint
from daemon.supervisor.context import Context
from daemon.supervisor.reporting import report_once
from daemon.supervisor.reuse import library_versions
from daemon.supervisor.state import Job, ModelState


@dataclass(frozen=True)
class Published:
    version: int
    path: Location


@dataclass(frozen=True)
class Skipped:
    """Nothing to publish: ``event`` (logged with ``fields``) says why; the job just ends."""

    event: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class LockBusy:
    """Another process holds the base-path lock: try again on the next turn of the loop."""

    lock: Location
    holder: str


@dataclass(frozen=True)
class PublishFailed:
    reason: str
    message: str
    permanent: bool


PublishOutcome = Published | Skipped | LockBusy | PublishFailed


def _checkpoint_files(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """Name and size of each file of ``ckpt`` (as the scan saw them, or as they are now)."""
    if ckpt.sizes:
        return [{"name": f.name, "bytes": n} for f, n in zip(ckpt.files, ckpt.sizes, strict=True)]
    return [
        {"name": p.name, "bytes": p.stat().st_size}
        for p in ckpt.files
        if isinstance(p, Path) and p.exists()
    ]


def _failed(what: str, e: OSError) -> PublishFailed:
    """A storage failure: the model pauses when the bucket is unusable, else a retry."""
    message = f"{what}: {type(e).__name__}: {e}"
    if isinstance(e, ObjectStoreError) and e.kind in CONFIGURATION_KINDS:
        return PublishFailed("object_store_unusable", message, permanent=True)
    return PublishFailed("publish_failed", message, False)


class Publisher:
    """Publishes jobs' exports and applies retention; reads the base path into model state."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def publish(self, job: Job) -> PublishOutcome:
        """Publish ``job``'s validated export under the lock; see the module docstring."""
        st, cfg = job.model, job.model.cfg
        try:
            lock = BasePathLock(cfg.base_path)
            if not lock.try_acquire():
                return LockBusy(lock.path, lock.holder())
        except OSError as e:  # a lease object on a failing bucket
            return _failed(f"cannot take the publish lock of {cfg.base_path}", e)
        assert job.temp_dir is not None
        with lock:
            rolled_back = load_rolled_back(cfg.base_path)
            skip = self._nothing_to_publish(job, rolled_back)
            if skip is not None:
                return skip
            choose = self._chooser(job, rolled_back.highest_version)
            try:
                self.write_manifest(job)
            except OSError as e:
                return _failed(f"cannot write the manifest into {job.temp_dir}", e)
            try:
                version, path = publish(job.temp_dir, cfg.base_path, choose, self.metadata(job))
            except VersionError as e:
                return PublishFailed("version_refused", str(e), permanent=True)
            except OSError as e:
                return _failed(f"cannot publish into {cfg.base_path}", e)
            job.temp_dir = None  # it is the version now
            self.refresh(st)
            self.retention(st)
        return Published(version, path)

    def _nothing_to_publish(
        self, job: Job, rolled_back: RolledBack
    ) -> Skipped | PublishFailed | None:
        """Why ``job`` must not be published after all (read under the lock), or None."""
        st = job.model
        # Another publisher (a second daemon, `ckpt-exporter export`) may have
        # published this checkpoint while we exported it: re-read the base
        # path under the lock so it is never published twice.
        self.refresh(st)
        twin = [p for p in st.published if p.fingerprint == job.ckpt.fingerprint]
        if twin:
            hint = "another publisher on this base path got there first"
            return Skipped("already_published", {"version": twin[0].version, "hint": hint})
        # The record was read under the lock, not taken from the scan: a
        # rollback may have run during the export.
        if rolled_back.problem is not None:
            # Never publish blind: the record may list this very checkpoint.
            return PublishFailed("publish_failed", rolled_back.problem.message, permanent=False)
        if rolled_back.rules_out(job.ckpt.fingerprint, job.ckpt.written_ns):
            hint = "`ckpt-exporter rollback` ruled this checkpoint out during its export"
            return Skipped("rolled_back_meanwhile", {"hint": hint})
        return None

    def _chooser(self, job: Job, floor: int) -> Callable[[list[int]], int]:
        """The version rule of the model, given the versions present (as TF Serving parses them).

        ``floor`` is the highest version ever rolled back: never reuse a number
        that was rolled back, since a server that served it, or saw it fail,
        must not take another model for it.
        """
        if job.model.cfg.version_policy == "step":
            step = job.step
            return lambda existing: step_version(step, [*existing, floor])
        return lambda existing: next_version([*existing, floor])

    def write_manifest(self, job: Job) -> None:
        """Write the provenance manifest into ``job``'s complete export (before publication).

        Hashes every file of the export and the builder's source files, asks
        git about the builder's checkout (bounded by a timeout); see
        :mod:`daemon.basepath.manifest` for what it records. Raises
        ``OSError`` when a file of the export cannot be read or the manifest
        cannot be written.
        """
        cfg = job.model.cfg
        assert job.temp_dir is not None and job.export_result is not None
        metric = job.gate.get("metric")
        gate = (
            {"metric": metric.get("metric"), "value": metric.get("value")}
            if isinstance(metric, dict)
            else None
        )
        builder = builder_provenance(
            cfg.builder,
            model_builder_file(cfg),
            job.export_result.get("code_files", {}),
        )
        checkpoint = {
            "fingerprint": job.ckpt.fingerprint,
            "step": job.step,
            "prefix": str(job.ckpt.prefix),
        }
        manifest = build_manifest(
            job.temp_dir,
            model=cfg.name,
            checkpoint=checkpoint,
            builder=builder,
            config_digest=config_sha256(cfg),
            libraries={"ckpt-exporter": __version__, **library_versions(cfg)},
            gate=gate,
        )
        write_manifest(job.temp_dir, manifest)

    def metadata(self, job: Job) -> dict[str, Any]:
        """What the version records about itself (``assets.extra/ckpt_exporter.json``)."""
        files = _checkpoint_files(job.ckpt)
        assert job.export_result is not None and job.validation is not None
        exported, validation = job.export_result, job.validation
        return {
            "tool": "ckpt-exporter",
            "tool_version": __version__,
            "model": job.model.cfg.name,
            "checkpoint": {
                "prefix": str(job.ckpt.prefix),
                "step": job.step,
                "fingerprint": job.ckpt.fingerprint,
                "written_ns": job.ckpt.written_ns,
                "files": files,
                "saved_counters": exported["saved_counters"],
            },
            "export": {k: v for k, v in exported.items() if k not in ("ok", "code_files")},
            # Which later exports may reuse this version's graph (daemon.children.incremental).
            "export_key": job.graph_key,
            "validation": {
                "report": str(REPORT_RELPATH),
                "checks": [c["check"] for c in validation["checks"]],
                "signatures": validation["signatures"],
                "weights": validation.get("weights"),
                "warmup": validation.get("warmup"),
                "durations": validation["durations"],
            },
            # The metric decision is what "better_than = last_published" compares with next.
            "gate": job.gate.get("metric"),
            "gate_command": job.gate.get("command"),
            "durations_seconds": {k: round(v, 3) for k, v in job.durations.items()},
            "exported_at": time.time(),
        }

    def retention(self, st: ModelState) -> None:
        """Remove versions beyond ``keep_versions``, oldest first.

        Never a pinned one, nor one the model config lists or a label wants
        (TF Serving would fail to load a listed version that is gone).
        """
        doomed = plan_retention(
            [p.version for p in st.published],
            st.cfg.keep_versions,
            protected=read_pins(st.cfg.base_path) | st.serving_versions,
        )
        if not doomed:
            return
        by_version = {p.version: p for p in st.published}
        for v in doomed:
            try:
                remove_version(by_version[v].path)
            except OSError as e:
                self.ctx.log.warning(
                    "version_remove_failed", model=st.cfg.name, version=v, error=str(e)
                )
                continue
            self.ctx.log.info(
                "version_removed", model=st.cfg.name, version=v, keep_versions=st.cfg.keep_versions
            )
        self.refresh(st)

    def refresh(self, st: ModelState) -> None:
        """Re-read this model's versions from the base path (kept as they were if unreadable)."""
        try:
            st.published = published_versions(st.cfg.base_path, st.cfg.name)
        except OSError as e:
            report_once(
                self.ctx.log,
                st,
                "base_path_read",
                "base_path_unreadable",
                path=str(st.cfg.base_path),
                error=str(e),
                hint="make the base path readable and writable by the daemon's user",
            )
            return
        st.reported.discard("base_path_read")
        name, metrics = st.cfg.name, self.ctx.metrics
        metrics.versions_on_disk.labels(name).set(len(st.published))
        newest = st.newest
        if newest is not None:
            metrics.latest_version.labels(name).set(newest.version)
            if newest.step is not None:
                metrics.latest_step.labels(name).set(newest.step)
