"""User-given sample inputs and golden outputs (``.npz`` files), read in the children.

``sample_inputs`` holds one array per input of ``serving_default``, named like
the input (``x``), and optionally arrays for other signatures named
``SIGNATURE/INPUT``. The exporter runs the model on them to make the
reference, the validator replays them, the warmup records carry them: real
inputs catch what synthesised ones cannot (a string input that must parse, a
value range the model needs).

``golden_outputs`` holds expected outputs the same way (``OUTPUT`` for
``serving_default``, ``SIGNATURE/OUTPUT`` otherwise), compared within the
model's ``rtol``/``atol``: a checkpoint whose answers moved too far is not
published.

Without ``sample_inputs`` the inputs are synthesised
(:func:`~daemon.children.runtime.synth_input`: unknown dimensions = 1), except
that an image input of unknown height or width gets ``synthetic_image_size``
for them (:func:`image_shape`): real preprocessing (crops, aspect-preserving
resizes) refuses a 1x1 image.

Contract: a file that cannot be read, or an array that does not fit its
input (dtype kind, rank, known dimensions), raises
:class:`~daemon.children.runtime.ChildFailure` with reason ``sample_inputs`` naming the
file and the key: the model's config is at fault, not the checkpoint, so the
supervisor pauses the model instead of rejecting checkpoints.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from daemon.children import runtime
from daemon.protocol import ExportRequest

DEFAULT_SIGNATURE = "serving_default"
#: Height and width of a synthesised image of unknown size (``synthetic_image_size``).
DEFAULT_IMAGE_SIZE = 224
#: The dtypes of an image input: uint8 pixels or floats.
IMAGE_DTYPES = ("uint8", "float16", "bfloat16", "float32", "float64")


def image_shape(dtype: str, shape: Sequence[int | None], size: int) -> list[int] | None:
    """The shape to synthesise an image input of unknown height or width at, else None.

    An image input is ``[batch, height, width, channels]`` of uint8 or a float
    dtype with 1 or 3 channels. Its unknown height and width become ``size``
    and an unknown batch 1. None for any other input, and for an image whose
    height and width are known: those keep :func:`~daemon.children.runtime.synth_input`'s
    rule (unknown dimensions = 1).
    """
    if dtype not in IMAGE_DTYPES or len(shape) != 4:
        return None
    batch, height, width, channels = (None if d is None or d < 0 else int(d) for d in shape)
    if channels not in (1, 3) or (height is not None and width is not None):
        return None
    return [
        1 if batch is None else batch,
        size if height is None else height,
        size if width is None else width,
        channels,
    ]


def synthesise(key: str, dtype: str, shape: Sequence[int | None], image_size: int) -> Any:
    """A deterministic input for ``key``, an image of unknown size at ``image_size``."""
    sized = image_shape(dtype, shape, image_size)
    return runtime.synth_input(key, dtype, shape if sized is None else sized)


def load_npz(path: str | None, what: str) -> dict[str, dict[str, Any]]:
    """``{signature: {name: array}}`` from an ``.npz`` (``{}`` without a path)."""
    import numpy as np

    if not path:
        return {}
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # an .npy: one unnamed array
            raise ValueError("it holds one array (.npy), not named arrays (numpy.savez)")
        with loaded as z:
            arrays = {k: z[k] for k in z.files}
        # NpzFile returns a member that is not an .npy as its raw bytes.
        raw = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
        if raw:
            raise ValueError(f"{raw} are not .npy arrays")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise runtime.ChildFailure(
            "sample_inputs", f"{what} {path}: cannot read it as an .npz file ({e})"
        ) from e
    out: dict[str, dict[str, Any]] = {}
    for key, value in arrays.items():
        sig, _, name = key.rpartition("/")
        out.setdefault(sig or DEFAULT_SIGNATURE, {})[name] = value
    return out


def fit_input(value: Any, key: str, dtype: str, shape: Sequence[int | None], where: str) -> Any:
    """``value`` as an input of ``dtype`` and ``shape``, or ChildFailure naming ``key``.

    Numbers convert within their kind (float64 to float32, int64 to int32:
    ``np.savez`` keeps NumPy's wide defaults) when every value fits the
    narrower dtype; anything else is refused rather than silently truncated,
    wrapped or overflowed. Bytes arrays become the object arrays TensorFlow
    feeds as strings.
    """
    import numpy as np

    arr = np.asarray(value)
    if dtype == "string":
        if arr.dtype.kind not in "SUO":
            raise runtime.ChildFailure(
                "sample_inputs", f"{where}: {key!r} must hold strings, it holds {arr.dtype}"
            )
        arr = np.vectorize(
            lambda s: s if isinstance(s, bytes) else str(s).encode(), otypes=[object]
        )(arr)
    else:
        target = np.dtype("float32" if dtype == "bfloat16" else dtype)
        ok = arr.dtype == target or (
            np.can_cast(arr.dtype, target, casting="same_kind") and arr.dtype.kind != "b"
        )
        if not ok:
            raise runtime.ChildFailure(
                "sample_inputs",
                f"{where}: {key!r} holds {arr.dtype}, the signature takes {dtype}",
            )
        with np.errstate(over="ignore"):  # overflow is refused just below
            out = arr.astype(target)
        if arr.dtype.kind in "iu" and target.kind in "iu" and arr.size:
            info = np.iinfo(target)
            wraps = int(arr.min()) < info.min or int(arr.max()) > info.max
        else:
            wraps = target.kind == "f" and bool(np.any(np.isfinite(arr) & ~np.isfinite(out)))
        if wraps:
            raise runtime.ChildFailure(
                "sample_inputs",
                f"{where}: {key!r} holds values out of the range of {dtype}, the signature's "
                f"dtype ({arr.dtype} values would wrap or overflow)",
            )
        arr = out
    dims = list(shape)
    if len(arr.shape) != len(dims) or any(
        d is not None and d >= 0 and d != n for d, n in zip(dims, arr.shape, strict=True)
    ):
        shown = [-1 if d is None else d for d in dims]
        raise runtime.ChildFailure(
            "sample_inputs",
            f"{where}: {key!r} has shape {list(arr.shape)}, the signature takes {shown} "
            "(-1: any size)",
        )
    return arr


def inputs_for(
    samples: Mapping[str, dict[str, Any]],
    signature: str,
    specs: Mapping[str, tuple[str, Sequence[int | None]]],
    where: str,
    *,
    required: bool,
) -> dict[str, Any] | None:
    """The sample inputs of ``signature`` checked against ``specs`` (key: dtype, shape).

    None when the file has none for this signature and they are not
    ``required``; a file that gives some inputs of a signature must give all.
    """
    given = samples.get(signature)
    if not given:
        if required and samples:
            prefix = "" if signature == DEFAULT_SIGNATURE else signature + "/"
            raise runtime.ChildFailure(
                "sample_inputs",
                f"{where}: no arrays for signature {signature!r}; it takes "
                f"{sorted(specs)} (name them {prefix}INPUT)",
            )
        return None
    unknown = sorted(set(given) - set(specs))
    missing = sorted(set(specs) - set(given))
    if unknown or missing:
        raise runtime.ChildFailure(
            "sample_inputs",
            f"{where}: signature {signature!r} takes {sorted(specs)}; the file "
            + "; ".join(
                part
                for part in (
                    f"lacks {missing}" if missing else "",
                    f"has unknown {unknown}" if unknown else "",
                )
                if part
            ),
        )
    return {k: fit_input(given[k], k, *specs[k], where) for k in specs}


def reference_inputs(
    req: ExportRequest,
    specs: Mapping[str, tuple[str, Sequence[int | None]]],
    synthesised: Mapping[str, Any],
) -> dict[str, Any]:
    """The inputs the exporter records its reference outputs on.

    The request's ``sample_inputs`` for ``serving_default`` when the model has
    them (all of them, checked against ``specs``), else ``synthesised``, in
    which an image input of unknown height or width is synthesised again at
    the request's ``synthetic_image_size`` (:func:`image_shape`).
    """
    path = req.get("sample_inputs")
    given = inputs_for(
        load_npz(path, "sample_inputs"), DEFAULT_SIGNATURE, specs, str(path), required=True
    )
    if given is not None:
        return given
    size = req.get("synthetic_image_size", DEFAULT_IMAGE_SIZE)
    return {
        k: synthesise(k, *specs[k], size) if k in specs and image_shape(*specs[k], size) else v
        for k, v in synthesised.items()
    }
