"""CRC-32C (Castagnoli), as TensorFlow's file formats store it.

TFRecord files (TensorBoard event files: :mod:`daemon.formats.tensorboard`) and
table files (checkpoint indexes: :mod:`daemon.formats.bundle`) checksum their pieces
with CRC-32C, *masked*: rotated and offset, so that a CRC stored inside
checksummed data does not checksum to a fixed value. Only small pieces go
through here (record headers, index blocks of a few KiB): a table-driven
loop in Python is fast enough and needs no extension module in the
supervisor.
"""

from __future__ import annotations


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _table()


def crc32c(data: bytes) -> int:
    """The CRC-32C of ``data``."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    """The CRC-32C of ``data`` as stored (``crc32c::Mask``)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
