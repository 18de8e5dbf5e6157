"""The signature contract: the pure diff (daemon.rules.signatures), the acceptance record
(daemon.basepath.operations), the supervisor's check between validation and publication
(daemon.supervisor.pipeline), and one end-to-end run with a real daemon.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from daemon.basepath.layout import METADATA_RELPATH, REPORT_RELPATH
from daemon.basepath.operations import (
    SIGNATURE_ACCEPTED_NAME,
    OperationError,
    accept_signature,
    consume_signature_acceptance,
    signature_accepted,
)
from daemon.basepath.publish import new_temp_dir
from daemon.config.loading import parse_config
from daemon.protocol import DeclaredSignature, SignatureReport, ValidationResult
from daemon.rules import signatures
from daemon.rules.signatures import (
    Change,
    Shape,
    SignatureSpec,
    TensorSpec,
    diff,
    from_report,
    input_shape_breaks,
    output_shape_breaks,
    render,
    render_shape,
)
from daemon.sources import Checkpoint
from daemon.supervisor import Supervisor, pipeline
from daemon.supervisor.state import Job

PREDICT = "tensorflow/serving/predict"
CLASSIFY = "tensorflow/serving/classify"


def sig(
    inputs: dict[str, TensorSpec] | None = None,
    outputs: dict[str, TensorSpec] | None = None,
    method: str = PREDICT,
) -> SignatureSpec:
    return SignatureSpec(
        method,
        {"x": TensorSpec("float32", (None, 4))} if inputs is None else inputs,
        {"y": TensorSpec("float32", (None, 1))} if outputs is None else outputs,
    )


def lines(old: dict[str, SignatureSpec], new: dict[str, SignatureSpec]) -> list[tuple[str, bool]]:
    return [(str(c), c.breaking) for c in diff(old, new)]


# --- the diff -----------------------------------------------------------------------------


def test_the_same_signatures_differ_in_nothing() -> None:
    assert diff({"serving_default": sig()}, {"serving_default": sig()}) == []
    assert diff({}, {}) == []


def test_a_changed_input_dtype_breaks_and_reads_as_the_issue_says() -> None:
    new = sig(inputs={"x": TensorSpec("float64", (None, 4))})
    (change,) = diff({"serving_default": sig()}, {"serving_default": new})
    assert change == Change(
        "serving_default", "input_dtype", True, "input 'x' dtype float32 -> float64"
    )
    assert str(change) == "serving_default: input 'x' dtype float32 -> float64"


def test_signatures_removed_break_and_added_pass() -> None:
    old = {"serving_default": sig(), "classify": sig(method=CLASSIFY)}
    new = {"serving_default": sig(), "serve": sig()}
    assert lines(old, new) == [
        ("classify: signature removed", True),
        ("serve: signature added", False),
    ]


def test_a_changed_method_breaks() -> None:
    assert lines({"s": sig()}, {"s": sig(method=CLASSIFY)}) == [
        (f"s: method {PREDICT} -> {CLASSIFY}", True)
    ]


def test_inputs_removed_added_and_renamed_all_break() -> None:
    f = TensorSpec("float32", (None, 4))
    two = {"a": f, "b": f}
    # Two removed: not a rename.
    assert lines({"s": sig(inputs=two)}, {"s": sig(inputs={})}) == [
        ("s: input 'a' removed", True),
        ("s: input 'b' removed", True),
    ]
    # An input clients do not send: TF Serving refuses their requests.
    assert lines({"s": sig(inputs={"a": f})}, {"s": sig(inputs=two)}) == [
        ("s: input 'b' added", True)
    ]
    # Exactly one gone and one new: a rename (Keras 3's input_1 -> inputs), and its dtype.
    old = {"s": sig(inputs={"input_1": f})}
    new = {"s": sig(inputs={"inputs": TensorSpec("float64", (None, 4))})}
    assert lines(old, new) == [
        ("s: input 'input_1' renamed to 'inputs'", True),
        ("s: input 'inputs' (was 'input_1') dtype float32 -> float64", True),
    ]
    # Two gone and one new: removals and an addition.
    assert lines({"s": sig(inputs=two)}, {"s": sig(inputs={"c": f})}) == [
        ("s: input 'a' removed", True),
        ("s: input 'b' removed", True),
        ("s: input 'c' added", True),
    ]


def test_outputs_added_pass_removed_renamed_and_retyped_break() -> None:
    y = TensorSpec("float32", (None, 1))
    assert lines({"s": sig(outputs={"y": y})}, {"s": sig(outputs={"y": y, "z": y})}) == [
        ("s: output 'z' added", False)
    ]
    assert lines({"s": sig(outputs={"y": y, "z": y})}, {"s": sig(outputs={"y": y})}) == [
        ("s: output 'z' removed", True)
    ]
    assert lines({"s": sig(outputs={"y": y})}, {"s": sig(outputs={"output_0": y})}) == [
        ("s: output 'y' renamed to 'output_0'", True)
    ]
    assert lines(
        {"s": sig(outputs={"y": y})}, {"s": sig(outputs={"y": TensorSpec("int64", y.shape)})}
    ) == [("s: output 'y' dtype float32 -> int64", True)]


@pytest.mark.parametrize(
    ("old", "new", "breaks"),
    [
        ((None, 4), (None, None), False),  # fixed -> unknown: compatible
        ((None, 4), None, False),  # rank made unknown: compatible
        ((None, None), (None, 4), True),  # unknown -> fixed: breaks other sizes
        ((None, 4), (None, 5), True),  # fixed -> other fixed
        ((None, 4), (None, 4, 1), True),  # rank
        (None, (None, 4), True),  # unknown rank -> known
        ((), (1,), True),
        ((3, 4), (None, 4), False),
    ],
)
def test_input_shapes(old: Shape, new: Shape, breaks: bool) -> None:
    assert input_shape_breaks(old, new) is breaks
    (change,) = diff(
        {"s": sig(inputs={"x": TensorSpec("float32", old)})},
        {"s": sig(inputs={"x": TensorSpec("float32", new)})},
    )
    assert change.kind == "input_shape" and change.breaking is breaks
    assert change.detail == f"input 'x' shape {render_shape(old)} -> {render_shape(new)}"


#: Shapes of rank 0 to 2 with dimensions None, 1 or 4, and the unknown rank.
SHAPES: list[Shape] = [None] + [
    tuple(dims) for rank in range(3) for dims in itertools.product((None, 1, 4), repeat=rank)
]
#: Concrete request shapes: every rank 0 to 3 with sizes 1, 4 or 5.
REQUESTS = [tuple(d) for rank in range(4) for d in itertools.product((1, 4, 5), repeat=rank)]


def _fits(request: tuple[int, ...], shape: Shape) -> bool:
    if shape is None:
        return True
    return len(request) == len(shape) and all(
        d is None or d == r for r, d in zip(request, shape, strict=True)
    )


def test_input_shape_rule_is_exactly_requests_that_fitted_no_longer_fit() -> None:
    """Exhaustive over small shapes: breaking iff some request fitting ``old`` fails ``new``."""
    for old, new in itertools.product(SHAPES, SHAPES):
        lost = any(_fits(r, old) and not _fits(r, new) for r in REQUESTS)
        assert input_shape_breaks(old, new) is lost, (old, new)


@pytest.mark.parametrize(
    ("old", "new", "breaks"),
    [
        ((None, 1), (None, 2), True),  # a fixed size changed
        ((None, 1), (None, 1, 1), True),  # rank
        ((None, 1), (None, None), False),  # made unknown
        ((None, None), (None, 3), False),  # made known
        (None, (None, 3), False),
        ((None, 3), None, False),
        ((2,), (2,), False),
    ],
)
def test_output_shapes(old: Shape, new: Shape, breaks: bool) -> None:
    assert output_shape_breaks(old, new) is breaks
    changes = diff(
        {"s": sig(outputs={"y": TensorSpec("float32", old)})},
        {"s": sig(outputs={"y": TensorSpec("float32", new)})},
    )
    assert [c.breaking for c in changes] == ([] if old == new else [breaks])


def test_changes_are_ordered_by_signature_then_method_inputs_outputs() -> None:
    old = {
        "b": sig(),
        "a": sig(outputs={"y": TensorSpec("float32", (None, 1))}),
    }
    new = {
        "b": SignatureSpec(CLASSIFY, {"x": TensorSpec("int32", (None, 4))}, {}),
        "a": sig(outputs={"y": TensorSpec("float32", (None, 1)), "z": TensorSpec("string", ())}),
    }
    assert [str(c) for c in diff(old, new)] == [
        "a: output 'z' added",
        f"b: method {PREDICT} -> {CLASSIFY}",
        "b: input 'x' dtype float32 -> int32",
        "b: output 'y' removed",
    ]


def test_breaking_and_render() -> None:
    changes = diff(
        {"s": sig()},
        {"s": sig(inputs={"x": TensorSpec("float64", (None, 4))}), "t": sig()},
    )
    assert [c.kind for c in signatures.breaking(changes)] == ["input_dtype"]
    assert render(changes) == "s: input 'x' dtype float32 -> float64; t: signature added"
    assert render([]) == ""


def test_render_shape_spells_shapes_as_tensorflow_does() -> None:
    assert render_shape(None) == "<unknown rank>"
    assert render_shape(()) == "()"
    assert render_shape((None,)) == "(None,)"
    assert render_shape((None, 4)) == "(None, 4)"


# --- reading a report ---------------------------------------------------------------------


def declared(
    inputs: dict[str, Any] | None = None, outputs: dict[str, Any] | None = None
) -> DeclaredSignature:
    return {
        "inputs": inputs if inputs is not None else {"x": {"dtype": "float32", "shape": [None, 4]}},
        "outputs": outputs
        if outputs is not None
        else {"y": {"dtype": "float32", "shape": [None, 1]}},
    }


def report_entry(d: DeclaredSignature, method: str = PREDICT) -> SignatureReport:
    return {"method": method, "declared": d, "ok": True, "inputs": {}, "outputs": {}}


def test_from_report_reads_what_the_validator_writes() -> None:
    entry = report_entry(
        declared(
            inputs={
                "x": {"dtype": "float32", "shape": [-1, 4]},
                "s": {"dtype": "string", "shape": None},
            },
            outputs={"y": {"dtype": "float32", "shape": []}},
        )
    )
    assert from_report({"serving_default": entry}) == {
        "serving_default": SignatureSpec(
            PREDICT,
            {"x": TensorSpec("float32", (None, 4)), "s": TensorSpec("string", None)},
            {"y": TensorSpec("float32", ())},
        )
    }
    # As it comes back from JSON (a published version's metadata).
    assert from_report(json.loads(json.dumps({"serving_default": entry}))) == from_report(
        {"serving_default": entry}
    )


@pytest.mark.parametrize(
    "signatures_",
    [
        None,
        [],
        {},
        "serving_default",
        {"serving_default": {"method": PREDICT, "ok": True}},  # validated before the contract
        {"serving_default": {"declared": declared()}},  # no method
        {"serving_default": "x"},
        {1: {"method": PREDICT, "declared": declared()}},
        {"s": {"method": PREDICT, "declared": {"inputs": {}}}},
        {"s": {"method": PREDICT, "declared": {"inputs": [], "outputs": {}}}},
        {"s": {"method": PREDICT, "declared": declared(inputs={"x": {"shape": [1]}})}},
        {"s": {"method": PREDICT, "declared": declared(inputs={"x": {"dtype": 1}})}},
        {"s": {"method": PREDICT, "declared": declared(inputs={"x": "float32"})}},
        {
            "s": {
                "method": PREDICT,
                "declared": declared(inputs={"x": {"dtype": "f", "shape": [True]}}),
            }
        },
        {
            "s": {
                "method": PREDICT,
                "declared": declared(inputs={"x": {"dtype": "f", "shape": ["4"]}}),
            }
        },
        {
            "s": {
                "method": PREDICT,
                "declared": declared(inputs={"x": {"dtype": "f", "shape": [-2]}}),
            }
        },
        {"s": {"method": PREDICT, "declared": declared(inputs={"x": {"dtype": "f", "shape": 4}})}},
    ],
)
def test_from_report_refuses_what_it_cannot_compare(signatures_: Any) -> None:
    assert from_report(signatures_) is None


# --- the acceptance record ----------------------------------------------------------------


def _published_version(base: Path, version: int, sigs: dict[str, Any] | None) -> Path:
    """A version folder with this daemon's metadata; ``sigs``: its report's ``signatures``."""
    path = base / str(version)
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"x")
    (path / METADATA_RELPATH).parent.mkdir()
    meta: dict[str, Any] = {
        "tool": "ckpt-exporter",
        "model": "m",
        "checkpoint": {"written_ns": version, "fingerprint": f"fp{version}"},
    }
    if sigs is not None:
        meta["validation"] = {"signatures": sigs}
    (path / METADATA_RELPATH).write_text(json.dumps(meta))
    return path


def test_accept_signature_is_a_one_shot_record(tmp_path: Path) -> None:
    base = tmp_path / "serving" / "m"
    with pytest.raises(OperationError, match="no version of model 'm'"):
        accept_signature(base, "m")
    _published_version(base, 1, None)
    with pytest.raises(OperationError, match="no version of model 'other'"):
        accept_signature(base, "other")
    assert signature_accepted(base) is False
    accept_signature(base, "m")
    record = json.loads((base / ".ckpt-exporter" / SIGNATURE_ACCEPTED_NAME).read_text())
    assert record["model"] == "m" and record["at"] > 0
    assert signature_accepted(base) is True
    accept_signature(base, "m")  # twice is one acceptance
    consume_signature_acceptance(base)
    assert signature_accepted(base) is False
    consume_signature_acceptance(base)  # nothing to consume: no error
    # A record that is not JSON still says "accepted": its presence is the acceptance.
    (base / ".ckpt-exporter" / SIGNATURE_ACCEPTED_NAME).write_text("{oops")
    assert signature_accepted(base) is True


# --- the check between validation and publication -----------------------------------------


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    s = _supervisor(tmp_path, allow=False)
    try:
        yield s
    finally:
        s.shutdown()


def _supervisor(tmp_path: Path, *, allow: bool) -> Supervisor:
    data = {
        "daemon": {"metrics_address": ""},
        "models": [
            {
                "name": "m",
                "checkpoint_dir": "ckpts",
                "base_path": "serving/m",
                "builder": "x:y",
                "allow_signature_change": allow,
            }
        ],
    }
    return Supervisor(parse_config(data, "test", tmp_path), structlog.get_logger())


REFERENCE = {"serving_default": report_entry(declared())}


class Run:
    """One job of model "m" handed a validation report, as the validator's end would."""

    def __init__(self, sup: Supervisor, sigs: dict[str, SignatureReport]) -> None:
        self.sup = sup
        self.st = sup.models["m"]
        sup.publisher.refresh(self.st)
        ckpt = Checkpoint(Path("/t/ckpts/ckpt-2"), 2, (), 2, "fp2")
        self.job = Job(model=self.st, ckpt=ckpt, phase="validate")
        self.job.temp_dir = new_temp_dir(self.st.cfg.base_path)
        self.st.job = self.job
        self.result: ValidationResult = {
            "ok": True,
            "saved_model": str(self.job.temp_dir),
            "signatures": sigs,
            "checks": [],
            "durations": {},
        }
        self.to_publish: list[Job] = []
        sup.pipeline._to_publish = self.to_publish.append  # type: ignore[method-assign]

    def go(self) -> list[dict[str, Any]]:
        with capture_logs() as logs:
            self.sup.pipeline._validate_done(self.job, self.result)
        return logs

    @property
    def base(self) -> Path:
        base = self.st.cfg.base_path
        assert isinstance(base, Path)
        return base

    def kept_report(self) -> dict[str, Any]:
        (kept,) = (self.base / ".ckpt-exporter" / "failed").iterdir()
        data: dict[str, Any] = json.loads((kept / REPORT_RELPATH).read_text())
        return data


