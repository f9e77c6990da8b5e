"""The bulk messages (InitRequest, PushRequest, PullResponse) in protobuf's
own wire format, written and read without copying tensor bytes.

Building a protobuf message copies each `bytes` field several times (into
the message, into a parent message, into the serialized string; and back on
the other side). For tensors that is most of the cost of a transfer. Here a
Frame's chunk data stays a view of the tensor until one join makes the
serialized message (or, on the data channel, until a gather write sends
it), and incoming data stays a view of the received bytes until it is
copied into its destination tensor (or, on the data channel, stays in the
connection until it is read straight into that tensor): at most two copies
per side instead of five, none on the data channel beyond the kernel's.
Chunks of at most 64 KiB are the exception: they are read whole and parsed
by protobuf, whose copies of so few bytes cost less than parsing them field
by field in Python.

The bytes are exactly those of the messages in proto/ps.proto, so any
protobuf client or server interoperates (the tests talk to our server with
the generated stubs). Only these three messages take this path; everything
else uses the generated classes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError, Message

from ps_common.codec import Chunk
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
METHODS = tuple(pb.DESCRIPTOR.services_by_name["ParameterServer"].methods_by_name)

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_DATA, _INDICES = 5, 8  # TensorChunk's bulk fields


@dataclass
class Frame:
    """One InitRequest, PushRequest or PullResponse: an optional header and chunks."""

    header: Any = None  # InitHeader, PushHeader, or None
    # Read from a connection: an iterator that reads each chunk as it goes.
    chunks: Iterable[Chunk] = field(default_factory=list)


@dataclass(frozen=True)
class Malformed:
    """A request that did not parse; the service refuses it with this reason.
    (A deserializer that raised would make gRPC answer INTERNAL.)"""

    reason: str


# -- writing ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _length_delimited(number: int, size: int) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(size)


def _chunk_parts(chunk: Chunk) -> list[Any]:
    meta = pb.TensorChunk(
        key=chunk.key, dtype=chunk.dtype, shape=chunk.shape, offset=chunk.offset, absent=chunk.absent,
        sparse=chunk.sparse, length=chunk.length, shared=chunk.shared_range(),
    ).SerializeToString()  # fmt: skip
    parts: list[Any] = [meta]
    for number, payload in ((_DATA, chunk.data), (_INDICES, chunk.indices)):
        if len(payload):
            parts += [_length_delimited(number, len(payload)), payload]
    return parts


def _parts_of(header_field: int | None, chunks_field: int) -> Callable[[Frame], list[Any]]:
    """The serialized message as a list of pieces, tensor data still views."""

    def parts_of(frame: Frame) -> list[Any]:
        parts: list[Any] = []
        if frame.header is not None and header_field is not None:
            header = frame.header.SerializeToString()
            parts += [_length_delimited(header_field, len(header)), header]
        for chunk in frame.chunks:
            chunk_parts = _chunk_parts(chunk)
            parts += [_length_delimited(chunks_field, sum(len(p) for p in chunk_parts)), *chunk_parts]
        return parts

    return parts_of


def _joined(parts_of: Callable[[Frame], list[Any]]) -> Callable[[Frame], bytes]:
    def encode(frame: Frame) -> bytes:
        return b"".join(parts_of(frame))  # the one copy of the tensor bytes on this side

    return encode


# -- reading ---------------------------------------------------------------------------


class _Bytes:
    """A message held in memory (gRPC's): bulk fields are views of it."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data)
        self._pos = 0

    @property
    def left(self) -> int:
        return len(self._view) - self._pos

    def read(self, size: int) -> memoryview:
        if size > self.left:
            raise DecodeError("field runs past the end of the message")
        self._pos += size
        return self._view[self._pos - size : self._pos]

    def bulk(self, size: int, last_of_chunk: bool) -> memoryview:
        return self.read(size)


class _Stream:
    """A message still arriving on a connection (the data channel's), read
    in order and never past its end: a chunk's data that ends the chunk
    stays in the connection as an Incoming, so that it is read straight
    into its destination."""

    def __init__(self, stream: io.BufferedIOBase, size: int) -> None:
        self._stream = stream
        self.left = size

    def read(self, size: int) -> bytes:
        if size > self.left:
            raise DecodeError("field runs past the end of the message")
        data = self._stream.read(size)
        self._consumed(size, len(data))
        return data

    def readinto(self, dest: memoryview) -> None:
        self._consumed(len(dest), self._stream.readinto(dest) or 0)

    def _consumed(self, wanted: int, got: int) -> None:
        self.left -= got
        if got != wanted:
            raise ConnectionError("connection closed in the middle of a message")

    def bulk(self, size: int, last_of_chunk: bool) -> bytes | Incoming:
        if not last_of_chunk:
            return self.read(size)
        if size > self.left:
            raise DecodeError("field runs past the end of the message")
        return Incoming(self, size)


class Incoming:
    """A chunk's data still in the connection (codec.Streamed): read it
    with `readinto` before the next chunk, or it is skipped."""

    def __init__(self, source: _Stream, size: int) -> None:
        self._source = source
        self._size = size
        self.read = False

    def __len__(self) -> int:
        return self._size

    def readinto(self, dest: memoryview) -> None:
        if self.read or len(dest) != self._size:
            raise ValueError(f"Incoming of {self._size} bytes read twice or into {len(dest)} bytes")
        self.read = True
        self._source.readinto(dest)

    def __bytes__(self) -> bytes:
        out = bytearray(self._size)
        self.readinto(memoryview(out))
        return bytes(out)

    def skip(self) -> None:
        if not self.read:
            self.read = True
            self._source.read(self._size)


_Body = _Bytes | _Stream


def _varint_of(body: _Body) -> int:
    result = shift = 0
    while True:
        if shift > 63:
            raise DecodeError("overlong varint")
        byte = body.read(1)[0]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7


def _tag_of(body: _Body) -> tuple[int, int]:
    tag = _varint_of(body)
    if tag >> 3 == 0:
        raise DecodeError("field number 0")
    return tag >> 3, tag & 7


def _field_of(body: _Body, number: int, wire_type: int) -> bytes:
    """The rest of a field whose tag was just read, encoded again whole."""
    tag = _varint(number << 3 | wire_type)
    if wire_type == _VARINT:
        return tag + _varint(_varint_of(body))
    if wire_type in (_FIXED64, _FIXED32):
        return tag + bytes(body.read(8 if wire_type == _FIXED64 else 4))
    if wire_type == _LEN:
        size = _varint_of(body)
        return tag + _varint(size) + bytes(body.read(size))
    raise DecodeError(f"unsupported wire type {wire_type}")


# A chunk up to this size is read whole and parsed by protobuf, its data
# copied out: for a small tensor, parsing field by field in Python costs more
# than the copy (see _read_chunk).
_SMALL_CHUNK = 64 * 2**10


def _read_chunk(body: _Body, size: int) -> Chunk:
    """A TensorChunk of `size` bytes: its small fields parsed by protobuf,
    data and indices kept as views (or, data, left in the connection).

    A small chunk is parsed whole by protobuf instead: one read and one call
    into its parser, where the field-by-field path makes a dozen reads and
    as many varints in Python. A push + pull of 160 tensors of 4 KiB (one
    worker, one server, Unix socket, 2 runs of 3 rounds taking turns): 30.6
    and 31.9 ms against 37.0 and 37.8; of 16 tensors of 40 KiB, 4.6 and 5.0
    against 5.4 and 6.6."""
    if size > body.left:
        raise DecodeError("field runs past the end of the message")
    if size <= _SMALL_CHUNK:
        whole = pb.TensorChunk.FromString(bytes(body.read(size)))
        return _chunk_of(whole, whole.data, whole.indices)
    end = body.left - size
    bulk: dict[int, Any] = {}
    meta = bytearray()
    while body.left > end:
        number, wire_type = _tag_of(body)
        if number in (_DATA, _INDICES) and wire_type == _LEN:
            length = _varint_of(body)
            if length > body.left - end:
                raise DecodeError("field runs past the end of its chunk")
            last = number == _DATA and body.left - length == end
            bulk[number] = body.bulk(length, last_of_chunk=last)
            if last:
                break  # a _Stream has not read it yet
        else:
            meta += _field_of(body, number, wire_type)
        if body.left < end:
            raise DecodeError("field runs past the end of its chunk")
    return _chunk_of(pb.TensorChunk.FromString(bytes(meta)), bulk.get(_DATA, b""), bulk.get(_INDICES, b""))


def _chunk_of(parsed: pb.TensorChunk, data: Any, indices: Any) -> Chunk:
    """`parsed`'s small fields as a Chunk, with `data` and `indices`."""
    return Chunk(
        key=parsed.key, dtype=parsed.dtype, shape=list(parsed.shape), offset=parsed.offset,
        data=data, absent=parsed.absent, sparse=parsed.sparse, indices=indices, length=parsed.length,
        shared=(parsed.shared.offset, parsed.shared.size) if parsed.HasField("shared") else None,
    )  # fmt: skip


def _next_chunk(body: _Body, chunks_field: int, header_field: int | None) -> int | None:
    """Skip to the next chunk; its size, or None at the end of the message.
    Fields are expected in number order (as every protobuf serializer
    writes them), so that the header is known before the first chunk."""
    while body.left:
        number, wire_type = _tag_of(body)
        if number == chunks_field and wire_type == _LEN:
            return _varint_of(body)
        if number == header_field:
            raise DecodeError("the header comes after chunks")
        _field_of(body, number, wire_type)  # not one of ours: skipped, as protobuf skips unknown fields
    return None


def _chunks(body: _Body, chunks_field: int, header_field: int | None, size: int | None) -> Iterator[Chunk]:
    while size is not None:
        chunk = _read_chunk(body, size)
        yield chunk
        if isinstance(chunk.data, Incoming):
            chunk.data.skip()  # what the consumer left unread
        size = _next_chunk(body, chunks_field, header_field)


def read_to_end(frame: Frame) -> None:
    """Read what the consumer left of a message read from a connection
    (read_push, read_init, read_pull), so the connection is at the next one."""
    for _ in frame.chunks:
        pass


def _malformed_as_invalid(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    try:
        yield from chunks
    except (DecodeError, ValueError) as exc:
        raise InvalidArgument(f"malformed message: {exc}") from None


Decoder = Callable[[bytes | memoryview], "Frame | Malformed"]
Reader = Callable[[io.BufferedIOBase, int], "Frame | Malformed"]


def _decoder(header_type: type[Message] | None, chunks_field: int) -> tuple[Decoder, Reader]:
    """(decode, read): a message from memory, its chunks parsed at once; or
    from a stream, its chunks parsed as the caller iterates them, each
    chunk's data read by its consumer."""
    header_field = 1 if header_type is not None else None

    def start(body: _Body) -> tuple[Any, int | None]:
        """The header (if the message has one) and the first chunk's size."""
        header = None
        while body.left:
            number, wire_type = _tag_of(body)
            if number == chunks_field and wire_type == _LEN:
                return header, _varint_of(body)
            if number == header_field and wire_type == _LEN and header_type is not None:
                header = header_type.FromString(bytes(body.read(_varint_of(body))))
            else:
                _field_of(body, number, wire_type)  # not one of ours: skipped
        return header, None

    def decode(data: bytes | memoryview) -> Frame | Malformed:
        body = _Bytes(data)
        try:
            header, size = start(body)
            return Frame(header, list(_chunks(body, chunks_field, header_field, size)))
        except (DecodeError, ValueError) as exc:
            return Malformed(f"malformed message: {exc}")

    def read(stream: io.BufferedIOBase, size: int) -> Frame | Malformed:
        body = _Stream(stream, size)
        try:
            header, first = start(body)
        except (DecodeError, ValueError) as exc:
            return Malformed(f"malformed message: {exc}")
        return Frame(header, _malformed_as_invalid(_chunks(body, chunks_field, header_field, first)))

    return decode, read


# InitRequest and PushRequest share their layout: header = 1, chunks = 2.
request_parts = _parts_of(1, 2)  # for a socket's gather write, which needs no join
encode_request = _joined(request_parts)
pull_parts = _parts_of(None, 1)
encode_pull = _joined(pull_parts)
decode_init, read_init = _decoder(pb.InitHeader, 2)
decode_push, read_push = _decoder(pb.PushHeader, 2)
decode_pull, read_pull = _decoder(None, 1)


def lenient(message: type[Message]) -> Callable[[bytes], Message | Malformed]:
    """A request deserializer that answers Malformed instead of raising."""

    def decode(data: bytes) -> Message | Malformed:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Malformed(f"malformed {message.DESCRIPTOR.name}: {exc}")

    return decode


def decode_pull_strict(data: bytes | memoryview) -> Frame:
    return _strict(decode_pull(data))


def read_pull_strict(stream: io.BufferedIOBase, size: int) -> Frame:
    return _strict(read_pull(stream, size))


def _strict(frame: Frame | Malformed) -> Frame:
    if isinstance(frame, Malformed):
        raise InvalidArgument(f"server sent a {frame.reason}")
    return frame
