"""Unit tests for daemon.rules.planner: state in, decision out.

Pure and fast: checkpoints are built directly, nothing touches the disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.rules.planner import History, Plan, candidates, plan
from daemon.sources.base import Checkpoint


def ck(step: int | None, written_ns: int, fingerprint: str | None = None) -> Checkpoint:
    """A checkpoint named after its step; its fingerprint defaults to a unique one."""
    name = f"ckpt-{step}" if step is not None else "ckpt"
    return Checkpoint(
        prefix=Path("/train/ckpts") / name,
        step=step,
        files=(),
        written_ns=written_ns,
        fingerprint=fingerprint or f"fp-{step}-{written_ns}",
    )


A = ck(100, 1_000)
B = ck(200, 2_000)
C = ck(300, 3_000)
# The trainer restarted: a lower step, written after everything above.
RESTARTED = ck(1, 4_000)


def names(checkpoints: tuple[Checkpoint, ...] | list[Checkpoint]) -> list[str]:
    return [c.name for c in checkpoints]


def decide(
    checkpoints: list[Checkpoint],
    history: History | None = None,
    *,
    policy: str = "all",
    min_interval: float = 0.0,
    now: float = 1_000.0,
    busy: frozenset[str] = frozenset(),
) -> Plan:
    return plan(
        checkpoints,
        history or History(),
        export_policy=policy,
        min_interval_seconds=min_interval,
        now=now,
        busy=busy,
    )


# --- candidates ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("checkpoints", "history", "expected"),
    [
        pytest.param([], History(), [], id="nothing on disk"),
        pytest.param([C, A, B], History(), ["ckpt-100", "ckpt-200", "ckpt-300"], id="oldest first"),
        pytest.param(
            [A, B, C],
            History(published_fingerprints=frozenset({B.fingerprint})),
            ["ckpt-100", "ckpt-300"],
            id="published fingerprint excluded",
        ),
        pytest.param(
            [A, B, C],
            History(rejected=frozenset({A.fingerprint})),
            ["ckpt-200", "ckpt-300"],
            id="rejected excluded",
        ),
        pytest.param(
            [A, B, C, ck(250, 2_000, "new-contents")],
            History(watermark_ns=2_000),
            ["ckpt-300"],
            id="watermark excludes older and equal written_ns, whatever the fingerprint",
        ),
        pytest.param(
            [A, B, RESTARTED],
            History(published_fingerprints=frozenset({B.fingerprint}), watermark_ns=2_000),
            ["ckpt-1"],
            id="trainer restarted from step 0 is still a candidate",
        ),
        pytest.param(
            [C, RESTARTED],
            History(),
            ["ckpt-300", "ckpt-1"],
            id="ordered by write time, not by step",
        ),
        pytest.param(
            [ck(2, 500), ck(None, 500), ck(1, 500)],
            History(),
            ["ckpt", "ckpt-1", "ckpt-2"],
            id="same write time: by step, no step first",
        ),
        pytest.param(
            [A, B],
            History(retry_at={A.fingerprint: 9e9}),
            ["ckpt-100", "ckpt-200"],
            id="waiting to retry is still a candidate",
        ),
    ],
)
def test_candidates(checkpoints: list[Checkpoint], history: History, expected: list[str]) -> None:
    assert names(candidates(checkpoints, history)) == expected


def test_candidates_does_not_reorder_its_input() -> None:
    given = [C, A, B]
    candidates(given, History())
    assert given == [C, A, B]


# --- plan: nothing to do --------------------------------------------------------


@pytest.mark.parametrize("policy", ["latest", "all"])
@pytest.mark.parametrize(
    ("checkpoints", "history"),
    [
        pytest.param([], History(), id="no checkpoints"),
        pytest.param(
            [A, B],
            History(published_fingerprints=frozenset({A.fingerprint, B.fingerprint})),
            id="all published",
        ),
        pytest.param([A, B], History(watermark_ns=B.written_ns), id="all under the watermark"),
        pytest.param(
            [A, B], History(rejected=frozenset({A.fingerprint, B.fingerprint})), id="all rejected"
        ),
    ],
)
def test_plan_nothing_pending(policy: str, checkpoints: list[Checkpoint], history: History) -> None:
    assert decide(checkpoints, history, policy=policy) == Plan(next=None, pending=0)


# --- plan: export policies --------------------------------------------------------


def test_latest_picks_the_newest_and_lists_the_superseded() -> None:
    decision = decide([B, C, A], policy="latest")
    assert decision.next == C
    assert decision.pending == 1
    assert decision.wait_until is None
    assert names(decision.superseded) == ["ckpt-100", "ckpt-200"]


def test_latest_with_a_single_candidate_supersedes_nothing() -> None:
    assert decide([A], policy="latest") == Plan(next=A, pending=1)


def test_all_picks_the_oldest_first_and_counts_every_candidate() -> None:
    decision = decide([C, B, A], policy="all")
    assert decision == Plan(next=A, pending=3)


def test_all_moves_on_once_the_oldest_is_published() -> None:
    history = History(published_fingerprints=frozenset({A.fingerprint}), watermark_ns=1_000)
    assert decide([A, B, C], history, policy="all") == Plan(next=B, pending=2)


def test_published_fingerprint_is_not_planned_again() -> None:
    history = History(published_fingerprints=frozenset({C.fingerprint}))
    # No watermark here: the fingerprint alone says that C is done.
    assert decide([A, C], history, policy="latest") == Plan(next=A, pending=1)


def test_watermark_excludes_older_checkpoints_even_with_a_new_fingerprint() -> None:
    # Retention deleted the versions that recorded A and B; the watermark remembers.
    history = History(watermark_ns=2_000)
    rewritten = ck(200, 2_000, "other-contents")
    assert decide([A, B, rewritten], history, policy="all") == Plan(next=None, pending=0)
    assert decide([A, B, rewritten, C], history, policy="all") == Plan(next=C, pending=1)


@pytest.mark.parametrize("policy", ["latest", "all"])
def test_trainer_restarted_from_step_zero_is_still_exported(policy: str) -> None:
    history = History(published_fingerprints=frozenset({C.fingerprint}), watermark_ns=3_000)
    decision = decide([A, B, C, RESTARTED], history, policy=policy)
    assert decision.next == RESTARTED
    assert decision.pending == 1


@pytest.mark.parametrize("policy", ["latest", "all"])
def test_rejected_is_never_planned(policy: str) -> None:
    history = History(rejected=frozenset({C.fingerprint}))
    decision = decide([A, B, C], history, policy=policy)
    assert decision.next is not None
    assert decision.next != C
    assert C not in decision.superseded
    assert decision.next == (B if policy == "latest" else A)


def test_unknown_policy_raises() -> None:
    with pytest.raises(ValueError, match="'newest'"):
        decide([A], policy="newest")


def test_unknown_policy_raises_even_with_nothing_to_do() -> None:
    with pytest.raises(ValueError, match="unknown export_policy"):
        decide([], policy="")


# --- plan: transient failures waiting to retry ----------------------------------


def test_latest_waiting_to_retry_sets_wait_until() -> None:
    history = History(retry_at={C.fingerprint: 1_500.0})
    decision = decide([A, B, C], history, policy="latest", now=1_000.0)
    assert decision.next is None
    assert decision.wait_until == 1_500.0
    assert decision.pending == 1
    assert names(decision.superseded) == ["ckpt-100", "ckpt-200"]


def test_latest_ignores_the_retry_timer_of_a_superseded_checkpoint() -> None:
    history = History(retry_at={A.fingerprint: 1_500.0})
    assert decide([A, B], history, policy="latest", now=1_000.0) == Plan(
        next=B, pending=1, superseded=(A,)
    )


def test_all_does_not_jump_past_a_checkpoint_waiting_to_retry() -> None:
    history = History(retry_at={A.fingerprint: 1_500.0})
    decision = decide([A, B, C], history, policy="all", now=1_000.0)
    assert decision == Plan(next=None, pending=3, wait_until=1_500.0)


def test_all_exports_the_oldest_while_a_newer_one_waits() -> None:
    history = History(retry_at={B.fingerprint: 1_500.0})
    decision = decide([A, B, C], history, policy="all", now=1_000.0)
    assert decision == Plan(next=A, pending=3, wait_until=None)


@pytest.mark.parametrize("policy", ["latest", "all"])
@pytest.mark.parametrize("now", [1_500.0, 1_500.1, 99_999.0])
def test_retry_time_reached_plans_it_again(policy: str, now: float) -> None:
    history = History(retry_at={C.fingerprint: 1_500.0})
    decision = decide([C], history, policy=policy, now=now)
    assert decision == Plan(next=C, pending=1)


# --- plan: min_interval_seconds ---------------------------------------------------


@pytest.mark.parametrize("policy", ["latest", "all"])
def test_min_interval_delays_the_next_export(policy: str) -> None:
    history = History(last_publish_time=900.0)
    decision = decide([A, B], history, policy=policy, min_interval=300.0, now=1_000.0)
    assert decision.next is None
    assert decision.wait_until == 1_200.0  # last publish + interval
    assert decision.pending == (1 if policy == "latest" else 2)


@pytest.mark.parametrize("now", [1_200.0, 1_200.5, 5_000.0])
def test_min_interval_elapsed_does_not_delay(now: float) -> None:
    history = History(last_publish_time=900.0)
    decision = decide([A, B], history, policy="all", min_interval=300.0, now=now)
    assert decision == Plan(next=A, pending=2)


def test_min_interval_without_a_previous_publication_does_not_delay() -> None:
    decision = decide([A], History(), policy="all", min_interval=300.0, now=1_000.0)
    assert decision == Plan(next=A, pending=1)


def test_zero_min_interval_never_delays() -> None:
    history = History(last_publish_time=1_000.0)
    decision = decide([A], history, policy="all", min_interval=0.0, now=1_000.0)
    assert decision == Plan(next=A, pending=1)


def test_min_interval_with_nothing_pending_sets_no_timer() -> None:
    history = History(last_publish_time=900.0, published_fingerprints=frozenset({A.fingerprint}))
    decision = decide([A], history, policy="all", min_interval=300.0, now=1_000.0)
    assert decision == Plan(next=None, pending=0)


# --- plan: busy (being exported now) ---------------------------------------------


def test_all_skips_a_busy_checkpoint() -> None:
    decision = decide([A, B, C], policy="all", busy=frozenset({A.fingerprint}))
    assert decision == Plan(next=B, pending=2)


def test_latest_with_the_newest_busy_plans_nothing_older() -> None:
    # Once C (being exported) is published, the watermark covers A and B:
    # they are superseded by C, not next in line.
    decision = decide([A, B, C], policy="latest", busy=frozenset({C.fingerprint}))
    assert decision.next is None
    assert decision.pending == 0
    assert decision.wait_until is None
    assert names(decision.superseded) == ["ckpt-100", "ckpt-200"]


def test_latest_with_an_older_busy_still_picks_the_newest() -> None:
    decision = decide([A, B, C], policy="latest", busy=frozenset({A.fingerprint}))
    assert decision.next == C
    assert decision.pending == 1


def test_busy_fingerprint_that_is_not_on_disk_changes_nothing() -> None:
    decision = decide([A, B], policy="all", busy=frozenset({"gone"}))
    assert decision == Plan(next=A, pending=2)


# --- plan: pending ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("history", "pending_all", "pending_latest"),
    [
        (History(), 4, 1),
        (History(published_fingerprints=frozenset({A.fingerprint})), 3, 1),
        (History(watermark_ns=2_000), 2, 1),
        (History(rejected=frozenset({A.fingerprint, B.fingerprint, C.fingerprint})), 1, 1),
        (History(watermark_ns=4_000), 0, 0),
    ],
)
def test_pending_counts_what_will_still_be_exported(
    history: History, pending_all: int, pending_latest: int
) -> None:
    on_disk = [A, B, C, RESTARTED]
    assert decide(on_disk, history, policy="all").pending == pending_all
    assert decide(on_disk, history, policy="latest").pending == pending_latest


def test_plan_is_deterministic_for_the_same_state() -> None:
    history = History(retry_at={B.fingerprint: 2_000.0}, last_publish_time=10.0)
    first = decide([C, A, B], history, policy="all", min_interval=5.0)
    again = decide([B, C, A], history, policy="all", min_interval=5.0)
    assert first == again == Plan(next=A, pending=3)
