"""Unit tests for daemon.children.samples: sample inputs read from .npz files, fitted to signatures.

Pure and fast: NumPy only (the module imports it lazily, as the children do), real files in
tmp_path, no TensorFlow.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.children.runtime import ChildFailure
from daemon.children.samples import (
    DEFAULT_SIGNATURE,
    fit_input,
    inputs_for,
    load_npz,
    reference_inputs,
)

WHERE = "/data/samples.npz"

Specs = dict[str, tuple[str, Sequence[int | None]]]


def savez(path: Path, **arrays: Any) -> Path:
    """An .npz holding ``arrays``; keys may hold "/" (SIGNATURE/INPUT)."""
    np.savez(path, **arrays)
    return path


def failure(exc: pytest.ExceptionInfo[ChildFailure]) -> str:
    """The message of a ChildFailure that must be the model's config's fault."""
    assert exc.value.reason == "sample_inputs"
    assert exc.value.permanent
    return str(exc.value)


# --- load_npz -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [None, ""])
def test_no_path_is_no_samples(path: str | None) -> None:
    assert load_npz(path, "sample_inputs") == {}


def test_keys_split_into_signature_and_name(tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([1, 2], dtype=np.int64)
    text = np.array([b"a", b"bc"])
    path = savez(
        tmp_path / "s.npz",
        x=x,
        **{"serving_default/ids": ids, "classification/inputs": text, "/y": ids},
    )
    got = load_npz(str(path), "sample_inputs")
    assert set(got) == {DEFAULT_SIGNATURE, "classification"}
    assert set(got[DEFAULT_SIGNATURE]) == {"x", "ids", "y"}
    assert set(got["classification"]) == {"inputs"}
    np.testing.assert_array_equal(got[DEFAULT_SIGNATURE]["x"], x)
    assert got[DEFAULT_SIGNATURE]["x"].dtype == np.float32
    np.testing.assert_array_equal(got[DEFAULT_SIGNATURE]["ids"], ids)
    np.testing.assert_array_equal(got[DEFAULT_SIGNATURE]["y"], ids)
    np.testing.assert_array_equal(got["classification"]["inputs"], text)


def test_the_arrays_outlive_the_file(tmp_path: Path) -> None:
    path = savez(tmp_path / "s.npz", x=np.ones(3))
    got = load_npz(str(path), "sample_inputs")
    path.unlink()
    np.testing.assert_array_equal(got[DEFAULT_SIGNATURE]["x"], np.ones(3))


def test_compressed_and_empty_files(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "c.npz", x=np.zeros((4, 2)))
    assert load_npz(str(tmp_path / "c.npz"), "x")[DEFAULT_SIGNATURE]["x"].shape == (4, 2)
    np.savez(tmp_path / "e.npz")
    assert load_npz(str(tmp_path / "e.npz"), "x") == {}


def truncated(path: Path) -> None:
    savez(path, x=np.arange(1000.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_member(path: Path) -> None:
    savez(path, x=np.arange(1000.0))
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the array's bytes: the member's CRC fails
    path.write_bytes(bytes(data))


def corrupt_deflate(path: Path) -> None:
    """A compressed member whose deflate stream is invalid (zlib.error, not BadZipFile)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(100))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", buf.getvalue())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("x.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start : start + info.compress_size] = b"\xff" * info.compress_size
    path.write_bytes(bytes(data))


def npy(path: Path) -> None:
    np.save(path.with_suffix(".npy"), np.zeros(3))
    path.with_suffix(".npy").rename(path)


def pickled(path: Path) -> None:
    savez(path, x=np.array([{"a": 1}], dtype=object))


def zip_without_arrays(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"not an array")


UNREADABLE = {
    "missing": lambda p: None,
    "folder": lambda p: p.mkdir(),
    "empty": lambda p: p.write_bytes(b""),
    "text": lambda p: p.write_text("x = [1, 2, 3]\n"),
    "truncated": truncated,
    "corrupt member": corrupt_member,
    "corrupt deflate stream": corrupt_deflate,
    "npy, not npz": npy,
    "object array": pickled,
    "zip of non-arrays": zip_without_arrays,
}


@pytest.mark.parametrize("make", UNREADABLE.values(), ids=UNREADABLE.keys())
@pytest.mark.parametrize("what", ["sample_inputs", "golden_outputs"])
def test_an_unreadable_file_is_the_configs_fault(tmp_path: Path, make: Any, what: str) -> None:
    path = tmp_path / "s.npz"
    make(path)
    with pytest.raises(ChildFailure) as info:
        load_npz(str(path), what)
    message = failure(info)
    assert message.startswith(f"{what} {path}: cannot read it as an .npz file")


