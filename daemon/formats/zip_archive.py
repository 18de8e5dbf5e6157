"""Is a ZIP archive (a ``.keras`` file) completely written? Read from its end.

A ZIP writer (Python's :mod:`zipfile`, which Keras uses) writes every
member, local header first, then at close the central directory and last
the end-of-central-directory record (EOCD). So an archive is complete when:

- an EOCD ends exactly at the end of the file (after its comment, if any);
- with ZIP64 (an EOCD field saturated at 0xFFFF / 0xFFFFFFFF, or the ZIP64
  locator right before the EOCD) the ZIP64 locator and end record are where
  they say, and their numbers are used;
- the central directory ends exactly where the (ZIP64) end record starts, and
  parses into exactly the number of entries the end record counts;
- every entry's local header is at its offset with the same name, and its
  data (and data descriptor, if flagged) lies between there and the central
  directory without overlapping the next member.

A file cut anywhere has no EOCD at its end, or one whose directory does not
agree: :attr:`~.Verdict.INCOMPLETE`. Undecided: a multi-disk archive, a
central directory that ends before the end record (bytes prepended to the
archive, as self-extracting archives have) and a directory over 64 MiB.
Member data is not read (no CRC): the check costs a few small reads.

Standard library only.
"""

from __future__ import annotations

import itertools
import struct

from daemon.formats.completeness import (
    COMPLETE,
    Completeness,
    ReadAt,
    incomplete,
    undecided,
)

_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_EOCD = b"PK\x05\x06"
_ZIP64_EOCD = b"PK\x06\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_DESCRIPTOR = b"PK\x07\x08"

_EOCD_SIZE = 22
_LOCATOR_SIZE = 20
_ZIP64_EOCD_FIXED = 56
_CENTRAL_SIZE = 46
_LOCAL_SIZE = 30
_MAX_COMMENT = 0xFFFF
_MAX_DIRECTORY = 64 << 20

_EOCD_FMT = struct.Struct("<4sHHHHIIH")
_LOCATOR_FMT = struct.Struct("<4sIQI")
_ZIP64_EOCD_FMT = struct.Struct("<4sQHHIIQQQQ")
_CENTRAL_FMT = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL_FMT = struct.Struct("<4sHHHHHIIIHH")


class _Bad(Exception):
    """The archive is not (yet) whole: the message says why."""


def check_archive(read_at: ReadAt, size: int) -> tuple[Completeness, tuple[str, ...]]:
    """Whether the ZIP archive of ``size`` bytes is complete, and its member names if so."""
    try:
        return _check(read_at, size)
    except _Bad as e:
        return incomplete(str(e)), ()


def _read(read_at: ReadAt, offset: int, length: int, what: str) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise _Bad(f"{what} at offset {offset} runs past the end of the file")
    return data


def _check(read_at: ReadAt, size: int) -> tuple[Completeness, tuple[str, ...]]:
    if size < _EOCD_SIZE:
        raise _Bad(f"{size} bytes: shorter than a zip end record")
    head = read_at(0, 4)
    if head not in (_LOCAL, _EOCD):
        raise _Bad("does not start with a zip local header")
    eocd_at, eocd = _find_eocd(read_at, size)
    _sig, disk, cd_disk, on_disk, entries, cd_size, cd_offset, _comment = eocd
    cd_end = eocd_at
    saturated = 0xFFFF in (disk, cd_disk, on_disk, entries) or 0xFFFFFFFF in (cd_size, cd_offset)
    zip64 = _zip64_end(read_at, eocd_at, required=saturated)
    if zip64 is not None:
        cd_end, disk, cd_disk, on_disk, entries, cd_size, cd_offset = zip64
    if disk != 0 or cd_disk != 0 or on_disk != entries:
        return undecided("a multi-disk zip archive"), ()
    if cd_offset + cd_size > cd_end:
        raise _Bad("the central directory would run past the end record")
    if cd_offset + cd_size < cd_end:
        return undecided("bytes between the central directory and the end record"), ()
    if cd_size > _MAX_DIRECTORY:
        return undecided(f"a central directory of {cd_size} bytes"), ()
    members = _central_directory(_read(read_at, cd_offset, cd_size, "central directory"), entries)
    _check_members(read_at, members, cd_offset)
    return COMPLETE, tuple(_name(raw, flags) for raw, flags, *_ in members)


def _name(raw: bytes, flags: int) -> str:
    return raw.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")


def _find_eocd(read_at: ReadAt, size: int) -> tuple[int, tuple[int, ...]]:
    """The EOCD that ends exactly at ``size`` (after its comment): offset and fields."""
    # Almost always no comment: the record is the last 22 bytes.
    last = _read(read_at, size - _EOCD_SIZE, _EOCD_SIZE, "end record")
    if last[:4] == _EOCD and _EOCD_FMT.unpack(last)[7] == 0:
        return size - _EOCD_SIZE, _EOCD_FMT.unpack(last)
    start = max(0, size - _EOCD_SIZE - _MAX_COMMENT)
    tail = _read(read_at, start, size - start, "end record")
    at = tail.rfind(_EOCD)
    while at >= 0:
        if at + _EOCD_SIZE <= len(tail):
            fields = _EOCD_FMT.unpack_from(tail, at)
            if start + at + _EOCD_SIZE + fields[7] == size:
                return start + at, fields
        at = tail.rfind(_EOCD, 0, at)
    raise _Bad("no zip end-of-central-directory record at the end of the file")


