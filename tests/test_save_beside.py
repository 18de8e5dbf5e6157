"""The reference pass beside the save (``daemon.children.model._save_beside``), without TensorFlow.

Both run for real, on two threads; what is checked is the contract: the
outputs of the run, both finished before anything is returned or raised,
and the save's error ahead of the run's.
"""

from __future__ import annotations

import threading

import pytest

from daemon.children.model import _save_beside


def test_the_run_goes_on_a_thread_of_its_own_while_the_save_runs_here() -> None:
    saving = threading.Event()
    seen: dict[str, object] = {}

    def save() -> None:
        seen["save_thread"] = threading.current_thread()
        saving.set()

    def run() -> dict[str, object]:
        # Waits for the save to have started: only possible side by side.
        assert saving.wait(10)
        seen["run_thread"] = threading.current_thread()
        return {"output_0": 1}

    assert _save_beside(save, run) == {"output_0": 1}
    assert seen["save_thread"] is threading.current_thread()
    assert seen["run_thread"] is not threading.current_thread()


def test_a_failed_save_is_raised_after_the_run_ended() -> None:
    ended = threading.Event()

    def save() -> None:
        raise OSError("disk full")

    def run() -> dict[str, object]:
        ended.wait(0.2)
        ended.set()
        return {}

    with pytest.raises(OSError, match="disk full"):
        _save_beside(save, run)
    assert ended.is_set()


def test_a_failed_run_is_raised_after_the_save_ended() -> None:
    saved = []

    def run() -> dict[str, object]:
        raise ValueError("the model cannot take these inputs")

    with pytest.raises(ValueError, match="cannot take these inputs"):
        _save_beside(lambda: saved.append(True), run)
    assert saved == [True]


def test_when_both_fail_the_saves_error_is_the_one_raised() -> None:
    def save() -> None:
        raise OSError("disk full")

    def run() -> dict[str, object]:
        raise ValueError("bad inputs")

    with pytest.raises(OSError, match="disk full"):
        _save_beside(save, run)