def _with_output_z() -> dict[str, SignatureReport]:
    outputs = {
        "y": {"dtype": "float32", "shape": [None, 1]},
        "z": {"dtype": "int64", "shape": [None]},
    }
    return {"serving_default": report_entry(declared(outputs=outputs))}


def _float64_input() -> dict[str, SignatureReport]:
    inputs = {"x": {"dtype": "float64", "shape": [None, 4]}}
    return {"serving_default": report_entry(declared(inputs=inputs))}


def test_an_added_output_passes_to_the_publication(sup: Supervisor, tmp_path: Path) -> None:
    _published_version(tmp_path / "serving" / "m", 1, REFERENCE)
    run = Run(sup, _with_output_z())
    logs = run.go()
    assert run.to_publish == [run.job]
    assert run.result["ok"] is True
    assert run.result["signature_contract"] == {
        "reference": 1,
        "acceptance": False,
        "changes": ["serving_default: output 'z' added"],
        "breaking": [],
    }
    (extended,) = [e for e in logs if e["event"] == "signatures_extended"]
    assert extended["changes"] == ["serving_default: output 'z' added"]
    # The report written into the export records the verdict.
    assert run.job.temp_dir is not None
    written = json.loads((run.job.temp_dir / REPORT_RELPATH).read_text())
    assert written["verdict"] == "passed" and written["signature_contract"]["reference"] == 1


