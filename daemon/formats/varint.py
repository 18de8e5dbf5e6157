"""Protocol buffers' base-128 varints, the one integer encoding both codecs here read.

Tensor bundle indexes (:mod:`daemon.formats.bundle`: LevelDB table blocks,
``BundleEntryProto``) and TensorBoard events (:mod:`daemon.formats.tensorboard`)
both use them. Standard library only.
"""

from __future__ import annotations

#: A varint of a 64-bit value takes at most 10 bytes (7 bits each).
MAX_BYTES = 10


def decode(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` (masked to 64 bits) and the position after it.

    ValueError if the buffer ends inside it or it is longer than :data:`MAX_BYTES`.
    """
    result = shift = 0
    end = min(len(buf), pos + MAX_BYTES)
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
    raise ValueError("truncated or overlong varint")


def encode(n: int) -> bytes:
    """The varint of a non-negative ``n``."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)
