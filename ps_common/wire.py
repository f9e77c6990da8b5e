"""The bulk messages (InitRequest, PushRequest, PullResponse) in protobuf's
own wire format, written and read without copying tensor bytes.

Building a protobuf message copies each `bytes` field several times (into
the message, into a parent message, into the serialized string; and back on
the other side). For tensors that is most of the cost of a transfer. Here a
Frame's chunk data stays a view of the tensor until one join makes the
serialized message, and incoming data stays a view of the received bytes
until it is copied into its destination tensor: two copies per side
instead of five.

The bytes are exactly those of the messages in proto/ps.proto, so any
protobuf client or server interoperates (the tests talk to our server with
the generated stubs). Only these three messages take this path; everything
else uses the generated classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from ps_common.codec import Chunk
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb
from ps_common.proto import ps_pb2_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_DATA, _INDICES = 5, 8  # TensorChunk's bulk fields


@dataclass
class Frame:
    """One InitRequest, PushRequest or PullResponse: an optional header and chunks."""

    header: Any = None  # InitHeader, PushHeader, or None
    chunks: list[Chunk] = field(default_factory=list)


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
        sparse=chunk.sparse, length=chunk.length,
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


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(view: memoryview) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field; LEN fields' ranges
    are their payloads, the others' their whole encoding (tag included)."""
    out = []
    pos = 0
    while pos < len(view):
        start = pos
        tag, pos = _read_varint(view, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire_type == _VARINT:
            _, pos = _read_varint(view, pos)
            out.append((number, wire_type, start, pos))
        elif wire_type in (_FIXED64, _FIXED32):
            pos += 8 if wire_type == _FIXED64 else 4
            out.append((number, wire_type, start, pos))
        elif wire_type == _LEN:
            size, pos = _read_varint(view, pos)
            out.append((number, wire_type, pos, pos + size))
            pos += size
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")
        if pos > len(view):
            raise DecodeError("field runs past the end of the message")
    return out


def _read_chunk(view: memoryview) -> Chunk:
    """A TensorChunk: its small fields parsed by protobuf, data and indices kept as views."""
    bulk: dict[int, memoryview] = {}
    meta = bytearray()
    for number, wire_type, start, end in _fields(view):
        if number in (_DATA, _INDICES) and wire_type == _LEN:
            bulk[number] = view[start:end]
        elif wire_type == _LEN:  # re-emit tag and length before the payload
            meta += _length_delimited(number, end - start) + view[start:end]
        else:
            meta += view[start:end]
    parsed = pb.TensorChunk.FromString(bytes(meta))
    return Chunk(
        key=parsed.key, dtype=parsed.dtype, shape=list(parsed.shape), offset=parsed.offset,
        data=bulk.get(_DATA, memoryview(b"")), absent=parsed.absent, sparse=parsed.sparse,
        indices=bulk.get(_INDICES, memoryview(b"")), length=parsed.length,
    )  # fmt: skip


def _decoder(header_type: type[Message] | None, chunks_field: int) -> Callable[[bytes | memoryview], Frame | Malformed]:
    header_field = 1

    def decode(data: bytes | memoryview) -> Frame | Malformed:
        view = memoryview(data)
        frame = Frame()
        try:
            for number, wire_type, start, end in _fields(view):
                if wire_type != _LEN:
                    continue  # not one of ours: skipped, as protobuf skips unknown fields
                if number == chunks_field:
                    frame.chunks.append(_read_chunk(view[start:end]))
                elif header_type is not None and number == header_field:
                    frame.header = header_type.FromString(bytes(view[start:end]))
        except (DecodeError, ValueError) as exc:
            return Malformed(f"malformed message: {exc}")
        return frame

    return decode


# InitRequest and PushRequest share their layout: header = 1, chunks = 2.
request_parts = _parts_of(1, 2)  # for a socket's gather write, which needs no join
encode_request = _joined(request_parts)
pull_parts = _parts_of(None, 1)
encode_pull = _joined(pull_parts)
decode_init = _decoder(pb.InitHeader, 2)
decode_push = _decoder(pb.PushHeader, 2)
decode_pull = _decoder(None, 1)


def lenient(message: type[Message]) -> Callable[[bytes], Message | Malformed]:
    """A request deserializer that answers Malformed instead of raising."""

    def decode(data: bytes) -> Message | Malformed:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Malformed(f"malformed {message.DESCRIPTOR.name}: {exc}")

    return decode


def decode_pull_strict(data: bytes | memoryview) -> Frame:
    frame = decode_pull(data)
    if isinstance(frame, Malformed):
        raise InvalidArgument(f"server sent a {frame.reason}")
    return frame


# -- stubs and handlers ------------------------------------------------------------------


class Stub(ps_pb2_grpc.ParameterServerStub):
    """The generated stub, with Init, Push and Pull taking and giving Frames."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)  # type: ignore[no-untyped-call]
        prefix = f"/{SERVICE}/"
        self.Init = channel.stream_unary(prefix + "Init", encode_request, pb.InitResponse.FromString)
        self.Push = channel.stream_unary(prefix + "Push", encode_request, pb.PushResponse.FromString)
        self.PushOne = channel.unary_unary(prefix + "PushOne", encode_request, pb.PushResponse.FromString)
        self.Pull = channel.unary_stream(prefix + "Pull", pb.PullRequest.SerializeToString, decode_pull_strict)
        self.PullOne = channel.unary_unary(prefix + "PullOne", pb.PullRequest.SerializeToString, decode_pull_strict)


def add_servicer(servicer: ps_pb2_grpc.ParameterServerServicer, server: grpc.Server) -> None:
    """Register `servicer`: every method receives its request or, for bytes
    that do not parse, a Malformed; Init and Push receive Frames; Pull and
    PullOne answer PullResponses already serialized."""
    handlers = {
        "Hello": grpc.unary_unary_rpc_method_handler(
            servicer.Hello, lenient(pb.HelloRequest), pb.HelloResponse.SerializeToString
        ),
        "Init": grpc.stream_unary_rpc_method_handler(servicer.Init, decode_init, pb.InitResponse.SerializeToString),
        "Push": grpc.stream_unary_rpc_method_handler(servicer.Push, decode_push, pb.PushResponse.SerializeToString),
        "PushOne": grpc.unary_unary_rpc_method_handler(
            servicer.PushOne, decode_push, pb.PushResponse.SerializeToString
        ),
        # The servicer serializes its answers itself (from wire.pull_parts).
        "Pull": grpc.unary_stream_rpc_method_handler(servicer.Pull, lenient(pb.PullRequest), None),
        "PullOne": grpc.unary_unary_rpc_method_handler(servicer.PullOne, lenient(pb.PullRequest), None),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, lenient(pb.StatsRequest), pb.StatsResponse.SerializeToString
        ),
        "Checkpoint": grpc.unary_unary_rpc_method_handler(
            servicer.Checkpoint, lenient(pb.CheckpointRequest), pb.CheckpointResponse.SerializeToString
        ),
    }
    missing = set(pb.DESCRIPTOR.services_by_name["ParameterServer"].methods_by_name) - set(handlers)
    if missing:
        raise RuntimeError(f"proto methods without a handler: {sorted(missing)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