def test_a_changed_input_dtype_is_rejected_with_the_diff(sup: Supervisor, tmp_path: Path) -> None:
    _published_version(tmp_path / "serving" / "m", 1, REFERENCE)
    run = Run(sup, _float64_input())
    logs = run.go()
    assert run.to_publish == []
    (rejected,) = [e for e in logs if e["event"] == "export_rejected"]
    assert rejected["reason"] == "signature_changed" and rejected["permanent"] is True
    assert "serving_default: input 'x' dtype float32 -> float64" in rejected["error"]
    assert "ckpt-exporter accept-signature m" in rejected["error"]
    record = json.loads((run.base / ".ckpt-exporter" / "rejected.json").read_text())
    assert record["fp2"]["reason"] == "signature_changed"
    report = run.kept_report()
    assert report["verdict"] == "failed" and report["reason"] == "signature_changed"
    assert report["signature_contract"]["breaking"] == [
        "serving_default: input 'x' dtype float32 -> float64"
    ]
    assert run.st.job is None
    series = (
        'ckpt_exporter_export_failures_total{model="m",phase="validate",reason="signature_changed"}'
    )
    assert f"{series} 1.0" in sup.metrics.exposition().decode()


def test_allow_signature_change_lets_every_change_through(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, allow=True)
    try:
        _published_version(tmp_path / "serving" / "m", 1, REFERENCE)
        run = Run(sup, {"other": report_entry(declared())})
        logs = run.go()
        assert run.to_publish == [run.job]
        contract = run.result["signature_contract"]
        assert contract.get("allowed_by") == "allow_signature_change"
        assert contract.get("changes") == [
            "other: signature added",
            "serving_default: signature removed",
        ]
        assert contract.get("breaking") == ["serving_default: signature removed"]
        (allowed,) = [e for e in logs if e["event"] == "signature_change_allowed"]
        assert allowed["diff"] == "serving_default: signature removed"
    finally:
        sup.shutdown()