# --- fit_input: dtypes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "dtype"),
    [
        (np.float64, "float32"),  # np.savez keeps NumPy's wide defaults
        (np.float32, "float32"),
        (np.float16, "float32"),
        (np.float32, "float64"),
        (np.float64, "float16"),
        (np.float64, "bfloat16"),  # fed as float32
        (np.int64, "int32"),
        (np.int32, "int64"),
        (np.int64, "int8"),
        (np.uint8, "int32"),
        (np.uint8, "uint8"),
        (np.uint16, "uint8"),
        (np.int64, "float32"),  # integers are exact numbers for a float input
        (np.bool_, "bool"),
    ],
)
def test_numbers_convert_within_their_kind(given: type, dtype: str) -> None:
    value = np.array([[0, 1, 2]], dtype=given) if given is not np.bool_ else np.array([[True]])
    got = fit_input(value, "x", dtype, [None, None], WHERE)
    want = np.float32 if dtype == "bfloat16" else np.dtype(dtype)
    assert got.dtype == want
    np.testing.assert_array_equal(got, value.astype(want))


@pytest.mark.parametrize(
    ("given", "dtype"),
    [
        (np.array([0.5, 1.0]), "int32"),  # float to int would truncate
        (np.array([1.0], dtype=np.float32), "int64"),
        (np.array([1.0]), "uint8"),
        (np.array([True, False]), "float32"),  # bool is not a number here
        (np.array([True]), "int32"),
        (np.array([True]), "uint8"),
        (np.array([1, 0]), "bool"),
        (np.array([1.0, 0.0]), "bool"),
        (np.array([-1]), "uint8"),  # signed to unsigned
        (np.array([1], dtype=np.int16), "uint16"),
        (np.array([1 + 2j]), "float32"),
        (np.array(["1.5"]), "float32"),
        (np.array([b"1"]), "int32"),
    ],
    ids=lambda v: str(v.dtype) if isinstance(v, np.ndarray) else str(v),
)
def test_other_conversions_are_refused(given: np.ndarray[Any, Any], dtype: str) -> None:
    with pytest.raises(ChildFailure) as info:
        fit_input(given, "x", dtype, [-1], WHERE)
    assert failure(info) == f"{WHERE}: 'x' holds {given.dtype}, the signature takes {dtype}"


@pytest.mark.parametrize(
    ("given", "dtype"),
    [
        (np.array([2**40, 1]), "int32"),
        (np.array([-(2**31) - 1]), "int32"),
        (np.array([300]), "int8"),
        (np.array([200], dtype=np.uint8), "int8"),
        (np.array([70000], dtype=np.uint32), "uint16"),
        (np.array([1e300]), "float32"),
        (np.array([-1e39]), "float32"),
        (np.array([70000.0]), "float16"),
    ],
)
def test_values_out_of_range_are_refused(given: np.ndarray[Any, Any], dtype: str) -> None:
    # A narrowing conversion must not wrap integers or turn finite floats into infinities.
    with pytest.raises(ChildFailure) as info:
        fit_input(given, "ids", dtype, [-1], WHERE)
    message = failure(info)
    assert message.startswith(f"{WHERE}: 'ids' holds values out of the range of {dtype}")


@pytest.mark.parametrize(
    ("given", "dtype"),
    [
        (np.array([2**31 - 1, -(2**31)]), "int32"),
        (np.array([127, -128]), "int8"),
        (np.array([255], dtype=np.uint16), "uint8"),
        (np.array([3.4e38, -3.4e38]), "float32"),
        (np.array([np.inf, -np.inf, np.nan]), "float32"),  # already not finite: left alone
        (np.array([1e-50]), "float32"),  # underflow to 0 is rounding, not overflow
        (np.zeros((0,), dtype=np.int64), "int8"),
    ],
)
def test_values_at_the_limits_are_kept(given: np.ndarray[Any, Any], dtype: str) -> None:
    got = fit_input(given, "x", dtype, [-1], WHERE)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, given.astype(dtype))


def test_plain_python_values_are_accepted() -> None:
    got = fit_input([[1.5, 2.5]], "x", "float32", [None, 2], WHERE)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[1.5, 2.5]])
    assert fit_input(3, "n", "int32", [], WHERE).dtype == np.int32


