"""Is an HDF5 file (``.h5``, ``.weights.h5``) completely written? Read its superblock.

The superblock records the file's end-of-file address: the HDF5 library
writes it from its metadata cache when the file is flushed or closed, after
every other piece of metadata (the superblock is in the cache's last ring),
and at close truncates the file to that address. The library itself calls
a file shorter than its stored address truncated. So:

- the signature ``\\x89HDF\\r\\n\\x1a\\n`` is at 0, 512, 1024, 2048, ... (a
  user block comes first); found at none: :attr:`~.Verdict.INCOMPLETE`
  (not yet written, or not HDF5);
- superblock versions 0 and 1 (what h5py and Keras write by default) and 2
  and 3 (``libver="latest"``) are read by their layouts; versions 2 and 3
  carry a Jenkins lookup3 checksum, which must match; version 3 has the
  file-consistency flags, whose write-access and SWMR bits stay set while a
  writer has the file open;
- the end-of-file address (counted from the file's start, as the library
  compares it) equals the size: complete; above it: incomplete;
- undecided: another superblock version, an offset size other than 2, 4 or
  8, an undefined end-of-file address, and a file longer than its address.

The superblock is written when the file is flushed or closed, so a file
being written carries either no superblock yet or the one of its last
flush, whose address is below the size the file reaches before it is done;
``tests/test_keras_complete.py`` replays real Keras writes call by call.

Standard library only.
"""

from __future__ import annotations

import struct

from daemon.formats.completeness import (
    COMPLETE,
    Completeness,
    ReadAt,
    incomplete,
    undecided,
)

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_UNDEFINED = {2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
_ADDRESS_FMT = {2: "H", 4: "I", 8: "Q"}
#: File-consistency flags: opened for write access, opened for SWMR writing.
_OPEN_FOR_WRITE = 0x01 | 0x04


def superblock_offset(read_at: ReadAt, size: int) -> int | None:
    """Where the signature is: 0, 512, 1024, ... below ``size``; None if nowhere."""
    offset = 0
    while offset + len(SIGNATURE) <= size:
        if read_at(offset, len(SIGNATURE)) == SIGNATURE:
            return offset
        offset = 512 if offset == 0 else offset * 2
    return None


def check_file(read_at: ReadAt, size: int) -> Completeness:
    """Whether the HDF5 file of ``size`` bytes is complete; see the module docstring."""
    at = superblock_offset(read_at, size)
    if at is None:
        return incomplete("no HDF5 signature at offset 0, 512, 1024, ...")
    head = read_at(at, 16)
    if len(head) < 16:
        return incomplete("the superblock is cut short")
    version = head[8]
    if version in (0, 1):
        sizes_at, fixed = 13, 24 + (4 if version == 1 else 0)
    elif version in (2, 3):
        sizes_at, fixed = 9, 12
    else:
        return undecided(f"HDF5 superblock version {version}")
    offsets = head[sizes_at]
    if offsets not in _ADDRESS_FMT:
        return undecided(f"HDF5 addresses of {offsets} bytes")
    # Four addresses follow the fixed part in every version; v2/v3 end with a checksum.
    length = fixed + 4 * offsets + (4 if version >= 2 else 0)
    block = read_at(at, length)
    if len(block) < length:
        return incomplete("the superblock is cut short")
    fmt = "<" + _ADDRESS_FMT[offsets] * 4
    _base, _second, eof, _fourth = struct.unpack_from(fmt, block, fixed)
    if version >= 2:
        (stored,) = struct.unpack_from("<I", block, length - 4)
        if lookup3(block[: length - 4]) != stored:
            return incomplete("the superblock checksum does not match")
    flags = block[11] if version >= 2 else struct.unpack_from("<I", block, 20)[0]
    if flags & _OPEN_FOR_WRITE:
        return incomplete("the superblock marks the file open for writing")
    if eof == _UNDEFINED[offsets]:
        return undecided("the superblock's end-of-file address is undefined")
    if size < eof:
        return incomplete(f"{size} bytes of the {eof} the superblock records")
    if size > eof:
        return undecided(f"{size} bytes, more than the {eof} the superblock records")
    return COMPLETE


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


#: lookup3's mix() and final() as (target, source, shift) steps on [a, b, c].
_MIX = ((0, 2, 4), (1, 0, 6), (2, 1, 8), (0, 2, 16), (1, 0, 19), (2, 1, 4))
_FINAL = ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24))


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, as HDF5's ``H5_checksum_lookup3``."""
    m = 0xFFFFFFFF
    v = [(0xDEADBEEF + len(data) + initval) & m] * 3
    pos, left = 0, len(data)
    while left > 12:
        for i in range(3):
            v[i] = (v[i] + int.from_bytes(data[pos + 4 * i : pos + 4 * i + 4], "little")) & m
        for t, s, k in _MIX:  # a -= c; a ^= rot(c, 4); c += b; ...
            v[t] = ((v[t] - v[s]) & m) ^ _rot(v[s], k)
            v[s] = (v[s] + v[(s + 2) % 3]) & m
        pos += 12
        left -= 12
    if left == 0:
        return v[2]
    tail = data[pos:] + b"\0" * (12 - left)
    for i in range(3):
        v[i] = (v[i] + int.from_bytes(tail[4 * i : 4 * i + 4], "little")) & m
    for t, s, k in _FINAL:  # c ^= b; c -= rot(b, 14); ...
        v[t] = ((v[t] ^ v[s]) - _rot(v[s], k)) & m
    return v[2]
