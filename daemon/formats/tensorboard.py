"""Read one scalar tag from TensorBoard event files, with the standard library only.

The supervisor gates publication on a metric the trainer logs (``val_loss``, say) and must never
import TensorFlow, so this module decodes event files by hand: TFRecord framing, then the
protobuf wire format of ``tensorflow.Event`` (event.proto, summary.proto, tensor.proto).

Contract of :meth:`EventFileReader.scalars`:

* It returns ``{step: value}`` for the scalars with one tag in the files of one directory whose
  name contains ``tfevents``, not recursively (Keras writes ``train/`` and ``validation/`` below
  its ``log_dir``: pass the one you mean). Files are read in name order, which for TF's
  ``events.out.tfevents.<seconds>...`` names is creation order; a later record for a step
  overrides an earlier one (a trainer restarted from a checkpoint logs its steps again).
* A scalar is a ``Summary.Value`` with a ``simple_value`` (TF1) or a ``tensor`` of a numeric
  dtype (float, double, half, int32, int64) with exactly one element (TF2, Keras). Histograms,
  strings, images and tensors of several elements are ignored.
* A missing directory, or a file gone before it is opened, is no data (the trainer may not have
  written yet); any other ``OSError`` propagates.
* A record framed correctly that does not decode is skipped, so one bad record cannot hide the
  rest. An incomplete trailing record (the trainer is mid-write) is left for a later call.
* It is incremental: event files are append-only, so the reader keeps, per file and tag, the
  offset after the last complete record and the values so far, and parses only bytes appended
  since. A file that shrank or whose inode changed is re-read from the start. Not thread-safe.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from daemon.formats import varint
from daemon.formats.crc32c import masked as _masked_crc32c

__all__ = ["EventFileReader", "read_scalars"]

# A TFRecord is: uint64 length, uint32 masked CRC32C of those 8 bytes, the data, uint32 masked
# CRC32C of the data (all little-endian).
_HEADER = struct.Struct("<QI")
_FOOTER_SIZE = 4

# TensorProto dtype -> (struct format of one element in tensor_content, field number of the
# repeated *_val field used when there is no tensor_content, wire type of one unpacked element).
_DTYPES: dict[int, tuple[str, int, int]] = {
    1: ("<f", 5, 5),  # DT_FLOAT: float_val, fixed32
    2: ("<d", 6, 1),  # DT_DOUBLE: double_val, fixed64
    3: ("<i", 7, 0),  # DT_INT32: int_val, varint
    9: ("<q", 10, 0),  # DT_INT64: int64_val, varint
    19: ("<e", 13, 0),  # DT_HALF: half_val, the 16 bits in an int32 varint
}


def _signed(value: int) -> int:
    """An int64 (or sign-extended int32) from its unsigned varint encoding."""
    return value - (1 << 64) if value >> 63 else value


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field: an int for a varint, else its bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = varint.decode(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = varint.decode(buf, pos)
            yield number, wire, value
            continue
        if wire == 2:
            size, pos = varint.decode(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:  # groups (3, 4) are long deprecated and never written by TF; 6 and 7 are invalid
            raise ValueError(f"unsupported wire type {wire}")
        if pos + size > len(buf):
            raise ValueError("field runs past the end of its message")
        yield number, wire, buf[pos : pos + size]
        pos += size


def _repeated(wire: int, value: int | memoryview, fmt: str, element_wire: int) -> list[float]:
    """The elements of one occurrence of a repeated numeric field, packed (wire 2) or not."""
    fixed = element_wire != 0
    if wire == 2 and isinstance(value, memoryview):
        if fixed:
            return [float(x) for (x,) in struct.iter_unpack(fmt, value)]
        ints, pos = [], 0
        while pos < len(value):
            n, pos = varint.decode(value, pos)
            ints.append(n)
    elif wire == element_wire:
        if isinstance(value, memoryview):
            return [float(struct.unpack(fmt, value)[0])]
        ints = [value]
    else:
        raise ValueError("wire type does not match the field's type")
    if fmt == "<e":  # half_val holds the float16 bit pattern
        return [float(struct.unpack("<e", struct.pack("<H", n & 0xFFFF))[0]) for n in ints]
    return [float(_signed(n)) for n in ints]


def _element_count(shape: memoryview) -> int:
    """How many elements a TensorShapeProto holds; -1 if a dimension or the rank is unknown."""
    count = 1
    for number, _, value in _fields(shape):
        if number == 2 and isinstance(value, memoryview):  # dim
            size = 0  # proto3 omits a zero size
            for dim_number, _, dim_value in _fields(value):
                if dim_number == 1 and isinstance(dim_value, int):
                    size = _signed(dim_value)
            if size < 0:  # -1 is unknown; two of them must not multiply to one element
                return -1
            count *= size
        elif number == 3 and value:  # unknown_rank
            return -1
    return count


def _tensor_scalar(tensor: memoryview) -> float | None:
    """The value of a TensorProto with one numeric element, else None."""
    dtype, count, content = 0, 1, None
    repeated: dict[int, list[tuple[int, int | memoryview]]] = {}
    for number, wire, value in _fields(tensor):
        if number == 1 and isinstance(value, int):
            dtype = value
        elif number == 2 and isinstance(value, memoryview):
            count = _element_count(value)
        elif number == 4 and isinstance(value, memoryview):
            content = value
        else:  # the *_val fields; which one matters depends on dtype, which may come later
            repeated.setdefault(number, []).append((wire, value))
    spec = _DTYPES.get(dtype)
    if spec is None or count != 1:
        return None
    fmt, val_field, element_wire = spec
    if content is not None:  # proto3 omits empty bytes, so present means it holds the data
        size_ok = len(content) == struct.calcsize(fmt)
        return float(struct.unpack(fmt, content)[0]) if size_ok else None
    values = [x for w, v in repeated.get(val_field, []) for x in _repeated(w, v, fmt, element_wire)]
    if len(values) > 1:
        return None
    # No value at all is the dtype's zero, as TensorFlow itself decodes such a proto.
    return values[0] if values else 0.0


def _summary_value(value: memoryview, tag: bytes) -> float | None:
    """The scalar in a Summary.Value if its tag is ``tag``, else None."""
    name: memoryview | None = None
    simple: float | None = None
    tensor: memoryview | None = None
    for number, wire, field_value in _fields(value):
        if not isinstance(field_value, memoryview):
            continue
        if number == 1 and wire == 2:
            name = field_value
        elif number == 2 and wire == 5:  # simple_value; in a oneof with tensor: the last wins
            simple, tensor = float(struct.unpack("<f", field_value)[0]), None
        elif number == 8 and wire == 2:
            simple, tensor = None, field_value
    # The tag is checked before the tensor is decoded: most values belong to other tags.
    if name is None or bytes(name) != tag:
        return None
    if simple is not None:
        return simple
    return None if tensor is None else _tensor_scalar(tensor)


def _event_scalar(event: memoryview, tag: bytes) -> tuple[int, float] | None:
    """(step, value) of the scalar ``tag`` in a serialized Event, or None if it has none."""
    step, found = 0, None  # proto3 omits step 0
    for number, _, value in _fields(event):
        if number == 2 and isinstance(value, int):
            step = _signed(value)
        elif number == 5 and isinstance(value, memoryview):  # summary
            for summary_number, _, summary_value in _fields(value):
                if summary_number == 1 and isinstance(summary_value, memoryview):
                    scalar = _summary_value(summary_value, tag)
                    found = scalar if scalar is not None else found
    return None if found is None else (step, found)


@dataclass
class _Cursor:
    """What one file has yielded for one tag: where its last complete record ends, and values."""

    device: int
    inode: int
    offset: int = 0
    values: dict[int, float] = field(default_factory=dict)


def _read_records(f: BinaryIO, cursor: _Cursor, size: int, tag: bytes) -> None:
    """Parse the complete records between ``cursor.offset`` and ``size``; advance the cursor.

    The data CRC is not verified: CRC32C in pure Python costs about a microsecond per byte, and
    event files can hold megabytes of graphs and images. A torn record is detected by its length
    instead (it runs past the end of the file). The 8-byte length's CRC is verified, because it
    is cheap and a zero-filled tail (a crash that grew the file before its data reached the disk)
    would otherwise frame as empty records and derail every record after it. Either way reading
    stops there and the next call tries again from the same offset.
    """
    pos = cursor.offset
    f.seek(pos)
    while pos + _HEADER.size <= size:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            break
        length, length_crc = _HEADER.unpack(header)
        end = pos + _HEADER.size + length + _FOOTER_SIZE
        if _masked_crc32c(header[:8]) != length_crc or end > size:
            break
        data = f.read(length)
        if len(data) < length:
            break
        f.seek(_FOOTER_SIZE, os.SEEK_CUR)
        try:
            found = _event_scalar(memoryview(data), tag)
        except (ValueError, struct.error):
            found = None  # a corrupt record: skip it, keep the rest
        if found is not None:
            cursor.values[found[0]] = found[1]
        pos = end
    cursor.offset = pos


class EventFileReader:
    """Reads scalars from event files, parsing each file's bytes only once (see the module)."""

    def __init__(self) -> None:
        self._cursors: dict[tuple[Path, str], _Cursor] = {}

    def scalars(self, logdir: Path, tag: str) -> dict[int, float]:
        """``{step: value}`` of the scalars ``tag`` in ``logdir``'s event files ({} if none)."""
        try:
            with os.scandir(logdir) as entries:
                names = sorted(e.name for e in entries if "tfevents" in e.name and e.is_file())
        except FileNotFoundError:
            names = []
        paths = {logdir / name for name in names}
        # Forget files that are gone, so a long-lived reader does not grow without bound.
        for key in [k for k in self._cursors if k[1] == tag and k[0].parent == logdir]:
            if key[0] not in paths:
                del self._cursors[key]
        result: dict[int, float] = {}
        for name in names:
            result.update(self._update(logdir / name, tag))
        return result

    def _update(self, path: Path, tag: str) -> dict[int, float]:
        """Bring the cursor of ``path`` up to date and return its values."""
        key = (path, tag)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            self._cursors.pop(key, None)
            return {}
        with f:
            st = os.fstat(f.fileno())
            cursor = self._cursors.get(key)
            if (
                cursor is None
                or (cursor.device, cursor.inode) != (st.st_dev, st.st_ino)
                or st.st_size < cursor.offset
            ):
                # New, replaced or truncated: none of what was cached can be trusted.
                cursor = self._cursors[key] = _Cursor(st.st_dev, st.st_ino)
            if st.st_size > cursor.offset:
                _read_records(f, cursor, st.st_size, tag.encode())
        return cursor.values


def read_scalars(logdir: Path, tag: str) -> dict[int, float]:
    """``{step: value}`` of the scalars ``tag`` in ``logdir``, read once with a fresh reader."""
    return EventFileReader().scalars(logdir, tag)