# --- fit_input: strings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (np.array([b"a", b"bc"]), [b"a", b"bc"]),
        (np.array(["a", "bc"]), [b"a", b"bc"]),
        (np.array(["é", "日本"]), ["é".encode(), "日本".encode()]),
        (np.array([b"a", "b"], dtype=object), [b"a", b"b"]),
        (np.array([b"\x00\x01\xff"], dtype=object), [b"\x00\x01\xff"]),  # serialized protos
        (np.array([], dtype="S1"), []),
    ],
    ids=["bytes", "str", "non-ascii", "object", "binary", "empty"],
)
def test_strings_become_object_arrays_of_bytes(
    given: np.ndarray[Any, Any], expected: list[bytes]
) -> None:
    got = fit_input(given, "text", "string", [-1], WHERE)
    assert got.dtype == object
    assert got.shape == given.shape
    assert got.tolist() == expected
    assert all(type(v) in (bytes, np.bytes_) for v in got.ravel())


def test_a_2d_string_array_keeps_its_shape() -> None:
    got = fit_input(np.array([["a", "b"], ["c", "d"]]), "t", "string", [None, 2], WHERE)
    assert got.shape == (2, 2)
    assert got.tolist() == [[b"a", b"b"], [b"c", b"d"]]


@pytest.mark.parametrize(
    "given",
    [np.array([1, 2]), np.array([1.5]), np.array([True]), np.array([1], dtype=np.uint8)],
    ids=lambda v: str(v.dtype),
)
def test_numbers_for_a_string_input_are_refused(given: np.ndarray[Any, Any]) -> None:
    with pytest.raises(ChildFailure) as info:
        fit_input(given, "text", "string", [-1], WHERE)
    assert failure(info) == f"{WHERE}: 'text' must hold strings, it holds {given.dtype}"


# --- fit_input: shapes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value_shape", "shape"),
    [
        ((5, 4), [None, 4]),
        ((5, 4), [-1, 4]),
        ((1, 4), [-1, 4]),
        ((0, 4), [-1, 4]),
        ((5, 4), [-1, -1]),
        ((5, 4), [None, None]),
        ((5, 4), [5, 4]),
        ((2, 3, 4), [2, None, 4]),
        ((), []),
        ((7,), [None]),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "string"])
def test_shapes_that_fit(value_shape: tuple[int, ...], shape: list[int | None], dtype: str) -> None:
    value = np.zeros(value_shape) if dtype != "string" else np.full(value_shape, b"s")
    got = fit_input(value, "x", dtype, shape, WHERE)
    assert got.shape == value_shape


@pytest.mark.parametrize(
    ("value_shape", "shape", "shown"),
    [
        ((5, 4), [None], "[-1]"),  # rank 2 for rank 1
        ((4,), [None, 4], "[-1, 4]"),  # rank 1 for rank 2
        ((), [1], "[1]"),
        ((1,), [], "[]"),
        ((5, 3), [None, 4], "[-1, 4]"),  # a known dimension differs
        ((5, 4), [4, -1], "[4, -1]"),
        ((2, 3, 5), [2, None, 4], "[2, -1, 4]"),
        ((0, 4), [1, 4], "[1, 4]"),
    ],
)
@pytest.mark.parametrize("dtype", ["int64", "string"])
def test_shapes_that_do_not_fit(
    value_shape: tuple[int, ...], shape: list[int | None], shown: str, dtype: str
) -> None:
    value = (
        np.zeros(value_shape, dtype=np.int64) if dtype != "string" else np.full(value_shape, "s")
    )
    with pytest.raises(ChildFailure) as info:
        fit_input(value, "images", dtype, shape, WHERE)
    assert failure(info) == (
        f"{WHERE}: 'images' has shape {list(value_shape)}, the signature takes {shown} "
        "(-1: any size)"
    )


def test_the_dtype_is_checked_before_the_shape() -> None:
    with pytest.raises(ChildFailure, match="holds float64"):
        fit_input(np.zeros((3, 3)), "x", "int32", [2], WHERE)


# --- inputs_for ---------------------------------------------------------------------------

SPECS: Specs = {"a": ("float32", (None, 2)), "b": ("int64", (None,))}


def good() -> dict[str, Any]:
    return {"a": np.ones((3, 2)), "b": np.arange(3)}


def test_the_inputs_of_a_signature() -> None:
    got = inputs_for({DEFAULT_SIGNATURE: good()}, DEFAULT_SIGNATURE, SPECS, WHERE, required=True)
    assert got is not None
    assert list(got) == ["a", "b"]
    assert got["a"].dtype == np.float32 and got["b"].dtype == np.int64
    np.testing.assert_array_equal(got["a"], np.ones((3, 2)))


def test_the_inputs_of_another_signature() -> None:
    samples = {DEFAULT_SIGNATURE: {"x": np.ones(1)}, "classify": good()}
    got = inputs_for(samples, "classify", SPECS, WHERE, required=False)
    assert got is not None and set(got) == {"a", "b"}


@pytest.mark.parametrize("required", [False, True])
def test_no_file_is_no_inputs(required: bool) -> None:
    assert inputs_for({}, DEFAULT_SIGNATURE, SPECS, WHERE, required=required) is None


