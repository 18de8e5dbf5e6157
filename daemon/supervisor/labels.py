"""The model config file and version labels, kept in step with the models (``[serving_config]``).

Each model's :class:`~daemon.rules.labels.LabelState` lives in its base
path's state folder (``labels.json``, written only by the daemon). Operators
ask for a label move with ``ckpt-exporter promote`` or ``rollback``, which
leave a request (``label_requests.json``) that the daemon takes at its next
rescan. On every turn of the loop :meth:`Labels.tick`:

1. runs the promotion rules: ``immediately`` / ``after:<duration>`` once the
   canary label points at a version, ``command`` by running the model's
   ``promote_command`` once per canary version (exit 0 promotes);
2. plans each model's config entry (:func:`daemon.rules.labels.plan`): the
   labelled and wanted versions, labels moved only onto loaded versions;
3. when any entry changed, writes the whole file (every model, after the
   base config's), then records each changed model's state. In that order:
   a state never says a version was listed before a config listing it was
   written, so a label never moves early.

Publication calls :meth:`Labels.published`: the new version becomes the
canary; so does a newer version someone else published (``ckpt-exporter
export``, another daemon), or the newest one when ``[serving_config]`` is
first set. The versions a config lists are kept from retention
(``ModelState.serving_versions``).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from typing import Any

from daemon.basepath.layout import LABEL_REQUESTS_NAME, LABELS_NAME
from daemon.basepath.storage import storage_for
from daemon.config.serving import ServingConfig
from daemon.rules import labels as rules
from daemon.rules.labels import LabelState, ModelEntry
from daemon.supervisor.context import Context
from daemon.supervisor.launcher import kill_group
from daemon.supervisor.reporting import report_once
from daemon.supervisor.state import ModelState
from daemon.tfserving.model_config import ConfigConflict, render, write_config
from daemon.tfserving.status import loaded_versions

#: At most one status request per model this often, while a label waits for a load.
STATUS_EVERY_SECONDS = 2.0


@dataclass
class _Promoting:
    """A ``promote_command`` running for one canary version."""

    version: int
    proc: subprocess.Popen[bytes]
    deadline: float


class Labels:
    """Keeps the model config file and labels; see the module docstring."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.states: dict[str, LabelState] = {}
        self.entries: dict[str, ModelEntry | None] = {}
        self._text: str | None = None
        self._token: str | None = None
        self._promoting: dict[str, _Promoting] = {}
        self._asked: dict[str, float] = {}
        self._loaded: dict[str, set[int] | None] = {}

    @property
    def serving(self) -> ServingConfig | None:
        return self.ctx.config.serving

    # --- events from the loop ---------------------------------------------------

    def load(self, st: ModelState) -> None:
        """Read the model's label state from its base path (at start and for a new model)."""
        name = st.cfg.name
        try:
            data = storage_for(st.cfg.base_path).read_record(LABELS_NAME)
        except FileNotFoundError:
            self.states[name] = LabelState()
            return
        except (OSError, ValueError) as e:
            report_once(self.ctx.log, st, "labels", "labels_unreadable", error=str(e))
            self.states[name] = LabelState()
            return
        try:
            self.states[name] = rules.from_json(data)
        except ValueError as e:
            report_once(self.ctx.log, st, "labels", "labels_unreadable", error=str(e))
            self.states[name] = LabelState()

    def published(self, st: ModelState, version: int) -> None:
        """``version`` was just published: make it the canary."""
        serving = self.serving
        if serving is None:
            return
        state = self._state(st)
        self.states[st.cfg.name] = rules.after_publish(
            state, version, serving.canary_label, serving.stable_label
        )

    def take_requests(self, st: ModelState) -> None:
        """Apply an operator's promote or rollback request left in the base path, then drop it."""
        serving = self.serving
        if serving is None:
            return
        storage = storage_for(st.cfg.base_path)
        try:
            request = storage.read_record(LABEL_REQUESTS_NAME)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            report_once(self.ctx.log, st, "label_request", "label_request_unreadable", error=str(e))
            return
        state = self._state(st)
        op, version = _request(request)
        if op == "promote" and version is not None:
            state = rules.promote(state, version, serving.stable_label)
        elif op == "rollback" and version is not None:
            state = rules.roll_back(state, version, serving.canary_label, serving.stable_label)
        else:
            self.ctx.log.warning("label_request_ignored", model=st.cfg.name, request=request)
        self.states[st.cfg.name] = state
        self.ctx.log.info("label_request_taken", model=st.cfg.name, op=op, version=version)
        try:
            storage.delete_record(LABEL_REQUESTS_NAME)
        except OSError as e:
            report_once(self.ctx.log, st, "label_request", "label_request_stuck", error=str(e))

    # --- every turn ---------------------------------------------------------------

    def tick(self, models: dict[str, ModelState], now: float | None = None) -> None:
        """Promote what is due, plan every entry, write the file if anything changed."""
        serving = self.serving
        if serving is None:
            return
        now = time.time() if now is None else now
        planned: dict[str, LabelState] = {}
        for name, st in models.items():
            if st.retiring:
                continue
            present = {p.version for p in st.published}
            unseen = rules.newest_unseen(self._state(st), present)
            if unseen is not None:
                self.published(st, unseen)
            self._run_rules(st, serving, now)
            state = self._state(st)
            loaded = self._loaded_now(st, state, serving, now)
            entry, new = rules.plan(state, now, serving.load_wait_seconds, loaded, present)
            self.entries[name] = entry
            planned[name] = new
            st.serving_versions = frozenset(new.listed) | frozenset(new.want.values())
            st.stable_version = new.written.get(serving.stable_label)
        if self._write(models, serving):
            self._record(models, planned)

    def _state(self, st: ModelState) -> LabelState:
        if st.cfg.name not in self.states:
            self.load(st)
        return self.states[st.cfg.name]

    def _loaded_now(
        self, st: ModelState, state: LabelState, serving: ServingConfig, now: float
    ) -> set[int] | None:
        """The server's loaded versions (asked at most every few seconds), or None: time bound."""
        if not serving.server_address:
            return None
        name = st.cfg.name
        waiting = any(state.written.get(k) != v for k, v in state.want.items())
        if waiting and now - self._asked.get(name, 0.0) >= STATUS_EVERY_SECONDS:
            self._asked[name] = now
            self._loaded[name] = loaded_versions(serving.server_address, name)
            if self._loaded[name] is None:
                report_once(
                    self.ctx.log,
                    st,
                    "status",
                    "serving_status_unavailable",
                    server=serving.server_address,
                    hint="labels stay where they are until the server answers",
                )
            else:
                st.reported.discard("status")
        # A server that cannot be asked loads nothing as far as labels go.
        return self._loaded.get(name) or set()

    def _write(self, models: dict[str, ModelState], serving: ServingConfig) -> bool:
        """Write the config file when its text changed; False when it could not be written."""
        listed = {
            name: (str(models[name].cfg.base_path), entry)
            for name, entry in self.entries.items()
            if entry is not None and name in models and not models[name].retiring
        }
        try:
            base = serving.base_config.read_text(encoding="utf-8") if serving.base_config else None
            text = render(listed, base)
        except (OSError, ValueError) as e:
            self.ctx.log.error("serving_config_unusable", path=str(serving.path), error=str(e))
            return False
        if text == self._text:
            return True
        try:
            self._token = write_config(serving.path, text, self._token)
        except ConfigConflict as e:
            self.ctx.log.warning("serving_config_conflict", path=str(serving.path), error=str(e))
            self._token = None  # written again, unconditionally, on the next turn
            return False
        except OSError as e:
            self.ctx.log.error("serving_config_write_failed", path=str(serving.path), error=str(e))
            return False
        self._text = text
        self.ctx.log.info(
            "serving_config_written",
            path=str(serving.path),
            models={
                n: {"versions": list(e.versions), "labels": dict(e.labels)}
                for n, (_, e) in listed.items()
            },
        )
        return True

    def _record(self, models: dict[str, ModelState], planned: dict[str, LabelState]) -> None:
        """Keep each changed state, in memory and in its base path."""
        for name, new in planned.items():
            if new == self.states.get(name):
                continue
            self.states[name] = new
            try:
                storage_for(models[name].cfg.base_path).write_record(
                    LABELS_NAME, rules.to_json(new)
                )
            except OSError as e:
                report_once(
                    self.ctx.log, models[name], "labels_write", "labels_unwritable", error=str(e)
                )

    # --- promotion rules ------------------------------------------------------------

    def _run_rules(self, st: ModelState, serving: ServingConfig, now: float) -> None:
        name, rule = st.cfg.name, st.cfg.promote
        state = self._state(st)
        if rule == "command":
            self._command_rule(st, serving, now)
            return
        version = rules.due_promotion(state, rule, now, serving.canary_label, serving.stable_label)
        if version is not None:
            self.states[name] = rules.promote(state, version, serving.stable_label)
            self.ctx.log.info("promoted", model=name, version=version, rule=rule)

    def _command_rule(self, st: ModelState, serving: ServingConfig, now: float) -> None:
        name, state = st.cfg.name, self._state(st)
        running = self._promoting.get(name)
        if running is not None:
            self._command_done(st, running, serving, now)
            return
        version = state.written.get(serving.canary_label)
        if version is None or version in state.decided:
            return
        if version <= state.want.get(serving.stable_label, -1):
            self.states[name] = rules.decide(state, version)
            return
        argv = [
            w.format(model=name, version=version, base_path=str(st.cfg.base_path))
            for w in st.cfg.promote_command
        ]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            self.ctx.log.error("promote_command_unusable", model=name, argv=argv, error=str(e))
            self.states[name] = rules.decide(state, version)
            return
        deadline = now + self.ctx.config.daemon.export_timeout_seconds
        self._promoting[name] = _Promoting(version, proc, deadline)
        self.ctx.log.info("promote_command_started", model=name, version=version, pid=proc.pid)

    def _command_done(
        self, st: ModelState, running: _Promoting, serving: ServingConfig, now: float
    ) -> None:
        name, state = st.cfg.name, self._state(st)
        code = running.proc.poll()
        if code is None:
            if now < running.deadline:
                return
            kill_group(running.proc)
            code = running.proc.wait()
        del self._promoting[name]
        if code == 0:
            self.states[name] = rules.promote(state, running.version, serving.stable_label)
            self.ctx.log.info("promoted", model=name, version=running.version, rule="command")
        else:
            self.states[name] = rules.decide(state, running.version)
            self.ctx.log.info(
                "promotion_refused", model=name, version=running.version, exit_status=code
            )

    def close(self) -> None:
        """Stop running promote commands (shutdown); their versions are decided again later."""
        for running in self._promoting.values():
            kill_group(running.proc)
        self._promoting.clear()


def _request(data: Any) -> tuple[str | None, int | None]:
    if not isinstance(data, dict):
        return None, None
    op, version = data.get("op"), data.get("version")
    if not isinstance(op, str) or isinstance(version, bool) or not isinstance(version, int):
        return (op if isinstance(op, str) else None), None
    return op, version