def test_an_acceptance_lets_the_next_change_through_and_its_publication_consumes_it(
    sup: Supervisor, tmp_path: Path
) -> None:
    base = tmp_path / "serving" / "m"
    _published_version(base, 1, REFERENCE)
    accept_signature(base, "m")
    run = Run(sup, _float64_input())
    logs = run.go()
    assert run.to_publish == [run.job]
    contract = run.result["signature_contract"]
    assert contract.get("allowed_by") == "accept-signature" and contract.get("acceptance") is True
    assert any(e["event"] == "signature_change_allowed" for e in logs)
    assert signature_accepted(base)  # not before the version is published
    with capture_logs() as logs:
        sup.pipeline._consume_acceptance(run.job, 2)
    assert not signature_accepted(base)
    assert [e["event"] for e in logs] == ["signature_acceptance_consumed"]


def test_an_acceptance_written_after_the_check_is_not_consumed(
    sup: Supervisor, tmp_path: Path
) -> None:
    base = tmp_path / "serving" / "m"
    _published_version(base, 1, REFERENCE)
    run = Run(sup, REFERENCE)
    run.go()
    assert run.to_publish == [run.job]
    accept_signature(base, "m")
    sup.pipeline._consume_acceptance(run.job, 2)
    assert signature_accepted(base)


