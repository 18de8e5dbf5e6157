"""Version labels (daemon/rules/labels.py): the two-step moves TF Serving's rules need.

The last tests replay random histories (publications, time, promotions,
rollbacks) against a stand-in for TF Serving's config poller that loads a
listed version some time after it first sees it (never later than the
daemon's ``load_wait_seconds``), and refuses a config whose label points at
a version it has not loaded, as the server does. No config is ever refused.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from daemon.rules import labels as rules
from daemon.rules.labels import CANARY, STABLE, LabelState, ModelEntry

WAIT = 60.0


def step(
    state: LabelState,
    now: float,
    loaded: set[int] | None = None,
    present: set[int] | None = None,
) -> tuple[ModelEntry | None, LabelState]:
    return rules.plan(state, now, WAIT, loaded, present)


def test_the_first_version_is_listed_then_labelled_once_loaded() -> None:
    state = rules.after_publish(LabelState(), 1, CANARY, STABLE)
    assert state.want == {CANARY: 1, STABLE: 1}
    entry, state = step(state, 0.0)
    # Listed, not labelled: a label on a version still loading would be refused.
    assert entry == ModelEntry(versions=(1,), labels={})
    entry, state = step(state, WAIT - 1)
    assert entry == ModelEntry(versions=(1,), labels={})
    entry, state = step(state, WAIT)
    assert entry == ModelEntry(versions=(1,), labels={CANARY: 1, STABLE: 1})
    assert state.labelled_at == {1: WAIT}


def test_a_new_version_is_listed_beside_the_old_then_the_canary_moves() -> None:
    _, state = step(rules.after_publish(LabelState(), 1, CANARY, STABLE), 0.0)
    _, state = step(state, WAIT)
    state = rules.after_publish(state, 2, CANARY, STABLE)
    entry, state = step(state, 100.0)
    assert entry == ModelEntry(versions=(1, 2), labels={CANARY: 1, STABLE: 1})
    entry, state = step(state, 100.0 + WAIT)
    assert entry == ModelEntry(versions=(1, 2), labels={CANARY: 2, STABLE: 1})
    # Promotion ("immediately"): stable follows; version 1 then leaves the list.
    assert rules.due_promotion(state, "immediately", 100.0 + WAIT, CANARY, STABLE) == 2
    state = rules.promote(state, 2, STABLE)
    entry, state = step(state, 100.0 + WAIT)
    assert entry == ModelEntry(versions=(2,), labels={CANARY: 2, STABLE: 2})
    # A rule runs once per version.
    assert rules.due_promotion(state, "immediately", 10_000.0, CANARY, STABLE) is None


def test_after_a_duration_and_manual_and_command_rules() -> None:
    state = LabelState(
        want={CANARY: 2, STABLE: 1},
        written={CANARY: 2, STABLE: 1},
        listed=frozenset({1, 2}),
        listed_at={1: 0.0, 2: 0.0},
        labelled_at={1: 0.0, 2: 1000.0},
    )
    assert rules.due_promotion(state, "after:30m", 1000.0 + 1799, CANARY, STABLE) is None
    assert rules.due_promotion(state, "after:30m", 1000.0 + 1800, CANARY, STABLE) == 2
    assert rules.due_promotion(state, "manual", 1e9, CANARY, STABLE) is None
    assert rules.due_promotion(state, "command", 1e9, CANARY, STABLE) is None
    # Refused by its command: never promoted by a rule again.
    assert rules.due_promotion(rules.decide(state, 2), "immediately", 1e9, CANARY, STABLE) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("immediately", 0.0), ("after:90s", 90.0), ("after:1.5h", 5400.0), ("after:2d", 172800.0)],
)
def test_promote_rules_parse(text: str, seconds: float) -> None:
    assert rules.parse_promote(text) is None
    assert rules.promote_after_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "after:", "after:5", "after:-5m", "later", "after:5w"])
def test_bad_promote_rules_are_refused(text: str) -> None:
    assert rules.parse_promote(text) is not None


def test_a_status_check_decides_instead_of_the_time_bound() -> None:
    _, state = step(rules.after_publish(LabelState(), 1, CANARY, STABLE), 0.0)
    entry, _ = step(state, 10 * WAIT, loaded=set())
    assert entry is not None and entry.labels == {}  # listed long ago, but not loaded
    entry, _ = step(state, 1.0, loaded={1})
    assert entry is not None and entry.labels == {CANARY: 1, STABLE: 1}


def test_a_version_not_in_the_base_path_is_never_listed() -> None:
    state = rules.after_publish(LabelState(), 3, CANARY, STABLE)
    entry, state = step(state, 0.0, present={1, 2})
    assert entry is None and not state.listed


def test_rollback_moves_both_labels_back_in_two_steps_and_deletes_nothing() -> None:
    state = LabelState(
        want={CANARY: 3, STABLE: 3},
        written={CANARY: 3, STABLE: 3},
        listed=frozenset({3}),
        listed_at={3: 0.0},
        labelled_at={3: 0.0},
        decided=frozenset({3}),
    )
    state = rules.roll_back(state, 2, CANARY, STABLE)
    entry, state = step(state, 500.0, present={1, 2, 3})
    # Version 2 is listed again and loads; the labels stay on 3 until then.
    assert entry == ModelEntry(versions=(2, 3), labels={CANARY: 3, STABLE: 3})
    entry, state = step(state, 500.0 + WAIT, present={1, 2, 3})
    assert entry == ModelEntry(versions=(2,), labels={CANARY: 2, STABLE: 2})
    # The rolled-back version is never promoted by a rule again.
    assert 3 in state.decided


def test_a_version_published_by_someone_else_is_seen_once() -> None:
    assert rules.newest_unseen(LabelState(), []) is None
    # [serving_config] set on a base path with versions: the newest becomes canary.
    assert rules.newest_unseen(LabelState(), [1, 2, 5]) == 5
    state = rules.after_publish(LabelState(), 5, CANARY, STABLE)
    assert rules.newest_unseen(state, [1, 2, 5]) is None
    assert rules.newest_unseen(state, [1, 2, 5, 6]) == 6  # `ckpt-exporter export`
    # A version a rollback left behind is not taken for a new one.
    rolled = rules.roll_back(rules.after_publish(state, 6, CANARY, STABLE), 5, CANARY, STABLE)
    assert rules.newest_unseen(rolled, [1, 2, 5, 6]) is None


def test_json_round_trip_and_bad_records() -> None:
    state = LabelState(
        want={CANARY: 2, STABLE: 1},
        written={STABLE: 1},
        listed=frozenset({1, 2}),
        listed_at={1: 1.5, 2: 2.5},
        labelled_at={1: 3.5},
        decided=frozenset({1}),
    )
    assert rules.from_json(rules.to_json(state)) == state
    assert rules.from_json({}) == LabelState()
    for bad in (
        [],
        {"want": []},
        {"want": {"stable": "1"}},
        {"listed": ["x"]},
        {"want": {"a": True}},
    ):
        with pytest.raises(ValueError):
            rules.from_json(bad)


class Server:
    """TF Serving's config poller, as far as labels go (see the module docstring)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seen: dict[int, float] = {}  # version -> when it finished loading
        self.loaded: set[int] = set()
        self.labels: dict[str, int] = {}

    def read(self, entry: ModelEntry | None, now: float) -> None:
        versions = set(entry.versions) if entry else set()
        for v in versions:
            # Loads within the daemon's wait (the time bound's assumption).
            self.seen.setdefault(v, now + self.rng.uniform(0, WAIT))
        for v in list(self.seen):
            if v not in versions:
                del self.seen[v]  # unloaded when it leaves the list
        self.loaded = {v for v, t in self.seen.items() if t <= now}
        labels = dict(entry.labels) if entry else {}
        refused = {k: v for k, v in labels.items() if v not in self.loaded}
        assert not refused, f"config refused: labels {refused} on versions not loaded {self.loaded}"
        assert set(labels.values()) <= versions
        self.labels = labels


