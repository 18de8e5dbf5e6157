"""Filesystem watching: events are hints, never the truth.

A watchdog observer (inotify on Linux) turns any change in a checkpoint
directory into a *hint* for that model; the supervisor then rescans the
directory and decides from what is on disk. The supervisor also rescans every
``rescan_interval_seconds`` regardless, because network filesystems emit no
events and inotify drops them when its queue overflows.

A checkpoint directory that does not exist yet is watched through its
nearest existing ancestor, so the trainer creating it is a hint as well.

When native watching cannot start (``fs.inotify.max_user_watches`` reached,
a filesystem without inotify support) the watcher falls back to watchdog's
polling observer and says so once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

#: Events that only say a file was read (watchdog reports IN_OPEN and
#: IN_CLOSE_NOWRITE). Our own scan reads the state file and the indexes, so
#: taking these as hints would make every scan trigger the next one: a busy
#: loop burning a core while idle, and starving the exports.
_READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})


class _Hint(FileSystemEventHandler):
    def __init__(self, model: str, notify: Callable[[str], None]) -> None:
        self.model = model
        self.notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Runs on the observer's thread: only enqueue, the main loop does the work.
        if event.event_type not in _READ_ONLY_EVENTS:
            self.notify(self.model)


@dataclass
class _Watch:
    path: Path  # what is watched: the model's directory, or a stand-in ancestor
    ident: tuple[int, int]  # its (st_dev, st_ino): a recreated folder needs a new watch
    handle: Any  # watchdog's ObservedWatch, shared by every handler on one path
    handler: _Hint
    standin: bool  # the model's directory does not exist yet


class Watcher:
    """Keeps one watch per model directory; ``sync`` is idempotent.

    A directory that does not exist yet is stood in for by its nearest
    existing ancestor, so that its creation is a hint too, not something the
    periodic rescan finds up to ``rescan_interval_seconds`` later. On a hint
    for such a model (:meth:`is_standin`) the caller syncs again, and the new
    directory gets its own watch.
    """

    def __init__(self, notify: Callable[[str], None], log: Any, force_polling: bool = False):
        self._notify = notify
        self._log = log
        self._lock = threading.Lock()
        self._observer: Any = PollingObserver() if force_polling else Observer()
        self.backend = "polling" if force_polling else type(self._observer).__name__
        self._watches: dict[str, _Watch] = {}
        self._started = False

    def start(self) -> None:
        try:
            self._observer.start()
        except OSError as e:
            self._fall_back(e)
        self._started = True

    def _fall_back(self, error: OSError) -> None:
        self._log.warning(
            "watch_fallback_polling",
            error=str(error),
            hint="native watching failed (raise fs.inotify.max_user_watches?); polling instead",
        )
        # The native observer may be half-started; it is discarded either way.
        with contextlib.suppress(Exception):
            self._observer.stop()
        self._observer = PollingObserver()
        self.backend = "polling"
        old = self._watches
        self._watches = {}
        self._observer.start()
        for model, w in old.items():
            self._schedule(model, w.path, w.ident, w.standin)

    def _schedule(self, model: str, path: Path, ident: tuple[int, int], standin: bool) -> None:
        handler = _Hint(model, self._notify)
        handle = self._observer.schedule(handler, str(path), recursive=False)
        self._watches[model] = _Watch(path, ident, handle, handler, standin)

    def _drop(self, model: str) -> None:
        w = self._watches.pop(model)
        # Models may share a path (a common missing parent, one checkpoint
        # dir): watchdog keeps one watch per path, so only the last user
        # unschedules it; the others just take their handler off.
        with contextlib.suppress(KeyError, OSError):
            if any(o.handle == w.handle for o in self._watches.values()):
                self._observer.remove_handler_for_watch(w.handler, w.handle)
            else:
                self._observer.unschedule(w.handle)

    def sync(self, dirs: Mapping[str, Path]) -> None:
        """Watch every directory in ``dirs``, or a stand-in; drop models not in ``dirs``.

        A directory that was removed and recreated has a new inode and gets a
        new watch (the old inotify watch died with the old inode).
        """
        with self._lock:
            for model in list(self._watches):
                if model not in dirs:
                    self._drop(model)
            for model, path in dirs.items():
                target = _existing_self_or_ancestor(path)
                if target is None:
                    continue
                where, ident = target
                w = self._watches.get(model)
                if w is not None and (w.path, w.ident) == (where, ident):
                    continue
                if w is not None:
                    self._drop(model)
                try:
                    self._schedule(model, where, ident, standin=where != path)
                except FileNotFoundError:
                    continue  # gone between the stat and the watch: the next sync retries
                except OSError as e:
                    self._fall_back(e)
                    self._schedule(model, where, ident, standin=where != path)

    def is_standin(self, model: str) -> bool:
        """Whether ``model``'s directory is missing and watched through an ancestor."""
        w = self._watches.get(model)
        return w is not None and w.standin

    def watched(self) -> dict[str, Path]:
        """What each model's watch is on (its directory, or the stand-in ancestor)."""
        return {m: w.path for m, w in sorted(self._watches.items())}

    def alive(self) -> bool:
        return not self._started or bool(self._observer.is_alive())

    def stop(self) -> None:
        if self._started:
            self._observer.stop()
            self._observer.join(timeout=5)


def _existing_self_or_ancestor(path: Path) -> tuple[Path, tuple[int, int]] | None:
    """``path`` or its nearest existing ancestor, with its identity (None: nothing exists)."""
    for candidate in (path, *path.parents):
        ident = _ident(candidate)
        if ident is not None and candidate.is_dir():
            return candidate, ident
    return None


def _ident(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
