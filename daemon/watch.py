"""Filesystem watching: events are hints, never the truth.

A watchdog observer (inotify on Linux) turns any change in a checkpoint
directory into a *hint* for that model; the supervisor then rescans the
directory and decides from what is on disk. The supervisor also rescans every
``rescan_interval_seconds`` regardless, because network filesystems emit no
events and inotify drops them when its queue overflows.

When native watching cannot start (``fs.inotify.max_user_watches`` reached,
a filesystem without inotify support) the watcher falls back to watchdog's
polling observer and says so once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping
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


class Watcher:
    """Keeps one watch per model directory that exists; ``sync`` is idempotent."""

    def __init__(self, notify: Callable[[str], None], log: Any, force_polling: bool = False):
        self._notify = notify
        self._log = log
        self._lock = threading.Lock()
        self._observer: Any = PollingObserver() if force_polling else Observer()
        self.backend = "polling" if force_polling else type(self._observer).__name__
        # model -> (watched path, its (st_dev, st_ino), the watch handle)
        self._watches: dict[str, tuple[Path, tuple[int, int], Any]] = {}
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
        for model, (path, ident, _w) in old.items():
            self._schedule(model, path, ident)

    def _schedule(self, model: str, path: Path, ident: tuple[int, int]) -> None:
        handle = self._observer.schedule(_Hint(model, self._notify), str(path), recursive=False)
        self._watches[model] = (path, ident, handle)

    def sync(self, dirs: Mapping[str, Path]) -> None:
        """Watch every directory in ``dirs`` that exists; drop the others.

        A directory that was removed and recreated has a new inode and gets a
        new watch (the old inotify watch died with the old inode). Missing
        directories are simply not watched yet: the periodic rescan notices
        when they appear.
        """
        with self._lock:
            for model in list(self._watches):
                path, ident, handle = self._watches[model]
                current = _ident(dirs.get(model))
                if dirs.get(model) != path or current != ident:
                    self._unschedule(handle)
                    del self._watches[model]
            for model, path in dirs.items():
                if model in self._watches:
                    continue
                found = _ident(path)
                if found is None:
                    continue
                try:
                    self._schedule(model, path, found)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    self._fall_back(e)
                    self._schedule(model, path, found)

    def _unschedule(self, handle: Any) -> None:
        # The watch may already be gone with its directory.
        with contextlib.suppress(KeyError, OSError):
            self._observer.unschedule(handle)

    def watched(self) -> list[str]:
        return sorted(self._watches)

    def alive(self) -> bool:
        return not self._started or bool(self._observer.is_alive())

    def stop(self) -> None:
        if self._started:
            self._observer.stop()
            self._observer.join(timeout=5)


def _ident(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
