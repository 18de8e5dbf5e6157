"""The watcher on real directories: inotify (and polling) hints, missing and recreated dirs."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon.supervisor.watch import Watcher


class Hints:
    """Collects the models the watcher hints at, from its observer thread."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.cond = threading.Condition()

    def __call__(self, model: str) -> None:
        with self.cond:
            self.seen.add(model)
            self.cond.notify_all()

    def clear(self) -> None:
        with self.cond:
            self.seen.clear()

    def wait(self, model: str, timeout: float = 10) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: model in self.seen, timeout=timeout)


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def watched(request: pytest.FixtureRequest) -> Iterator[tuple[Watcher, Hints]]:
    hints = Hints()
    w = Watcher(hints, structlog.get_logger(), force_polling=request.param)
    w.start()
    yield w, hints
    w.stop()


def test_a_change_in_a_watched_dir_is_a_hint_for_its_model(
    tmp_path: Path, watched: tuple[Watcher, Hints]
) -> None:
    w, hints = watched
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    w.sync({"a": tmp_path / "a", "b": tmp_path / "b"})
    assert w.watched() == {"a": tmp_path / "a", "b": tmp_path / "b"}
    (tmp_path / "a" / "ckpt-1.index").write_bytes(b"x")
    assert hints.wait("a")
    assert "b" not in hints.seen


def test_a_missing_dir_is_watched_through_its_parent_until_it_appears(
    tmp_path: Path, watched: tuple[Watcher, Hints]
) -> None:
    w, hints = watched
    train = tmp_path / "train"
    train.mkdir()
    dirs = {"a": train / "a" / "ckpts", "b": train / "b" / "ckpts"}
    w.sync(dirs)
    assert w.watched() == {"a": train, "b": train}
    assert w.is_standin("a") and w.is_standin("b")

    (train / "a").mkdir()  # the trainer starts: its directory's creation is a hint
    assert hints.wait("a")
    w.sync(dirs)
    assert w.watched()["a"] == train / "a"  # still a stand-in, one level closer
    dirs["a"].mkdir()
    assert hints.wait("a")
    w.sync(dirs)
    assert w.watched()["a"] == dirs["a"] and not w.is_standin("a")
    hints.clear()
    (dirs["a"] / "checkpoint").write_text("x")
    assert hints.wait("a")

    # b shared the stand-in with a; a moving on must not have taken b's watch away.
    hints.clear()
    (train / "b").mkdir()
    assert hints.wait("b")


def test_a_removed_and_recreated_dir_gets_a_new_watch(
    tmp_path: Path, watched: tuple[Watcher, Hints]
) -> None:
    w, hints = watched
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    w.sync({"m": ckpts})
    shutil.rmtree(ckpts)
    assert hints.wait("m")
    w.sync({"m": ckpts})
    assert w.is_standin("m")
    ckpts.mkdir()
    w.sync({"m": ckpts})
    assert w.watched() == {"m": ckpts}
    hints.clear()
    time.sleep(0.1)
    (ckpts / "ckpt-1.index").write_bytes(b"x")
    assert hints.wait("m")


def test_models_sharing_one_dir_keep_their_hints_when_one_is_dropped(
    tmp_path: Path, watched: tuple[Watcher, Hints]
) -> None:
    w, hints = watched
    w.sync({"a": tmp_path, "b": tmp_path})
    w.sync({"b": tmp_path})
    assert w.watched() == {"b": tmp_path}
    (tmp_path / "f").write_text("x")
    assert hints.wait("b")
    assert "a" not in hints.seen
