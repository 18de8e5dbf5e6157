"""The /healthz verdict as a pure function of the main loop's snapshot."""

from __future__ import annotations

import pytest

from daemon.rules.health import HealthSnapshot, evaluate


def verdict(snap: HealthSnapshot, mono: float, wall: float) -> tuple[bool, list[str]]:
    ok, body = evaluate(
        snap, now_monotonic=mono, now_wall=wall, stall_seconds=60, failing_seconds=3600
    )
    assert body["status"] == ("ok" if ok else "unhealthy")
    return ok, [f"{p['problem']}:{p.get('model', '')}" for p in body["problems"]]


@pytest.mark.parametrize(
    ("last_turn", "now", "healthy"),
    [(100.0, 100.0, True), (100.0, 160.0, True), (100.0, 160.1, False), (100.0, 50.0, True)],
)
def test_a_loop_that_stops_turning_is_unhealthy(
    last_turn: float, now: float, healthy: bool
) -> None:
    ok, problems = verdict(HealthSnapshot(loop_monotonic=last_turn), now, 0.0)
    assert ok is healthy
    assert problems == ([] if healthy else ["main_loop_stalled:"])


def test_a_model_failing_for_too_long_is_named() -> None:
    snap = HealthSnapshot(
        loop_monotonic=10.0,
        failing_since={"fresh": 9_000.0, "old": 1_000.0, "fine": None, "edge": 6_400.0},
    )
    ok, problems = verdict(snap, 10.0, 10_000.0)
    assert ok is False
    assert problems == ["exports_failing:old"]


def test_both_problems_are_reported_together() -> None:
    ok, body = evaluate(
        HealthSnapshot(loop_monotonic=0.0, failing_since={"m": 0.0}),
        now_monotonic=120.0,
        now_wall=7200.0,
        stall_seconds=60,
        failing_seconds=3600,
    )
    assert not ok
    assert [p["problem"] for p in body["problems"]] == ["main_loop_stalled", "exports_failing"]
    assert body["problems"][1] == {
        "problem": "exports_failing",
        "model": "m",
        "failing_for_seconds": 7200.0,
        "limit_seconds": 3600,
    }
