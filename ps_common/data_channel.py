"""The data channel's framing, for both sides (DataHeader in proto/ps.proto).

gRPC Python spends about twice a plain socket's CPU per byte it moves
(benchmarks/wire.py measures both), and on a parameter server Init, Push
and Pull carry nearly every byte. So they may travel on a TCP connection
of their own beside gRPC (with TLS when gRPC has it), or on a Unix socket
from a worker on the server's host (ps_server.transport.socket_server): the same protobuf
messages as on gRPC, each after a small DataHeader, written from the
tensors' memory by gather writes and read, tensor data straight into its
destination tensor (ps_common.wire), everything else into one reused
buffer per connection. The messages' 4 MiB limit is gRPC's default, so one
chunking serves both transports.
"""

from __future__ import annotations

import io
import os
import socket
import ssl
import struct
from collections.abc import Sequence
from typing import Any, cast

from google.protobuf.message import DecodeError

from ps_common.codec import DEFAULT_CHUNK_BYTES
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb

__all__ = ["BODY_LIMIT", "HEADER_LIMIT", "Closed", "Receiver", "read_exactly", "read_with_fds", "tune", "write"]

HEADER_LIMIT = 64 * 2**10
BODY_LIMIT = DEFAULT_CHUNK_BYTES + 64 * 2**10  # gRPC's default message limit, 4 MiB
_LENGTH = struct.Struct("<I")
_SMALL = 64 * 2**10  # bodies up to this size go out with their header in one send
_IOV_MAX = 1024  # Linux's limit on the pieces of one sendmsg


class Closed(ConnectionError):
    """The peer closed the connection."""


def tune(sock: socket.socket) -> None:
    """TCP: send small messages (headers, answers) at once rather than after
    Nagle's wait; notice a peer whose host vanished (powered off,
    partitioned: no FIN ever comes) after about two idle minutes.

    A Unix socket has neither problem, but its send buffer (the bytes in
    flight) stays at the system's default, 208 KiB on Linux, where TCP's
    grows: a 4 MiB message then costs two dozen sleeps and wake-ups. With
    4 MiB (capped by net.core.wmem_max), measured here: 6.3-7.2 GB/s through
    an echo instead of 3.2-4.3, on 25% less CPU."""
    if sock.family == socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, DEFAULT_CHUNK_BYTES)
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the system's defaults
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _KEEPALIVE_PROBES)


_KEEPALIVE_IDLE, _KEEPALIVE_INTERVAL, _KEEPALIVE_PROBES = 60, 10, 6


def write(
    sock: socket.socket, header: pb.DataHeader, body: bytes | memoryview | Sequence[Any] = b"", fds: Sequence[int] = ()
) -> None:
    """One message: length, header, body. A body given as a list of pieces
    goes out with one gather write per 1024 pieces, without being joined
    (TLS sockets have no gather write: joined there). `fds` (a Unix
    socket's small message only) pass with its first bytes (SCM_RIGHTS)."""
    parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body)
    header.body_length = sum(len(part) for part in parts)
    head = header.SerializeToString()
    prefix = _LENGTH.pack(len(head)) + head
    if fds:
        message = b"".join([prefix, *parts])
        sent = socket.send_fds(sock, [message], list(fds))
        sock.sendall(message[sent:])
    elif header.body_length <= _SMALL or isinstance(sock, ssl.SSLSocket):
        sock.sendall(b"".join([prefix, *parts]))
    else:
        _send_gathered(sock, [prefix, *parts])


def _send_gathered(sock: socket.socket, parts: list[Any]) -> None:
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first : first + _IOV_MAX])
        while sent:  # drop what went, keep the rest of a part that went halfway
            size = len(views[first])
            if sent < size:
                views[first] = views[first][sent:]
                break
            sent -= size
            first += 1


def read_with_fds(sock: socket.socket, max_fds: int) -> tuple[pb.DataHeader, bytes, list[int]]:
    """One small message read straight from a Unix socket (not through a
    buffered stream, which would drop passed descriptors), with the
    descriptors that came with it; the caller owns and closes them."""
    data, fds, _, _ = socket.recv_fds(sock, HEADER_LIMIT + _SMALL, max_fds)
    stream = cast(io.BufferedIOBase, _Exactly(data, sock))
    try:
        header = _read_header(stream, _SMALL)
        body = _fill(stream, b"", header.body_length)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return header, body, fds


class _Exactly:
    """Bytes already received, then the socket's; `read(n)` gives n bytes
    (fewer only at the end of the stream), never reading past them."""

    def __init__(self, start: bytes, sock: socket.socket) -> None:
        self._start = start
        self._sock = sock

    def read(self, size: int) -> bytes:
        data, self._start = self._start[:size], self._start[size:]
        while len(data) < size:
            more = self._sock.recv(size - len(data))
            if not more:
                break
            data += more
        return data


class Receiver:
    """Reads one connection's messages. A body is either read whole, into
    one buffer reused (valid until the next read), or left in `stream` for
    a reader that takes its bytes straight to where they belong
    (wire.read_push and read_pull: tensor data into its tensor)."""

    def __init__(self, stream: io.BufferedIOBase, body_limit: int = BODY_LIMIT) -> None:
        self.stream = stream
        self._limit = body_limit
        self._buffer = bytearray()

    def read(self) -> tuple[pb.DataHeader, memoryview]:
        """The next message, its body whole."""
        header = self.read_header()
        return header, self.read_body(header)

    def read_header(self) -> pb.DataHeader:
        """The next message's header; its body (`body_length` bytes) follows in
        `stream`. Raises Closed at a clean end of the stream before it,
        InvalidArgument for a header that breaks the rules."""
        return _read_header(self.stream, self._limit)

    def read_body(self, header: pb.DataHeader) -> memoryview:
        size = header.body_length
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        body = memoryview(self._buffer)[:size]
        if size and self.stream.readinto(body) != size:
            raise Closed("connection closed in the middle of a message")
        return body


def _read_header(stream: io.BufferedIOBase, body_limit: int) -> pb.DataHeader:
    prefix = stream.read(_LENGTH.size)
    if not prefix:
        raise Closed("connection closed")
    (size,) = _LENGTH.unpack(_fill(stream, prefix, _LENGTH.size))
    if size > HEADER_LIMIT:
        raise InvalidArgument(f"data header of {size} bytes; the limit is {HEADER_LIMIT}")
    try:
        header = pb.DataHeader.FromString(_fill(stream, b"", size))
    except DecodeError as exc:
        raise InvalidArgument(f"malformed data header: {exc}") from None
    if header.body_length > body_limit:
        raise InvalidArgument(f"message of {header.body_length} bytes; the limit is {body_limit} (send chunks)")
    return header


def read_exactly(stream: io.BufferedIOBase, size: int) -> bytes:
    """The next `size` bytes of the stream; Closed if it ends before."""
    return _fill(stream, b"", size)


def _fill(stream: io.BufferedIOBase, start: bytes, size: int) -> bytes:
    """`start` completed to `size` bytes from the stream."""
    data = start + stream.read(size - len(start)) if len(start) < size else start
    if len(data) != size:
        raise Closed("connection closed in the middle of a message")
    return data
