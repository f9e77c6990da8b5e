"""The hand-written wire format of the bulk messages is protobuf's own: what
we write the generated classes read, and what they write we read."""

from __future__ import annotations

import io
from collections.abc import Iterable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ps_common import assembly, codec, wire
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb


def _sample_frame() -> wire.Frame:
    sparse = torch.zeros(1000)
    sparse[::100] = 1.5
    chunks = [
        # Larger than wire._SMALL_CHUNK: parsed field by field, its data left in the connection.
        *codec.tensor_to_chunks("big", torch.randn(20_000)),
        *codec.tensor_to_chunks("w[0:300]", torch.randn(300), chunk_bytes=512),
        *codec.tensor_to_chunks("s", sparse, sparse_if_smaller=True),
        codec.absent_chunk("bias"),
        *codec.tensor_to_chunks("neg", torch.arange(-3, 3), chunk_bytes=16),
    ]
    header = pb.PushHeader(worker_id=3, step=-1 + 2**40, groups=[codec.options_to_proto({"lr": 0.1})])
    return wire.Frame(header=header, chunks=chunks)


def _proto(frame: wire.Frame) -> pb.PushRequest:
    return pb.PushRequest(header=frame.header, chunks=[c.to_proto() for c in frame.chunks])


def test_what_we_write_protobuf_reads() -> None:
    frame = _sample_frame()
    assert pb.PushRequest.FromString(wire.encode_request(frame)) == _proto(frame)


def test_what_protobuf_writes_we_read() -> None:
    frame = _sample_frame()
    decoded = wire.decode_push(_proto(frame).SerializeToString())
    assert isinstance(decoded, wire.Frame)
    assert decoded.header == frame.header
    assert [c.to_proto() for c in decoded.chunks] == [c.to_proto() for c in frame.chunks]


def test_pull_responses_round_trip_without_a_header() -> None:
    chunks = list(codec.tensor_to_chunks("k", torch.randn(50), chunk_bytes=64))
    decoded = wire.decode_pull(wire.encode_pull(wire.Frame(chunks=chunks)))
    assert isinstance(decoded, wire.Frame) and decoded.header is None
    assert pb.PullResponse.FromString(wire.encode_pull(wire.Frame(chunks=chunks))).chunks[0].key == "k"
    assert torch.equal(assembly.receive([decoded], assembly.new_tensor_for)["k"], torch.cat([torch.randn(0)] + [
        torch.frombuffer(bytearray(c.data), dtype=torch.float32) for c in chunks]))  # fmt: skip


def test_unknown_fields_are_skipped_as_protobuf_does() -> None:
    frame = _sample_frame()
    extra = bytes([15 << 3 | 0, 42, 14 << 3 | 2, 3]) + b"abc"  # field 15 varint, field 14 bytes
    decoded = wire.decode_push(extra + wire.encode_request(frame))
    assert isinstance(decoded, wire.Frame) and len(decoded.chunks) == len(frame.chunks)


def _assembled(chunks: Iterable[codec.ChunkLike]) -> tuple[dict[str, torch.Tensor], set[str]]:
    assembler = assembly.ChunkAssembler(assembly.new_tensor_for)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish(), assembler.absent


@pytest.mark.parametrize("writer", ["ours", "protobuf"])
def test_a_message_read_from_a_connection_gives_what_it_gives_from_memory(writer: str) -> None:
    frame = _sample_frame()
    data = wire.encode_request(frame) if writer == "ours" else _proto(frame).SerializeToString()
    stream = io.BytesIO(data + b"next")  # the connection's next message: not to be touched
    streamed = wire.read_push(stream, len(data))
    in_memory = wire.decode_push(data)
    assert isinstance(streamed, wire.Frame) and isinstance(in_memory, wire.Frame)
    assert streamed.header == frame.header
    tensors, absent = _assembled(streamed.chunks)
    expected, expected_absent = _assembled(in_memory.chunks)
    assert tensors.keys() == expected.keys() and absent == expected_absent == {"bias"}
    assert all(torch.equal(tensors[key], expected[key]) for key in expected)
    assert stream.read() == b"next"


def test_large_dense_data_stays_in_the_connection_until_read_and_is_skipped_if_not() -> None:
    frame = _sample_frame()
    data = wire.encode_request(frame)
    stream = io.BytesIO(data + b"next")
    streamed = wire.read_push(stream, len(data))
    assert isinstance(streamed, wire.Frame)
    chunks = []
    for chunk in streamed.chunks:  # data never read: each is skipped for the next chunk
        chunks.append((chunk.key, type(chunk.data)))
    large = [len(c.data) > wire._SMALL_CHUNK and not c.sparse for c in frame.chunks]
    assert any(large) and not all(large)  # the small ones are read whole
    assert chunks == [(c.key, wire.Incoming if big else bytes) for c, big in zip(frame.chunks, large, strict=True)]
    assert stream.read() == b"next"


def test_a_header_after_chunks_is_refused() -> None:
    frame = _sample_frame()
    data = wire.encode_request(wire.Frame(chunks=frame.chunks)) + wire.encode_request(wire.Frame(header=frame.header))
    assert isinstance(wire.decode_push(data), wire.Malformed)
    streamed = wire.read_push(io.BytesIO(data), len(data))
    assert isinstance(streamed, wire.Frame)
    with pytest.raises(InvalidArgument, match="the header comes after chunks"):
        _assembled(streamed.chunks)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_connection_closed_in_the_middle_of_a_message_is_noticed(data: st.DataObject) -> None:
    encoded = wire.encode_request(_sample_frame())
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises((ConnectionError, InvalidArgument)):
        streamed = wire.read_push(io.BytesIO(encoded[:cut]), len(encoded))
        if isinstance(streamed, wire.Malformed):
            raise InvalidArgument(streamed.reason)
        _assembled(streamed.chunks)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_are_called_malformed_never_raise(data: bytes) -> None:
    for decode in (wire.decode_push, wire.decode_init, wire.decode_pull):
        assert isinstance(decode(data), (wire.Frame, wire.Malformed))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_truncated_messages_are_malformed(data: st.DataObject) -> None:
    encoded = wire.encode_request(_sample_frame())
    cut = data.draw(st.integers(1, len(encoded) - 1))
    decoded = wire.decode_push(encoded[:cut])
    if isinstance(decoded, wire.Frame):  # a cut between fields is a valid, shorter message
        assert [c.key for c in pb.PushRequest.FromString(encoded[:cut]).chunks] == [c.key for c in decoded.chunks]