def test_an_unreadable_acceptance_record_retries_a_breaking_export(
    sup: Supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _published_version(tmp_path / "serving" / "m", 1, REFERENCE)

    def unreadable(_base: Any) -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pipeline, "signature_accepted", unreadable)
    run = Run(sup, _float64_input())
    logs = run.go()
    assert run.to_publish == []
    (failed,) = [e for e in logs if e["event"] == "export_failed"]
    assert failed["reason"] == "signature_changed" and failed["permanent"] is False
    assert "cannot be read" in failed["error"]
    assert "fp2" in run.st.retry_at and "fp2" not in run.st.rejected


def test_a_reference_without_declared_signatures_is_skipped_with_a_line(
    sup: Supervisor, tmp_path: Path
) -> None:
    old = {"serving_default": {"method": PREDICT, "ok": True}}
    _published_version(tmp_path / "serving" / "m", 1, old)
    run = Run(sup, _float64_input())
    logs = run.go()
    assert run.to_publish == [run.job]
    (skipped,) = [e for e in logs if e["event"] == "signature_check_skipped"]
    assert skipped["reference"] == 1 and "version 1 records no declared" in skipped["why"]
    assert "changes" not in run.result["signature_contract"]


def test_the_first_version_has_nothing_to_keep(sup: Supervisor) -> None:
    run = Run(sup, _float64_input())
    logs = run.go()
    assert run.to_publish == [run.job]
    assert run.result["signature_contract"] == {
        "reference": None,
        "acceptance": False,
        "skipped": "no version published yet",
    }
    assert not [e for e in logs if e["event"].startswith("signature")]


