"""The signature contract: which changes of a model's SignatureDefs break its clients.

Before a version is published its SignatureDefs are compared with those of a
reference version (the version clients use now). A change a client already
written against the reference would fail on is *breaking*; anything else is
*compatible*:

- a signature removed: breaking; a signature added: compatible;
- its method name changed (``tensorflow/serving/predict`` -> ``.../classify``):
  breaking, since the client calls another API;
- an input removed or renamed: breaking; an input added: breaking too,
  because TF Serving refuses a request that lacks one of the signature's
  inputs, and clients do not send the new one;
- an input's dtype changed: breaking (the server refuses a tensor of another
  dtype: a float32 client's request to a float64 input fails);
- an input's shape: a dimension made unknown (fixed -> None) or a rank made
  unknown is compatible, since what clients send still fits; an unknown
  dimension made fixed, a fixed dimension changed, or the rank changed is
  breaking, since requests of other sizes that fitted before now fail;
- an output removed or renamed: breaking; an output added: compatible
  (clients ignore outputs they do not read);
- an output's dtype changed: breaking (clients read a TensorProto's typed
  field: ``float_val`` is empty once it is a float64);
- an output's shape: the rank or a fixed dimension changed is breaking;
  a dimension that became unknown or known is compatible (it says nothing
  new about what the server returns for a request clients already send).

Renames are told apart from removals only for readability: when exactly one
input (or output) of a signature disappeared and exactly one appeared, the
change reads ``input 'a' renamed to 'b'``. Either way it breaks.

Tensors are described as the validator read them from the SignatureDefs
(:class:`daemon.protocol.DeclaredSignature`); :func:`from_report` reads them
back from a validation report's ``signatures`` (or from a published
version's metadata, which carries that part of the report).

Pure: standard library only, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

#: A tensor's declared shape: a size per dimension (None: unknown), or None
#: for an unknown rank.
Shape = tuple[int | None, ...] | None

#: What changed, one word per kind of change.
ChangeKind = Literal[
    "signature_removed",
    "signature_added",
    "method_changed",
    "input_removed",
    "input_added",
    "input_renamed",
    "input_dtype",
    "input_shape",
    "output_removed",
    "output_added",
    "output_renamed",
    "output_dtype",
    "output_shape",
]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a SignatureDef: its dtype name and declared shape."""

    dtype: str
    shape: Shape = None


