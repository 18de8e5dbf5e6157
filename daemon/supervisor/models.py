"""The model table: models loaded from the base path at start, and changed by a reload.

:meth:`Models.load` rebuilds a model's state from its base path (versions,
rejected checkpoints) after cleaning up what a crash left behind.
:meth:`Models.apply` takes a new config: models added start at once; a
model removed or changed while it exports keeps its job's config until the
job ends, when the loop calls :meth:`Models.settle`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from daemon import logs
from daemon.basepath.publish import prepare_base_path
from daemon.basepath.records import read_rejected
from daemon.config.loading import Config, ModelConfig
from daemon.sources import SOURCES
from daemon.supervisor.context import Context
from daemon.supervisor.publishing import Publisher
from daemon.supervisor.reporting import pause_if_bucket_unusable, report_once
from daemon.supervisor.state import ModelState


@dataclass
class Changes:
    """What a reload changed, by model name (for the ``reloaded`` log line)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)


class Models:
    """Adds, reloads and drops models in ``ctx.models``; see the module docstring."""

    def __init__(self, ctx: Context, publisher: Publisher, log_format_override: str | None):
        self.ctx = ctx
        self.publisher = publisher
        self.log_format_override = log_format_override
        for m in ctx.config.models:
            ctx.models[m.name] = _new_state(m)

    def load(self, st: ModelState) -> None:
        """Clean up after a crash in the model's base path, then read its state from there."""
        base = st.cfg.base_path
        try:
            # Temp folders and staging of processes that are gone (another daemon
            # or `ckpt-exporter export` on this base path may be exporting now),
            # and versions retention hid but had not deleted yet.
            for p in prepare_base_path(base):
                self.ctx.log.info("removed_stale_temp_dir", model=st.cfg.name, path=str(p))
        except OSError as e:
            if pause_if_bucket_unusable(self.ctx.log, st, e, str(base)):
                return
            report_once(
                self.ctx.log,
                st,
                "base_path",
                "base_path_unusable",
                path=str(base),
                error=str(e),
                hint="create it and make it writable by the daemon",
            )
        st.rejected = read_rejected(base)
        self.publisher.refresh(st)
        newest = st.newest
        if newest is not None:
            st.last_publish_time = float(newest.metadata.get("published_at", 0)) or None
            if st.last_publish_time is not None:
                # Restored from disk so that a restart does not look like "never published".
                self.ctx.metrics.last_publish.labels(st.cfg.name).set(st.last_publish_time)

    def apply(self, new: Config) -> Changes:
        """Put ``new`` in force (the metrics address excepted: it is bound at start)."""
        old = self.ctx.config
        if new.daemon.metrics_address != old.daemon.metrics_address:
            self.ctx.log.warning(
                "reload_needs_restart",
                key="daemon.metrics_address",
                kept=old.daemon.metrics_address,
                hint="the listener is bound at start; restart the service to move it",
            )
            daemon = dataclasses.replace(new.daemon, metrics_address=old.daemon.metrics_address)
            new = dataclasses.replace(new, daemon=daemon)
        if (new.daemon.log_level, new.daemon.log_format) != (
            old.daemon.log_level,
            old.daemon.log_format,
        ):
            logs.configure(self.log_format_override or new.daemon.log_format, new.daemon.log_level)
        self.ctx.config = new
        changes = self._apply_models({m.name: m for m in new.models})
        for name, st in self.ctx.models.items():
            # A reload is how the user says "I fixed the builder": its code
            # may have changed even where the config did not.
            if st.paused is not None:
                st.paused = None
                changes.resumed.append(name)
        return changes

    def _apply_models(self, wanted: dict[str, ModelConfig]) -> Changes:
        changes = Changes()
        for name, st in list(self.ctx.models.items()):
            if name not in wanted:
                changes.removed.append(name)
                st.retiring, st.next_cfg = True, None
                if st.job is None:
                    self.drop(name)
            elif wanted[name] != st.cfg or st.retiring:
                changes.changed.append(name)
                st.retiring = False
                if st.job is None:
                    self.switch(st, wanted[name])
                else:
                    st.next_cfg = wanted[name]
        for name, cfg in wanted.items():
            if name not in self.ctx.models:
                changes.added.append(name)
                self.add(cfg)
        return changes

    def add(self, cfg: ModelConfig) -> None:
        st = self.ctx.models[cfg.name] = _new_state(cfg)
        self.ctx.metrics.init_model(cfg.name)
        self.load(st)

    def switch(self, st: ModelState, cfg: ModelConfig) -> None:
        """Give an idle model its new config (a new source, a new base path read afresh)."""
        old = st.cfg
        st.cfg, st.next_cfg = cfg, None
        if (cfg.source, cfg.options) != (old.source, old.options):
            st.source = SOURCES[cfg.source].scanner(cfg.options)
        if cfg.base_path != old.base_path:
            st.reported.clear()
            self.load(st)
        st.dirty = True

    def drop(self, name: str) -> None:
        self.ctx.models.pop(name, None)
        self.ctx.metrics.forget_model(name)
        self.ctx.log.info("model_removed", model=name)

    def settle(self, st: ModelState) -> bool:
        """Apply the reload that waited for ``st``'s job to end; True if the model was dropped."""
        if st.retiring and self.ctx.models.get(st.cfg.name) is st:
            self.drop(st.cfg.name)
            return True
        if st.next_cfg is not None:
            self.switch(st, st.next_cfg)
        return False


def _new_state(cfg: ModelConfig) -> ModelState:
    return ModelState(cfg=cfg, source=SOURCES[cfg.source].scanner(cfg.options))