@pytest.mark.parametrize("seed", range(40))
def test_no_config_is_ever_refused_over_a_random_history(seed: int) -> None:
    rng = random.Random(seed)
    server = Server(rng)
    state, now, published = LabelState(), 0.0, [0]
    rule = rng.choice(["immediately", "after:2m", "manual"])
    for _ in range(120):
        now += rng.choice([1.0, 5.0, 30.0, 61.0, 200.0])
        event = rng.random()
        if event < 0.25:
            published.append(published[-1] + 1)
            state = rules.after_publish(state, published[-1], CANARY, STABLE)
        elif event < 0.3 and len(published) > 2:
            state = rules.roll_back(state, rng.choice(published[1:]), CANARY, STABLE)
        elif event < 0.35 and len(published) > 1:
            state = rules.promote(state, rng.choice(published[1:]), STABLE)
        due = rules.due_promotion(state, rule, now, CANARY, STABLE)
        if due is not None:
            state = rules.promote(state, due, STABLE)
        entry, state = step(state, now, present=set(published[1:]))
        server.read(entry, now)
        # Whatever is wanted is reached once the server had time to load it.
    for _ in range(3):
        now += WAIT + 1
        entry, state = step(state, now, present=set(published[1:]))
        server.read(entry, now)
    if len(published) > 1:
        assert server.labels == dict(state.want)


def test_the_signature_contract_compares_with_the_stable_version(tmp_path: Path) -> None:
    from daemon.basepath.catalog import Published
    from daemon.config.loading import ModelConfig
    from daemon.sources import SOURCES
    from daemon.supervisor.pipeline import reference_version
    from daemon.supervisor.state import ModelState

    cfg = ModelConfig(name="m", checkpoint_dir=tmp_path / "c", base_path=tmp_path / "b")
    st = ModelState(cfg=cfg, source=SOURCES["tf_checkpoint"].scanner({}))
    st.published = [Published(v, tmp_path / "b" / str(v), {}) for v in (1, 2, 3)]
    assert reference_version(st) is st.published[-1]  # no labels: the newest
    st.stable_version = 2
    ref = reference_version(st)
    assert ref is not None and ref.version == 2
    st.stable_version = 9  # gone from the base path meanwhile: the newest again
    ref = reference_version(st)
    assert ref is not None and ref.version == 3