@dataclass(frozen=True, slots=True)
class SignatureSpec:
    """One SignatureDef: its method name, inputs and outputs by key."""

    method: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between the reference's signatures and the new ones.

    ``str(change)`` is its readable line:
    ``serving_default: input 'x' dtype float32 -> float64``.
    """

    signature: str
    kind: ChangeKind
    breaking: bool
    #: What changed, without the signature's name.
    detail: str

    def __str__(self) -> str:
        return f"{self.signature}: {self.detail}"


def diff(old: Mapping[str, SignatureSpec], new: Mapping[str, SignatureSpec]) -> list[Change]:
    """Every change from ``old`` (the reference) to ``new``; see the module docstring.

    Ordered by signature name, then method, inputs, outputs; empty when the
    two are the same.
    """
    changes: list[Change] = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            changes.append(Change(name, "signature_removed", True, "signature removed"))
        elif name not in old:
            changes.append(Change(name, "signature_added", False, "signature added"))
        else:
            changes.extend(_signature(name, old[name], new[name]))
    return changes


def breaking(changes: Iterable[Change]) -> list[Change]:
    """The changes that break clients of the reference."""
    return [c for c in changes if c.breaking]


def render(changes: Iterable[Change]) -> str:
    """The changes as one readable line, ``; `` between them ("" for none)."""
    return "; ".join(str(c) for c in changes)


def render_shape(shape: Shape) -> str:
    """A shape as TensorFlow prints it: ``(None, 4)``, ``()``, ``<unknown rank>``."""
    if shape is None:
        return "<unknown rank>"
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


def _signature(name: str, old: SignatureSpec, new: SignatureSpec) -> Iterator[Change]:
    if old.method != new.method:
        yield Change(name, "method_changed", True, f"method {old.method} -> {new.method}")
    yield from _tensors(name, "input", old.inputs, new.inputs)
    yield from _tensors(name, "output", old.outputs, new.outputs)


#: The kind of each change of an input or output.
_KINDS: dict[tuple[str, str], ChangeKind] = {
    ("input", "removed"): "input_removed",
    ("input", "added"): "input_added",
    ("input", "renamed"): "input_renamed",
    ("input", "dtype"): "input_dtype",
    ("input", "shape"): "input_shape",
    ("output", "removed"): "output_removed",
    ("output", "added"): "output_added",
    ("output", "renamed"): "output_renamed",
    ("output", "dtype"): "output_dtype",
    ("output", "shape"): "output_shape",
}


def _tensors(
    name: str,
    side: Literal["input", "output"],
    old: Mapping[str, TensorSpec],
    new: Mapping[str, TensorSpec],
) -> Iterator[Change]:
    removed = sorted(set(old) - set(new))
    added = sorted(set(new) - set(old))
    pairs = [(k, k) for k in sorted(set(old) & set(new))]
    if len(removed) == 1 and len(added) == 1:
        (was,), (now,) = removed, added
        yield Change(name, _KINDS[side, "renamed"], True, f"{side} {was!r} renamed to {now!r}")
        pairs.append((was, now))
        removed, added = [], []
    for key in removed:
        yield Change(name, _KINDS[side, "removed"], True, f"{side} {key!r} removed")
    for key in added:
        # A new input is one clients do not send; a new output, one they do not read.
        yield Change(name, _KINDS[side, "added"], side == "input", f"{side} {key!r} added")
    for was, now in pairs:
        label = f"{side} {now!r}" if was == now else f"{side} {now!r} (was {was!r})"
        a, b = old[was], new[now]
        if a.dtype != b.dtype:
            yield Change(name, _KINDS[side, "dtype"], True, f"{label} dtype {a.dtype} -> {b.dtype}")
        if a.shape != b.shape:
            shape_breaks = input_shape_breaks if side == "input" else output_shape_breaks
            breaks = shape_breaks(a.shape, b.shape)
            detail = f"{label} shape {render_shape(a.shape)} -> {render_shape(b.shape)}"
            yield Change(name, _KINDS[side, "shape"], breaks, detail)


def input_shape_breaks(old: Shape, new: Shape) -> bool:
    """Whether requests that fitted input shape ``old`` may not fit ``new``.

    Fixed -> unknown (a dimension or the rank) is compatible; unknown ->
    fixed, a fixed size changed, or another rank is breaking.
    """
    if new is None:
        return False  # any rank, any size: whatever fitted before fits
    if old is None or len(old) != len(new):
        return True
    return any(n is not None and o != n for o, n in zip(old, new, strict=True))


def output_shape_breaks(old: Shape, new: Shape) -> bool:
    """Whether clients that read outputs of shape ``old`` may not read ``new``.

    Breaking: both ranks known and different, or a dimension fixed in both
    with another size. A dimension (or rank) that became unknown or known is
    compatible.
    """
    if old is None or new is None:
        return False
    if len(old) != len(new):
        return True
    return any(o is not None and n is not None and o != n for o, n in zip(old, new, strict=True))


# --- reading a validation report -------------------------------------------------


def from_report(signatures: Any) -> dict[str, SignatureSpec] | None:
    """The SignatureDefs a validation report's ``signatures`` declares.

    ``signatures`` is the report's (or a published version's metadata's
    ``validation.signatures``) mapping of name -> entry, each with ``method``
    and ``declared`` (``{"inputs": {KEY: {"dtype", "shape"}}, "outputs": ...}``).
    None when it is not that: a version validated before the validator
    recorded ``declared``, or a hand-edited file; such a version cannot be
    compared with.
    """
    if not isinstance(signatures, Mapping) or not signatures:
        return None
    out: dict[str, SignatureSpec] = {}
    for name, entry in signatures.items():
        if not isinstance(name, str) or not isinstance(entry, Mapping):
            return None
        method, declared = entry.get("method"), entry.get("declared")
        if not isinstance(method, str) or not isinstance(declared, Mapping):
            return None
        inputs = _tensor_specs(declared.get("inputs"))
        outputs = _tensor_specs(declared.get("outputs"))
        if inputs is None or outputs is None:
            return None
        out[name] = SignatureSpec(method, inputs, outputs)
    return out


def _tensor_specs(data: Any) -> dict[str, TensorSpec] | None:
    if not isinstance(data, Mapping):
        return None
    out: dict[str, TensorSpec] = {}
    for key, spec in data.items():
        if not isinstance(key, str) or not isinstance(spec, Mapping):
            return None
        dtype, shape = spec.get("dtype"), spec.get("shape", None)
        if not isinstance(dtype, str):
            return None
        if shape is None:
            out[key] = TensorSpec(dtype, None)
            continue
        if not isinstance(shape, list) or not all(_dim(d) for d in shape):
            return None
        out[key] = TensorSpec(dtype, tuple(None if d is None or d < 0 else d for d in shape))
    return out


def _dim(d: Any) -> bool:
    return d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= -1)
