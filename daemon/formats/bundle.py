"""Where each tensor of a TensorFlow checkpoint lies: its index, read by hand.

A checkpoint (a "tensor bundle") ``PREFIX`` is ``PREFIX.index``, a sorted
table mapping each tensor's name to a ``BundleEntryProto`` (dtype, shape,
data shard, offset, size, masked CRC32C of the bytes), and the data files
``PREFIX.data-SSSSS-of-NNNNN`` holding the bytes. TensorFlow's
``CheckpointReader`` gives names, dtypes and shapes, but neither where a
tensor's bytes are nor their checksum; weight parity (:mod:`daemon.children.validator`)
needs both to compare the bytes of two checkpoints without decoding every
tensor into an array and hashing it.

The index is a LevelDB-format table (tensorflow/core/lib/io: table.cc,
block.cc, format.cc), read here as:

- footer, the file's last 48 bytes: the metaindex and index ``BlockHandle``
  (two varint64 each: offset, size), zero padding, the 8-byte magic number;
- a block: entries of varint32 ``shared`` (bytes of the previous key to keep),
  varint32 ``non_shared``, varint32 value length, the key's new bytes, the
  value; then the uint32 restart offsets and their count. On disk each block
  is followed by a 1-byte compression type and a 4-byte CRC;
- the index block maps the last key of each data block to its handle; the
  data blocks map tensor names to serialized ``BundleEntryProto``; the entry
  under the empty name is the ``BundleHeaderProto`` (number of shards).

TensorFlow writes bundle indexes uncompressed; a compressed block, a bad
magic number or a truncated file raises :class:`BundleFormatError`, and the
caller falls back to TensorFlow's own reader.

The values are protocol buffers, decoded here by hand from their wire format
(:func:`parse_index`, standard library only), so the supervisor can read an
index too: fetching a remote checkpoint by ranges
(:func:`daemon.supervisor.staging.fetch_checkpoint`) needs every tensor's
offset, size and checksum without TensorFlow. :func:`encode_index` writes an
index in the same format (what an incremental export's linked weights need:
:mod:`daemon.children.incremental`); it runs in children that imported
TensorFlow and uses its generated proto classes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from daemon.formats import crc32c, varint

#: ``kTableMagicNumber``, little-endian: the last 8 bytes of every table file.
TABLE_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5  # compression type, CRC32C
_NO_COMPRESSION = 0
_DT_STRING = 7  # tensorflow.DataType.DT_STRING
#: tensorflow.DataType's integer types: enum value -> (bytes, signed).
_INT_DTYPES = {
    3: (4, True),  # DT_INT32
    4: (1, False),  # DT_UINT8
    5: (2, True),  # DT_INT16
    6: (1, True),  # DT_INT8
    9: (8, True),  # DT_INT64
    17: (2, False),  # DT_UINT16
    22: (4, False),  # DT_UINT32
    23: (8, False),  # DT_UINT64
}
#: ``kTensorBundleVersion``: what TensorFlow's BundleWriter records as producer.
_BUNDLE_VERSION = 1


class BundleFormatError(ValueError):
    """The index is not a table this reader understands (or is damaged)."""


@dataclass(frozen=True)
class Entry:
    """One tensor of a bundle: what it is and where its bytes are."""

    dtype: int  # a tensorflow.DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    sliced: bool  # a partitioned variable: its bytes are under other keys


@dataclass(frozen=True)
class Bundle:
    prefix: str
    num_shards: int
    entries: dict[str, Entry]

    def data_file(self, shard_id: int) -> str:
        return f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}"

    def read(self, name: str) -> bytes:
        """The stored bytes of tensor ``name`` (exactly ``size`` bytes, or OSError)."""
        e = self.entries[name]
        fd = os.open(self.data_file(e.shard_id), os.O_RDONLY)
        try:
            data = os.pread(fd, e.size, e.offset)
        finally:
            os.close(fd)
        if len(data) != e.size:
            raise OSError(f"{self.data_file(e.shard_id)} is shorter than its index says ({name})")
        return data

    def read_string(self, name: str) -> bytes:
        """The value of scalar string tensor ``name`` (such as the object graph).

        A string tensor is stored as the varint64 length of each element, a
        4-byte checksum of those lengths, then the elements' bytes.
        """
        e = self.entries[name]
        if e.dtype != _DT_STRING or e.shape != ():
            raise BundleFormatError(f"{name} is not a scalar string")
        data = self.read(name)
        length, pos = _varint(data, 0)
        if pos + 4 + length != len(data):
            raise BundleFormatError(f"{name}: the string's length does not match its entry")
        return data[pos + 4 :]

    def read_int(self, name: str) -> int | None:
        """The value of scalar integer tensor ``name`` (a step counter); None if it is not one.

        Stored as the value's bytes in the writer's byte order, which for
        every platform TensorFlow builds for is little-endian.
        """
        e = self.entries.get(name)
        if e is None or e.shape != () or e.dtype not in _INT_DTYPES:
            return None
        size, signed = _INT_DTYPES[e.dtype]
        data = self.read(name)
        if len(data) != size:
            raise BundleFormatError(f"{name}: {len(data)} bytes for a {size}-byte integer")
        return int.from_bytes(data, "little", signed=signed)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    try:
        return varint.decode(buf, pos)
    except ValueError as e:
        raise BundleFormatError(str(e)) from None


def _block(data: bytes, handle: tuple[int, int]) -> bytes:
    offset, size = handle
    end = offset + size
    if end + _BLOCK_TRAILER_SIZE > len(data):
        raise BundleFormatError("a block runs past the end of the file")
    if data[end] != _NO_COMPRESSION:
        raise BundleFormatError(f"compressed block (type {data[end]})")
    return data[offset:end]


def _entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of one block, in order."""
    if len(block) < 4:
        raise BundleFormatError("block too short")
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * restarts
    if limit < 0:
        raise BundleFormatError("bad restart count")
    out, key, pos = [], b"", 0
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + length > limit:
            raise BundleFormatError("bad block entry")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        out.append((key, block[pos : pos + length]))
        pos += length
    return out


