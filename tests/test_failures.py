"""The failure registry (daemon.rules.failures) against the code that raises reasons.

The source of ``daemon/`` is scanned, not imported, so every reason spelled
anywhere (a child's ``ChildFailure``, a result dict, the supervisor's
``_fail``) must have a registry entry, and the kind recorded there must agree
with the ``permanent`` flag it is raised with.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from daemon.rules import failures
from daemon.rules.failures import (
    FAILURES,
    MODEL_FAILURES,
    PHASES,
    Failure,
    backoff_seconds,
    known_failures_by_phase,
)
from daemon.supervisor import metrics

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / "daemon"

#: Calls that carry a failure reason, by name: (position of the reason,
#: position of ``permanent`` when it may be given positionally, its default).
#: ``fail`` is the supervisor's ``fail(job, reason, ...)``; a one-argument
#: ``fail(message)`` (warmup_records' helper) carries no reason and is skipped.
CARRIERS: dict[str, tuple[int, int | None, bool | None]] = {
    "ChildFailure": (0, None, True),
    "failure": (0, None, None),
    "_fail": (1, None, None),
    "fail": (1, None, None),
    "PublishFailed": (0, 2, None),
}
#: Calls named like a failure that carry no reason of their own.
NOT_CARRIERS = {"environment_failure", "Failure", "known_failures_by_phase"}
#: Verdicts of one signature in the validation report; the validator rolls
#: them up into the job's reason (output_mismatch, not_finite or signature_failed).
SIGNATURE_VERDICTS = {"signature_rules", "run_failed", "not_finite", "output_mismatch"}
#: Expressions that pass on a reason someone else chose (checked where it is chosen).
FORWARDED = {
    "e.reason",
    "outcome.reason",
    "reason",
    "result.get('reason')",
    "str(result.get('reason', 'unknown'))",
}
#: Reasons raised both transient and permanent; the registry records the
#: majority and its description must mention the other way.
MIXED = {"warmup_failed", "signature_changed"}
#: metrics.KNOWN_FAILURES as it was written by hand before the registry.
HAND_WRITTEN_KNOWN = {
    "pin": ("pin_failed",),
    "export": (
        "builder_import",
        "builder_error",
        "restore_mismatch",
        "checkpoint_corrupt",
        "no_variables",
        "no_signature",
        "command_failed",
        "load_failed",
        "timeout",
        "child_crashed",
        "no_space",
    ),
    "validate": (
        "load_failed",
        "no_serving_default",
        "output_mismatch",
        "not_finite",
        "signature_failed",
        "no_variables",
        "weight_mismatch",
        "no_reference",
        "golden_mismatch",
        "warmup_failed",
        "timeout",
        "child_crashed",
        "no_space",
    ),
    "publish": ("publish_failed", "version_refused"),
}
WORD = re.compile(r"^[a-z][a-z0-9_]*$")


def _name(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _literal(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def scan() -> tuple[list[tuple[str, str, bool | None]], list[tuple[str, str]], set[str]]:
    """Reasons spelled in ``daemon/``.

    Returns ``(raised, forwarded, verdicts)``: ``raised`` is ``(where, reason,
    permanent)`` for each literal reason (``permanent`` None where not known
    from the source), ``forwarded`` is ``(where, expression)`` for each reason
    that is not a literal, ``verdicts`` the literals given as ``reason=`` to
    anything else (report entries).
    """
    raised: list[tuple[str, str, bool | None]] = []
    forwarded: list[tuple[str, str]] = []
    verdicts: set[str] = set()
    files = sorted(DAEMON.rglob("*.py"))
    assert len(files) > 20, files
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call) and _name(node) in CARRIERS:
                name = _name(node)
                assert name is not None
                kw = {k.arg: k.value for k in node.keywords}
                pos, flag_pos, default = CARRIERS[name]
                arg = node.args[pos] if len(node.args) > pos else kw.get("reason")
                if arg is None:
                    continue  # a call without a reason (warmup_records' fail(message))
                flag = kw.get("permanent")
                if flag is None and flag_pos is not None and len(node.args) > flag_pos:
                    flag = node.args[flag_pos]
                permanent: bool | None = default  # ChildFailure's; the others require it
                if flag is not None:
                    permanent = flag.value if isinstance(flag, ast.Constant) else None
                reason = _literal(arg)
                if reason is None:
                    forwarded.append((where, ast.unparse(arg)))
                else:
                    raised.append((where, reason, permanent))
            elif isinstance(node, ast.Call):
                for k in node.keywords:
                    value = _literal(k.value)
                    if k.arg == "reason" and value is not None and WORD.match(value):
                        verdicts.add(value)
                    elif k.arg == "reason" and value is None:
                        forwarded.append((where, ast.unparse(k.value)))
                # result.get("reason", "unknown"): the reason of a result without one.
                if (
                    _name(node) == "get"
                    and len(node.args) == 2
                    and _literal(node.args[0]) == "reason"
                    and _literal(node.args[1]) is not None
                ):
                    raised.append((where, str(_literal(node.args[1])), None))
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if key is not None and _literal(key) == "reason":
                        reason = _literal(value)
                        if reason is None:
                            forwarded.append((where, ast.unparse(value)))
                        else:
                            raised.append((where, reason, None))
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                # ``reason = ...``: a reason chosen in code (the validator's roll-up).
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                named = any(isinstance(t, ast.Name) and t.id == "reason" for t in targets)
                if named and node.value is not None:  # not a bare ``reason: str`` field
                    for c in ast.walk(node.value):
                        word = _literal(c) if isinstance(c, ast.expr) else None
                        if word is not None and WORD.match(word):
                            raised.append((where, word, None))
    return raised, forwarded, verdicts


def test_every_call_named_like_a_failure_is_classified() -> None:
    """A new way of raising a reason must be added to CARRIERS, or the scan misses it.

    That is: a call named like a failure with a ``snake_case`` literal among
    its first two arguments (``keep_failed(path, label, keep)`` is not one).
    """
    names = set()
    for path in sorted(DAEMON.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            name = _name(node) if isinstance(node, ast.Call) else None
            if name is None or "fail" not in name.lower():
                continue
            assert isinstance(node, ast.Call)
            if any(WORD.match(_literal(a) or "") for a in node.args[:2]):
                names.add(name)
    assert names - set(CARRIERS) - NOT_CARRIERS == set()
    assert {"ChildFailure", "failure"} <= names


def test_the_scan_finds_the_reasons_it_should() -> None:
    """Guards the scanner itself: a scan that finds nothing would pass everything."""
    raised, forwarded, verdicts = scan()
    found = {r for _, r, _ in raised}
    assert {
        "builder_import",  # ChildFailure in a child
        "no_space",  # runtime.failure, and the supervisor's _fail
        "pin_failed",  # _fail(job, ...)
        "gated_out",  # a rejected.json record
        "child_crashed",  # the CLI's result dict
        "unknown",  # result.get("reason", "unknown")
        "signature_failed",  # the validator's roll-up
    } <= found
    assert {"signature_rules", "run_failed"} <= verdicts
    assert any(expr == "e.reason" for _, expr in forwarded)


def test_every_reason_the_code_produces_is_registered() -> None:
    raised, _, _ = scan()
    missing = sorted({f"{r} ({where})" for where, r, _ in raised if r not in FAILURES})
    assert not missing, f"add these reasons to daemon/rules/failures.py: {missing}"


def test_every_registered_reason_is_produced_somewhere() -> None:
    raised, _, _ = scan()
    unused = set(FAILURES) - {r for _, r, _ in raised}
    assert not unused, f"registered but raised nowhere in daemon/: {sorted(unused)}"


def test_reasons_not_spelled_out_are_only_passed_on() -> None:
    _, forwarded, _ = scan()
    new = sorted(f"{expr} ({where})" for where, expr in forwarded if expr not in FORWARDED)
    assert not new, f"a reason computed in a new way; make the test see its values: {new}"


def test_signature_verdicts_are_registered_or_rolled_up() -> None:
    _, _, verdicts = scan()
    unknown = verdicts - set(FAILURES) - SIGNATURE_VERDICTS
    assert not unknown, f"reason= literals that are neither registered nor verdicts: {unknown}"


def test_each_reasons_kind_agrees_with_how_it_is_raised() -> None:
    raised, _, _ = scan()
    wrong = []
    for where, reason, permanent in raised:
        if permanent is None or reason not in FAILURES or reason in MIXED:
            continue
        kind = FAILURES[reason].kind
        if permanent != (kind in ("permanent", "model")):
            wrong.append(f"{reason} is {kind} but raised permanent={permanent} at {where}")
    assert not wrong, wrong
    for reason in MIXED:
        flags = {p for _, r, p in raised if r == reason and p is not None}
        assert flags == {True, False}, f"{reason} is no longer raised both ways: {flags}"
        other = "permanent" if FAILURES[reason].kind == "transient" else "transient"
        assert other in FAILURES[reason].description


def test_model_failures_are_todays_set() -> None:
    assert {
        "builder_import",
        "builder_error",
        "no_signature",
        "command_failed",
        "builder_mismatch",
        "sample_inputs",
        "warmup_unavailable",
        "gate_unusable",
        "object_store_unusable",
    } == MODEL_FAILURES
    assert isinstance(MODEL_FAILURES, frozenset)


def test_registry_entries_are_well_formed() -> None:
    assert PHASES == ("pin", "export", "validate", "gate", "publish")
    assert metrics.PHASES == PHASES
    for reason, f in FAILURES.items():
        assert f.reason == reason
        assert re.fullmatch(r"[a-z][a-z0-9_]*", reason), reason
        assert f.phases and set(f.phases) <= set(PHASES), (reason, f.phases)
        assert len(set(f.phases)) == len(f.phases), reason
        assert f.kind in ("transient", "permanent", "model"), reason
        assert f.description.strip() == f.description and "\n" not in f.description


def test_a_malformed_entry_is_refused() -> None:
    with pytest.raises(ValueError, match="phases"):
        Failure("x", ("exporting",), "permanent", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="phases"):
        Failure("x", (), "permanent", "x")
    with pytest.raises(ValueError, match="kind"):
        Failure("x", ("export",), "fatal", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one non-empty line"):
        Failure("x", ("export",), "permanent", "two\nlines")


def test_known_failures_cover_the_hand_written_list() -> None:
    known = known_failures_by_phase()
    assert tuple(known) == PHASES
    for phase, reasons in HAND_WRITTEN_KNOWN.items():
        assert set(reasons) <= set(known[phase]), (phase, set(reasons) - set(known[phase]))
    pairs = {(p, r) for p, rs in known.items() for r in rs}
    assert pairs == {(p, r) for r, f in FAILURES.items() if f.counted for p in f.phases}
    # Counted in the gate decisions, not the failures: no series that stays 0 for ever.
    assert all("gated_out" not in rs for rs in known.values())
    assert known == metrics.KNOWN_FAILURES


def test_metrics_preinitialise_every_known_failure() -> None:
    m = metrics.Metrics()
    m.init_model("m")
    text = m.exposition().decode()
    for phase, reasons in known_failures_by_phase().items():
        for reason in reasons:
            series = (
                f'ckpt_exporter_export_failures_total{{model="m",phase="{phase}",'
                f'reason="{reason}"}} 0.0'
            )
            assert series in text


@pytest.mark.parametrize(
    ("attempt", "first", "expected"),
    [
        (1, 30.0, 30.0),
        (2, 30.0, 60.0),
        (3, 30.0, 120.0),
        (7, 30.0, 1920.0),
        (8, 30.0, 3600.0),  # 3840 capped
        (50, 30.0, 3600.0),
        (1, 0.5, 0.5),
        (4, 0.5, 4.0),
        (1, 5000.0, 3600.0),  # a first delay above the cap is capped too
    ],
)
def test_backoff_doubles_up_to_the_cap(attempt: int, first: float, expected: float) -> None:
    assert backoff_seconds(attempt, first) == expected


def test_backoff_is_the_supervisors_formula() -> None:
    for first in (0.01, 1.0, 7.5, 30.0, 3599.0):
        for longest in (10.0, 3600.0, 86400.0):
            for n in range(1, 80):
                assert backoff_seconds(n, first, longest) == min(first * 2 ** (n - 1), longest)
    assert failures.MAX_BACKOFF_SECONDS == 3600.0


def test_backoff_after_very_many_attempts_is_the_cap_not_an_overflow() -> None:
    # float(2 ** 1024) overflows: the plain formula raises OverflowError there.
    with pytest.raises(OverflowError):
        _ = 30.0 * 2 ** (5000 - 1)
    assert backoff_seconds(5000, 30.0) == 3600.0
    assert backoff_seconds(10**6, 1e-300, 60.0) == 60.0


def test_backoff_needs_an_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_seconds(0, 30.0)


def readme_table() -> dict[str, tuple[tuple[str, ...], str]]:
    """README's "Failure reasons" table: reason -> (phases, kind)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n### Failure reasons\n", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 4, line
        reason = cells[0].strip("`")
        assert reason not in rows, f"README lists {reason} twice"
        rows[reason] = (tuple(p.strip() for p in cells[1].split(",")), cells[2].strip("`"))
    return rows


def test_readme_documents_every_reason() -> None:
    rows = readme_table()
    assert set(rows) == set(FAILURES), (
        f"missing from README: {sorted(set(FAILURES) - set(rows))}; "
        f"not in the registry: {sorted(set(rows) - set(FAILURES))}"
    )
    for reason, f in FAILURES.items():
        assert rows[reason] == (f.phases, f.kind), reason
