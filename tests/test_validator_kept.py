"""A reusable validator's kept session: reused only for the same graph, never stale values.

In this process, as a kept validator runs: two versions of one graph (the
second linked over another checkpoint, so its ``saved_model.pb`` is a byte
copy), each with golden outputs computed from its own checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import mapped_export, train

from daemon.children import incremental, runtime, validator
from daemon.protocol import ValidateRequest

pytestmark = pytest.mark.e2e


def _golden(tmp_path: Path, prefix: Path, name: str) -> Path:
    import tensorflow as tf

    from daemon.demo.model import build_model

    model = build_model()
    tf.train.Checkpoint(model=model).read(str(prefix)).assert_existing_objects_matched()
    features = np.random.default_rng(3).normal(size=(4, 4)).astype("float32")
    np.savez(tmp_path / "sample.npz", features=features)
    out = tmp_path / f"golden-{name}.npz"
    np.savez(out, output_0=np.asarray(model(features)))
    return out


def _validate(version: Path, golden: Path, tmp_path: Path) -> dict[str, Any]:
    req: ValidateRequest = {
        "saved_model": str(version),
        "result": str(tmp_path / "unused.json"),
        "sample_inputs": str(tmp_path / "sample.npz"),
        "golden_outputs": str(golden),
        "graph_of": None,
    }
    report: dict[str, Any] = dict(validator.validate(req))
    report["serving_load"] = next(c for c in report["checks"] if c["check"] == "serving_load")
    return report


def _as_child(monkeypatch: pytest.MonkeyPatch, *, reusable: bool) -> None:
    """Run the validator here as a fresh child: reusable (forked with max_exports > 1) or not."""
    reuse = runtime._Reuse(done_fd=-1, max_requests=10) if reusable else None
    monkeypatch.setattr(runtime, "_reuse", reuse)
    monkeypatch.setattr(validator, "_kept", None)


def test_a_kept_session_restores_each_versions_own_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpts = tmp_path / "ckpts"
    train(ckpts, 2)
    v1 = mapped_export(tmp_path / "v1", ckpts / "ckpt-5")
    (tmp_path / "v2").mkdir()
    incremental.link(
        str(v1), str(ckpts / "ckpt-10"), "model", str(tmp_path / "v2"), need_warmup=False
    )
    v2 = tmp_path / "v2"
    assert (v1 / "saved_model.pb").read_bytes() == (v2 / "saved_model.pb").read_bytes()
    golden1 = _golden(tmp_path, ckpts / "ckpt-5", "1")
    golden2 = _golden(tmp_path, ckpts / "ckpt-10", "2")

    # A reusable child keeps the session it passed.
    _as_child(monkeypatch, reusable=True)
    first = _validate(v1, golden1, tmp_path)
    assert first["ok"] and first["serving_load"]["kept"] is False
    second = _validate(v2, golden2, tmp_path)
    assert second["ok"], second.get("error")
    assert second["serving_load"]["kept"] is True
    # Back to version 1's variables in the same session: its values, not 2's,
    # so 2's golden outputs no longer match. Nothing of 2 survived the restore.
    third = _validate(v1, golden2, tmp_path)
    assert third["serving_load"]["kept"] is True
    assert not third["ok"] and third["reason"] == "golden_mismatch", third.get("error")
    # The failure closed the session: nothing is kept after it.
    assert validator._kept is None


def test_another_graph_is_loaded_from_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpts = tmp_path / "ckpts"
    train(ckpts, 1)
    v1 = mapped_export(tmp_path / "v1", ckpts / "ckpt-5")
    other = _with_second_signature(tmp_path / "other", ckpts / "ckpt-5")
    assert (v1 / "saved_model.pb").read_bytes() != (other / "saved_model.pb").read_bytes()
    golden = _golden(tmp_path, ckpts / "ckpt-5", "1")
    _as_child(monkeypatch, reusable=True)
    assert _validate(v1, golden, tmp_path)["serving_load"]["kept"] is False
    report = _validate(other, golden, tmp_path)
    assert report["ok"], report.get("error")
    assert report["serving_load"]["kept"] is False
    assert sorted(report["signatures"]) == ["doubled", "serving_default"]


def _with_second_signature(out: Path, prefix: Path) -> Path:
    """The demo model from ``prefix`` with one more signature: the same weights, another graph."""
    import keras
    import tensorflow as tf

    from daemon.demo.model import build_model

    model = build_model()
    tf.train.Checkpoint(model=model).read(str(prefix)).assert_existing_objects_matched()
    spec = [tf.TensorSpec([None, 4], tf.float32, name="features")]
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", lambda x: model(x), input_signature=spec)
    archive.add_endpoint("doubled", lambda x: 2.0 * model(x), input_signature=spec)
    archive.write_out(str(out), verbose=False)
    return out


def test_a_single_use_validator_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpts = tmp_path / "ckpts"
    train(ckpts, 1)
    v1 = mapped_export(tmp_path / "v1", ckpts / "ckpt-5")
    golden = _golden(tmp_path, ckpts / "ckpt-5", "1")
    _as_child(monkeypatch, reusable=False)
    assert _validate(v1, golden, tmp_path)["ok"]
    assert validator._kept is None