def test_the_reference_is_the_newest_published_version(sup: Supervisor, tmp_path: Path) -> None:
    base = tmp_path / "serving" / "m"
    _published_version(base, 1, _float64_input())
    _published_version(base, 3, REFERENCE)
    st = sup.models["m"]
    sup.publisher.refresh(st)
    ref = pipeline.reference_version(st)
    assert ref is not None and ref.version == 3
    run = Run(sup, _float64_input())
    run.go()
    assert run.to_publish == []  # compared with 3 (float32), not 1 (float64)


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_changed_input_dtype_is_refused_until_accepted(tmp_path: Path, daemons: Any) -> None:
    """Version 1 float32; a reload to float64 refuses the next checkpoint; an acceptance
    lets the one after through and is consumed."""
    from conftest import Daemon, train, version_dirs, write_config

    from daemon.basepath.catalog import read_metadata

    made = tmp_path / "made"
    train(made, 3)  # ckpt-5, ckpt-10, ckpt-15, handed to the daemon one at a time
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()

    def hand_over(step: int) -> None:
        files = sorted(made.glob(f"ckpt-{step}.*"), key=lambda p: p.suffix == ".index")
        for f in files:  # the index last, as TensorFlow writes it
            shutil.copy2(f, ckpts / f.name)

    def events(name: str) -> Any:
        return lambda ev: any(e["event"] == name for e in ev)

    config = write_config(tmp_path)
    base = tmp_path / "serving" / "m"
    hand_over(5)
    d: Daemon = daemons(config, tmp_path / "daemon.log")
    d.wait_for(events("published"), what="version 1")

    config.write_text(
        config.read_text()
        + '\n[models.signature.inputs]\nfeatures = { dtype = "float64", shape = [-1, 4] }\n'
    )
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(events("reloaded"), what="the reload")
    hand_over(10)
    ev = d.wait_for(events("export_rejected"), what="the refusal")
    (rejected,) = [e for e in ev if e["event"] == "export_rejected"]
    assert rejected["reason"] == "signature_changed", rejected
    assert "serving_default: input 'features' dtype float32 -> float64" in rejected["error"]
    assert sorted(version_dirs(base)) == [1]
    (kept,) = (base / ".ckpt-exporter" / "failed").iterdir()
    report = json.loads((kept / REPORT_RELPATH).read_text())
    assert report["reason"] == "signature_changed"
    assert report["signature_contract"]["breaking"] == [
        "serving_default: input 'features' dtype float32 -> float64"
    ]

    accept_signature(base, "m")
    hand_over(15)
    ev = d.wait_for(lambda ev: sum(e["event"] == "published" for e in ev) >= 2, what="version 2")
    assert sorted(version_dirs(base)) == [1, 2]
    assert any(e["event"] == "signature_acceptance_consumed" for e in ev)
    assert not signature_accepted(base)
    meta = read_metadata(base / "2")
    assert meta is not None
    features = meta["validation"]["signatures"]["serving_default"]["declared"]["inputs"]["features"]
    assert features == {"dtype": "float64", "shape": [None, 4]}
    assert d.stop() == 0