@pytest.mark.parametrize(
    ("signature", "name_them"),
    [
        (DEFAULT_SIGNATURE, "(name them INPUT)"),
        ("classification", "(name them classification/INPUT)"),
    ],
)
def test_a_required_signature_missing_from_the_file(signature: str, name_them: str) -> None:
    samples = {"other": good()}
    with pytest.raises(ChildFailure) as info:
        inputs_for(samples, signature, SPECS, WHERE, required=True)
    assert failure(info) == (
        f"{WHERE}: no arrays for signature {signature!r}; it takes ['a', 'b'] {name_them}"
    )


def test_a_signature_missing_from_the_file_that_is_not_required() -> None:
    samples = {DEFAULT_SIGNATURE: good()}
    assert inputs_for(samples, "classification", SPECS, WHERE, required=False) is None


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"a": np.ones((1, 2))}, "lacks ['b']"),
        ({}, "lacks ['a', 'b']"),  # an empty entry is no entry: not required, so None below
        ({**good(), "c": np.ones(1)}, "has unknown ['c']"),
        ({**good(), "z": np.ones(1), "c": np.ones(1)}, "has unknown ['c', 'z']"),
        ({"a": np.ones((1, 2)), "B": np.ones(1)}, "lacks ['b']; has unknown ['B']"),
    ],
)
def test_missing_and_unknown_keys_are_named(given: dict[str, Any], says: str) -> None:
    samples = {"sig": given}
    if not given:
        assert inputs_for(samples, "sig", SPECS, WHERE, required=False) is None
        return
    for required in (False, True):
        with pytest.raises(ChildFailure) as info:
            inputs_for(samples, "sig", SPECS, WHERE, required=required)
        assert failure(info) == f"{WHERE}: signature 'sig' takes ['a', 'b']; the file {says}"


def test_an_input_that_does_not_fit_names_its_key() -> None:
    given = {**good(), "b": np.array([0.5, 1.5])}
    with pytest.raises(ChildFailure) as info:
        inputs_for({DEFAULT_SIGNATURE: given}, DEFAULT_SIGNATURE, SPECS, WHERE, required=True)
    assert failure(info) == f"{WHERE}: 'b' holds float64, the signature takes int64"


# --- reference_inputs ---------------------------------------------------------------------

SYNTH = {"a": np.zeros((1, 2), np.float32), "b": np.zeros((1,), np.int64)}


@pytest.mark.parametrize("req", [{}, {"sample_inputs": None}, {"sample_inputs": ""}])
def test_without_sample_inputs_the_synthesised_ones(req: dict[str, Any]) -> None:
    got = reference_inputs(req, SPECS, SYNTH)
    assert got == SYNTH
    assert got is not SYNTH  # a copy: the caller may add to it
    got["c"] = 1
    assert "c" not in SYNTH


def test_with_sample_inputs_the_files_arrays(tmp_path: Path) -> None:
    path = savez(
        tmp_path / "s.npz",
        a=np.full((4, 2), 0.5),
        b=np.arange(4),
        **{"classification/inputs": np.array([b"x"])},
    )
    got = reference_inputs({"sample_inputs": str(path)}, SPECS, SYNTH)
    assert set(got) == {"a", "b"}
    assert got["a"].dtype == np.float32 and got["a"].shape == (4, 2)
    np.testing.assert_array_equal(got["a"], np.full((4, 2), 0.5))
    np.testing.assert_array_equal(got["b"], np.arange(4))


def test_sample_inputs_without_serving_default(tmp_path: Path) -> None:
    path = savez(tmp_path / "s.npz", **{"classification/inputs": np.array([b"x"])})
    with pytest.raises(ChildFailure) as info:
        reference_inputs({"sample_inputs": str(path)}, SPECS, SYNTH)
    assert failure(info).startswith(f"{path}: no arrays for signature 'serving_default'")


def test_sample_inputs_that_do_not_fit(tmp_path: Path) -> None:
    path = savez(tmp_path / "s.npz", a=np.ones((4, 3)), b=np.arange(4))
    with pytest.raises(ChildFailure) as info:
        reference_inputs({"sample_inputs": str(path)}, SPECS, SYNTH)
    assert failure(info).startswith(f"{path}: 'a' has shape [4, 3]")


def test_sample_inputs_that_are_gone(tmp_path: Path) -> None:
    path = tmp_path / "gone.npz"
    with pytest.raises(ChildFailure) as info:
        reference_inputs({"sample_inputs": str(path)}, SPECS, SYNTH)
    assert failure(info).startswith(f"sample_inputs {path}: cannot read it")