def _handle(value: bytes) -> tuple[int, int]:
    offset, pos = _varint(value, 0)
    size, _ = _varint(value, pos)
    return offset, size


def table_items(data: bytes, name: str = "index") -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of the table file ``data``, in key order.

    ``name`` only names the file in errors. BundleFormatError if ``data`` is
    not a whole, uncompressed table.
    """
    if len(data) < _FOOTER_SIZE or not data.endswith(TABLE_MAGIC):
        raise BundleFormatError(f"{name} is not a complete table")
    footer = data[-_FOOTER_SIZE:]
    _, pos = _varint(footer, 0)  # metaindex offset
    _, pos = _varint(footer, pos)  # metaindex size (no meta blocks in a bundle)
    index = _handle(footer[pos:])
    for _, handle in _entries(_block(data, index)):
        yield from _entries(_block(data, _handle(handle)))


def parse_index(data: bytes, prefix: str) -> Bundle:
    """The bundle whose index file holds ``data`` (``prefix`` is where its files are).

    Standard library only: the same result :func:`read_index` gives for the
    file. BundleFormatError if ``data`` is not a whole bundle index.
    """
    name = prefix + ".index"
    num_shards = 0
    entries: dict[str, Entry] = {}
    for key, value in table_items(data, name):
        if key == b"":
            num_shards = _header_shards(value)
        else:
            entries[key.decode("utf-8", "replace")] = _entry(value)
    if num_shards < 1:
        raise BundleFormatError(f"{name} has no bundle header")
    return Bundle(prefix=prefix, num_shards=num_shards, entries=entries)


def read_index(prefix: str) -> Bundle:
    """Every entry of ``PREFIX.index``. OSError if unreadable, BundleFormatError if not a bundle."""
    with open(prefix + ".index", "rb") as f:
        data = f.read()
    return parse_index(data, prefix)


# --- protocol buffers' wire format, for the two messages of an index -------------
# Field numbers from tensorflow/core/protobuf/tensor_bundle.proto and
# tensor_shape.proto. Unknown fields are skipped, as protobuf parsers do, so
# an index written by a newer TensorFlow still reads.

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
# BundleHeaderProto
_HEADER_NUM_SHARDS = 1
# BundleEntryProto
_ENTRY_DTYPE, _ENTRY_SHAPE, _ENTRY_SHARD_ID, _ENTRY_OFFSET = 1, 2, 3, 4
_ENTRY_SIZE, _ENTRY_CRC32C, _ENTRY_SLICES = 5, 6, 7
# TensorShapeProto and its Dim
_SHAPE_DIM, _DIM_SIZE = 2, 1


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of one message, in order.

    A varint or fixed field's value is its unsigned integer; a
    length-delimited field's is its bytes. Groups (deprecated, never in
    these messages) are refused.
    """
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _FIXED64:
            if pos + 8 > end:
                raise BundleFormatError("truncated fixed64 field")
            (value,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
        elif wire == _FIXED32:
            if pos + 4 > end:
                raise BundleFormatError("truncated fixed32 field")
            (value,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        elif wire == _LENGTH:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise BundleFormatError("truncated length-delimited field")
            value = buf[pos : pos + length]
            pos += length
        else:
            raise BundleFormatError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value


def _signed(value: int) -> int:
    """A varint read as int32/int64: negative values are sent as 64-bit two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _int(wire: int, value: int | bytes, what: str) -> int:
    if not isinstance(value, int) or wire not in (_VARINT, _FIXED32, _FIXED64):
        raise BundleFormatError(f"{what} is not an integer field")
    return value


def _bytes(value: int | bytes, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise BundleFormatError(f"{what} is not a message field")
    return value


def _header_shards(buf: bytes) -> int:
    """``num_shards`` of a serialized BundleHeaderProto (0 when absent)."""
    num_shards = 0
    for number, wire, value in _fields(buf):
        if number == _HEADER_NUM_SHARDS:
            num_shards = _signed(_int(wire, value, "num_shards"))
    return num_shards


def _shape(buf: bytes) -> tuple[int, ...]:
    """The dimension sizes of a serialized TensorShapeProto (``()`` for unknown rank)."""
    dims = []
    for number, _wire, value in _fields(buf):
        if number != _SHAPE_DIM:
            continue
        size = 0
        for n, w, v in _fields(_bytes(value, "shape.dim")):
            if n == _DIM_SIZE:
                size = _signed(_int(w, v, "dim.size"))
        dims.append(size)
    return tuple(dims)


def _entry(buf: bytes) -> Entry:
    """A serialized BundleEntryProto; proto3 defaults (0, empty) where a field is absent."""
    dtype = shard_id = offset = size = crc = 0
    shape: tuple[int, ...] = ()
    sliced = False
    for number, wire, value in _fields(buf):
        if number == _ENTRY_DTYPE:
            dtype = _signed(_int(wire, value, "dtype"))
        elif number == _ENTRY_SHAPE:
            shape = _shape(_bytes(value, "shape"))
        elif number == _ENTRY_SHARD_ID:
            shard_id = _signed(_int(wire, value, "shard_id"))
        elif number == _ENTRY_OFFSET:
            offset = _signed(_int(wire, value, "offset"))
        elif number == _ENTRY_SIZE:
            size = _signed(_int(wire, value, "size"))
        elif number == _ENTRY_CRC32C:
            crc = _int(wire, value, "crc32c") & 0xFFFFFFFF
        elif number == _ENTRY_SLICES:
            sliced = True
    return Entry(
        dtype=dtype,
        shape=shape,
        shard_id=shard_id,
        offset=offset,
        size=size,
        crc32c=crc,
        sliced=sliced,
    )


# --- writing -------------------------------------------------------------------


def _build_block(items: list[tuple[bytes, bytes]]) -> bytes:
    """A block with every entry a restart point (no shared key prefixes): valid, simple."""
    body, restarts = bytearray(), []
    for key, value in items:
        restarts.append(len(body))
        body += varint.encode(0) + varint.encode(len(key)) + varint.encode(len(value)) + key + value
    restarts = restarts or [0]  # an empty block still has one restart point, as LevelDB's
    body += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(body)


def _append_block(out: bytearray, block: bytes) -> bytes:
    """Append ``block`` and its trailer to ``out``; the encoded handle that finds it."""
    handle = varint.encode(len(out)) + varint.encode(len(block))
    trailer = bytes([_NO_COMPRESSION])
    out += block + trailer + struct.pack("<I", crc32c.masked(block + trailer))
    return handle


def encode_index(num_shards: int, entries: Mapping[str, Entry]) -> bytes:
    """The bytes of a bundle index (``PREFIX.index``) holding ``entries`` in ``num_shards`` shards.

    The table TensorFlow's ``BundleReader`` (and :func:`read_index`) reads: one
    data block with the header under the empty key and the entries sorted by
    name, an index block pointing at it, an empty metaindex block, the footer.
    Sliced entries cannot be written (their slices are separate keys).
    """
    from tensorflow.core.protobuf import tensor_bundle_pb2

    header = tensor_bundle_pb2.BundleHeaderProto(num_shards=num_shards)
    header.version.producer = _BUNDLE_VERSION
    items = [(b"", header.SerializeToString())]
    for name in sorted(entries, key=lambda n: n.encode()):
        e = entries[name]
        if e.sliced or not 0 <= e.shard_id < num_shards:
            raise ValueError(f"cannot write entry {name!r} (sliced, or shard {e.shard_id})")
        proto = tensor_bundle_pb2.BundleEntryProto(
            dtype=e.dtype, shard_id=e.shard_id, offset=e.offset, size=e.size, crc32c=e.crc32c
        )
        for d in e.shape:
            proto.shape.dim.add(size=d)
        items.append((name.encode(), proto.SerializeToString()))
    out = bytearray()
    data_handle = _append_block(out, _build_block(items))
    meta_handle = _append_block(out, _build_block([]))
    index_handle = _append_block(out, _build_block([(items[-1][0], data_handle)]))
    footer = (meta_handle + index_handle).ljust(_FOOTER_SIZE - len(TABLE_MAGIC), b"\0")
    return bytes(out + footer + TABLE_MAGIC)