def _zip64_end(
    read_at: ReadAt, eocd_at: int, *, required: bool
) -> tuple[int, int, int, int, int, int, int] | None:
    """(ZIP64 end record's offset, disk, cd disk, entries here, entries, cd size, cd offset).

    None when the archive has no ZIP64 end (and does not need one).
    """
    at = eocd_at - _LOCATOR_SIZE
    locator = read_at(at, _LOCATOR_SIZE) if at >= 0 else b""
    if len(locator) != _LOCATOR_SIZE or locator[:4] != _ZIP64_LOCATOR:
        if required:
            raise _Bad("a saturated end record without a ZIP64 locator before it")
        return None
    _sig, _disk, record_at, _disks = _LOCATOR_FMT.unpack(locator)
    record = read_at(record_at, _ZIP64_EOCD_FIXED) if record_at < at else b""
    if len(record) != _ZIP64_EOCD_FIXED or record[:4] != _ZIP64_EOCD:
        if required:
            raise _Bad("the ZIP64 locator points to no ZIP64 end record")
        return None  # bytes that only look like a locator: the plain record counts
    fields = _ZIP64_EOCD_FMT.unpack(record)
    if record_at + 12 + fields[1] != at:
        if required:
            raise _Bad("the ZIP64 end record does not end at its locator")
        return None
    _sig, _len, _made, _needed, disk, cd_disk, on_disk, entries, cd_size, cd_offset = fields
    return record_at, disk, cd_disk, on_disk, entries, cd_size, cd_offset


#: (raw name, flags, compressed size, local header offset, ZIP64 sizes) of a directory entry.
_Member = tuple[bytes, int, int, int, bool]


def _central_directory(cd: bytes, entries: int) -> list[_Member]:
    members: list[_Member] = []
    pos = 0
    while pos < len(cd):
        if len(cd) - pos < _CENTRAL_SIZE or cd[pos : pos + 4] != _CENTRAL:
            raise _Bad(f"central directory entry {len(members)} is malformed")
        f = _CENTRAL_FMT.unpack_from(cd, pos)
        flags, csize, usize = f[3], f[8], f[9]
        name_len, extra_len, comment_len, disk, offset = f[10], f[11], f[12], f[13], f[16]
        end = pos + _CENTRAL_SIZE + name_len + extra_len + comment_len
        if end > len(cd):
            raise _Bad(f"central directory entry {len(members)} runs past the directory")
        raw = cd[pos + _CENTRAL_SIZE : pos + _CENTRAL_SIZE + name_len]
        extra = cd[pos + _CENTRAL_SIZE + name_len : pos + _CENTRAL_SIZE + name_len + extra_len]
        zip64 = 0xFFFFFFFF in (csize, usize, offset) or disk == 0xFFFF
        if zip64:
            usize, csize, offset = _zip64_extra(extra, usize, csize, offset)
        members.append((raw, flags, csize, offset, zip64))
        pos = end
    if len(members) != entries:
        raise _Bad(f"the end record counts {entries} entries, the directory holds {len(members)}")
    return members


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset from the ZIP64 extra field (0x0001), for the saturated ones."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if tag == 0x0001:
            values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            out = []
            for field in (usize, csize, offset):
                if field == 0xFFFFFFFF:
                    if not values:
                        raise _Bad("a ZIP64 extra field without the sizes it stands for")
                    field = values.pop(0)
                out.append(field)
            return out[0], out[1], out[2]
        pos += 4 + length
    raise _Bad("a saturated central directory entry without a ZIP64 extra field")


def _check_members(read_at: ReadAt, members: list[_Member], cd_offset: int) -> None:
    """Every member's local header and data, in order, before the central directory."""
    spans = []
    for raw, flags, csize, offset, zip64 in members:
        name = _name(raw, flags)
        header = _read(read_at, offset, _LOCAL_SIZE, f"local header of {name!r}")
        f = _LOCAL_FMT.unpack(header)
        if f[0] != _LOCAL:
            raise _Bad(f"no local header of {name!r} at offset {offset}")
        name_len, extra_len = f[9], f[10]
        if _read(read_at, offset + _LOCAL_SIZE, name_len, f"name of {name!r}") != raw:
            raise _Bad(f"the local header at offset {offset} names another member than {name!r}")
        end = offset + _LOCAL_SIZE + name_len + extra_len + csize
        if flags & 0x08:  # sizes in a data descriptor after the data
            sig = read_at(end, 4)
            end += 4 if sig == _DESCRIPTOR else 0
            end += 20 if zip64 else 12  # crc, then sizes of 4 (ZIP64: 8) bytes each
        if end > cd_offset:
            raise _Bad(f"member {name!r} runs into the central directory")
        spans.append((offset, end, name))
    spans.sort()
    for (_, end, name), (start, _, _) in itertools.pairwise(spans):
        if end > start:
            raise _Bad(f"member {name!r} overlaps the next one")
