"""The socket transport of the client, the data channel (ps_common.data_channel):
every method of the service on a TCP connection to the server's data port,
or on its abstract Unix socket from a process on its host, where pulls may
read the weights straight from the server's shared memory. A failure (a
socket error, a deadline, the server's status) becomes a PSError here and
nowhere else."""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import socket
import threading
import warnings
from collections.abc import Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import torch

from ps_common import assembly, codec, data_channel, wire
from ps_common.assembly import Allocator, OnComplete
from ps_common.errors import Cancelled, Code, InvalidArgument
from ps_common.proto import ps_pb2 as pb
from ps_worker.links import is_loopback
from ps_worker.transport.base import Transport, failure
from ps_worker.transport.security import ClientSecurity

__all__ = ["SocketTransport", "crosses_a_link"]

_UNSENT_BYTES_OVER_A_LINK = 2**17


class _SharedReader:
    """Resolves the shared ranges of one pull in the server's mapped weights.
    For a pull in `half` precision it rounds their floats as the server casts
    what it sends (the same torch cast), into one buffer reused from key to
    key (a fresh tensor per key costs more in page faults than the cast): a
    chunk's data is valid until the next chunk is read, as on the wire."""

    def __init__(self, shared: memoryview, half: torch.dtype | None) -> None:
        self._shared = shared
        self._half = half
        self._buffer: torch.Tensor | None = None

    def resolved(self, chunks: Iterable[codec.Chunk]) -> Iterator[codec.Chunk]:
        """`chunks`, those in the shared weights with their data there (or rounded)."""
        for chunk in chunks:
            if chunk.shared is not None:
                offset, size = chunk.shared
                if offset + size > len(self._shared):
                    raise InvalidArgument(f"server sent key {chunk.key!r} at bytes past the end of its shared weights")
                data = self._shared[offset : offset + size]
                stored = codec.dtype_from_proto(chunk.dtype)
                travels = codec.wire_dtype(stored, self._half)
                if travels != stored:
                    data = self._rounded(chunk.key, data, stored, travels)
                    chunk = dataclasses.replace(chunk, dtype=codec.dtype_to_proto(travels))
                chunk = dataclasses.replace(chunk, data=data, shared=None)
            yield chunk

    def _rounded(self, key: str, data: memoryview, stored: torch.dtype, travels: torch.dtype) -> memoryview:
        if len(data) % stored.itemsize:
            raise InvalidArgument(f"server shared key {key!r} in {len(data)} bytes, not whole elements")
        count = len(data) // stored.itemsize
        if self._buffer is None or self._buffer.dtype != travels or self._buffer.numel() < count:
            self._buffer = torch.empty(count, dtype=travels)
        rounded = self._buffer[:count]
        with warnings.catch_warnings():  # torch warns that the mapping is read-only: it is only read
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
            rounded.copy_(torch.frombuffer(data, dtype=stored))
        return rounded.view(torch.uint8).numpy().data


def crosses_a_link(sock: socket.socket) -> bool:
    """Whether `sock` is TCP to another host, where a link's bandwidth
    rather than this host's cores sets the pace."""
    if sock.family == socket.AF_UNIX:
        return False
    try:
        peer = sock.getpeername()[0]
    except OSError:  # already reset: the call's first send says so, as a status a retry handles
        return False
    return not is_loopback(peer)


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.over_link = crosses_a_link(sock)
        if self.over_link and hasattr(socket, "TCP_NOTSENT_LOWAT"):  # Linux, macOS
            # A send returns once its bytes are all but 128 KiB on their way,
            # not merely copied into the socket's buffer (megabytes): only then
            # may the next push start (`SocketTransport._one_sending_over_a_link`).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _UNSENT_BYTES_OVER_A_LINK)
        self.stream = sock.makefile("rb")
        self.receiver = data_channel.Receiver(self.stream)

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


class _DataPush:
    """A data-channel push running on its own thread; `cancel` makes sure the
    server applies none of it (it never sees the stream's end)."""

    def __init__(self, transport: SocketTransport, frames: Iterator[wire.Frame], timeout: float) -> None:
        self.cancelled = threading.Event()
        self.connection: _Connection | None = None
        self._future = transport.start_push(frames, timeout, self)

    def result(self, timeout: float | None = None) -> pb.PushResponse:
        response: pb.PushResponse = self._future.result(timeout)
        return response

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        self.cancelled.set()
        connection = self.connection
        if connection is not None:
            with contextlib.suppress(OSError):  # already closed
                connection.sock.shutdown(socket.SHUT_RDWR)
        return True


class SocketTransport(Transport):
    """The server named `where`, through its data channel at `host:port`,
    or through its Unix socket `socket_name` where this process can reach
    it (the same host), with `security`; with `shared_weights`, pulls
    through that socket read the weights from the server's memory. `lost`
    is set once the data port cannot be reached: the server may have
    restarted elsewhere, and its gRPC Hello says where."""

    def __init__(
        self,
        where: str,
        host: str,
        port: int,
        socket_name: str,
        security: ClientSecurity,
        shared_weights: bool = True,
    ) -> None:
        self._where = where
        self._host = host
        self._port = port
        self._socket_name = socket_name  # the server's abstract Unix socket, while worth trying
        self._tls = security.tls_context()
        self._token = security.token
        self._wants_shared = shared_weights and self._tls is None
        self._shared: memoryview | None = None  # the server's weights mapped
        self._share_refused = False
        self.lost = False
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._pushers = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="ps-data-push")
        self._link_turn = threading.Lock()  # held by the push sending over a link

    # -- the service's methods ---------------------------------------------------------

    def hello(self, request: pb.HelloRequest, timeout: float) -> pb.HelloResponse:
        return pb.HelloResponse.FromString(self._unary("Hello", request.SerializeToString(), timeout))

    def stats(self, timeout: float) -> pb.StatsResponse:
        return pb.StatsResponse.FromString(self._unary("Stats", b"", timeout))

    def checkpoint(self, timeout: float) -> pb.CheckpointResponse:
        return pb.CheckpointResponse.FromString(self._unary("Checkpoint", b"", timeout))

    def leave(self, request: pb.LeaveRequest, timeout: float) -> None:
        self._unary("Leave", request.SerializeToString(), timeout)

    def init(self, frames: Iterator[wire.Frame], timeout: float) -> pb.InitResponse:
        return pb.InitResponse.FromString(self._client_stream("Init", frames, timeout, None))

    def push(self, frames: Iterable[wire.Frame], timeout: float) -> _DataPush:
        """Two pushes at a time: while the server applies one, the next is on
        its way; over a link, the second's bytes follow the first's
        (`_one_sending_over_a_link`). Later ones wait their turn."""
        return _DataPush(self, iter(frames), timeout)

    def start_push(self, frames: Iterator[wire.Frame], timeout: float, call: _DataPush) -> futures.Future[Any]:
        return self._pushers.submit(
            lambda: pb.PushResponse.FromString(self._client_stream("Push", frames, timeout, call))
        )

    def pull(self, request: pb.PullRequest, timeout: float, into: Allocator, done: OnComplete = None) -> None:
        shared = self._shared_weights(timeout)
        reader = None
        if shared is not None:
            half = codec.dtype_from_proto(request.dtype) if request.dtype != pb.DTYPE_UNSPECIFIED else None
            reader = _SharedReader(shared, half)
            asked, request = request, pb.PullRequest()
            request.CopyFrom(asked)
            request.shared = True
        self._server_stream("Pull", request.SerializeToString(), timeout, reader, into, done)

    def get_state(self, request: pb.StateRequest, timeout: float, into: Allocator, done: OnComplete = None) -> None:
        self._server_stream("GetState", request.SerializeToString(), timeout, None, into, done)

    def set_state(self, messages: Iterator[pb.SetStateRequest], timeout: float) -> pb.SetStateResponse:
        frames = ([message.SerializeToString()] for message in messages)
        return pb.SetStateResponse.FromString(self._client_stream("SetState", frames, timeout, None))

    def _server_stream(
        self, method: str, body: bytes, timeout: float, reader: _SharedReader | None, into: Allocator, done: OnComplete
    ) -> None:
        """A call of one request whose answer is a stream of PullResponses, read into tensors."""
        with self._connected(timeout) as connection:
            header = pb.DataHeader(method=method, last=True, auth_token=self._token, timeout=timeout)
            self._send(connection, header, body)
            assembly.receive(self._answers(connection, reader), into, done)

    def close(self) -> None:
        self._pushers.shutdown(wait=True)
        with self._lock:
            idle, self._idle = self._idle, []
            self._shared = None  # the mapping goes with the last pull's views of it
        for connection in idle:
            connection.close()

    # -- calls -------------------------------------------------------------------------

    def _error(self, code: int, details: str) -> Exception:
        return failure(self._where, code, details)

    def _unary(self, method: str, body: bytes, timeout: float) -> bytes:
        """A call of one message each way; the answer's body."""
        with self._connected(timeout) as connection:
            header = pb.DataHeader(method=method, last=True, auth_token=self._token, timeout=timeout)
            self._send(connection, header, body)
            _, answer = self._answer(connection)
            return bytes(answer)

    def _client_stream(
        self, method: str, frames: Iterator[wire.Frame | list[bytes]], timeout: float, call: _DataPush | None
    ) -> bytes:
        """Send a client stream (Frames, or messages already serialized); the answer's body."""
        with self._connected(timeout) as connection:
            if call is not None:
                call.connection = connection
            with self._one_sending_over_a_link(connection, timeout):
                header = pb.DataHeader(method=method, auth_token=self._token, timeout=timeout)  # opens the call
                for frame in frames:
                    self._send(connection, header, frame if isinstance(frame, list) else wire.request_parts(frame))
                    header = pb.DataHeader()
                if call is not None and call.cancelled.is_set():
                    raise Cancelled(f"{self._where}: push cancelled (CANCELLED)")
                header.last = True
                self._send(connection, header)
            _, body = self._answer(connection)
            return bytes(body)

    @contextmanager
    def _one_sending_over_a_link(self, connection: _Connection, timeout: float) -> Iterator[None]:
        """A call's turn to send over a link (Push; Init, which precedes them),
        where two pushes sending at once share its bandwidth: each would take
        twice as long to land, and so would the updates and pulls of its keys.
        (One push at a time, each waiting for its answer, would idle the link
        while the server applies a push.)"""
        if not connection.over_link:
            yield
            return
        if not self._link_turn.acquire(timeout=timeout):
            raise self._error(Code.DEADLINE_EXCEEDED, f"waited {timeout:g}s for the push before")
        try:
            yield
        finally:
            self._link_turn.release()

    def _answers(self, connection: _Connection, reader: _SharedReader | None) -> Iterator[wire.Frame]:
        """A Pull's answer, message by message, each valid until the next is read."""
        while True:
            header = self._answer_header(connection)
            if header.last:
                return
            message = wire.read_pull_strict(connection.stream, header.body_length)
            if reader is not None:
                message = wire.Frame(message.header, reader.resolved(message.chunks))
            yield message
            wire.read_to_end(message)

    def _shared_weights(self, timeout: float) -> memoryview | None:
        """The server's weights, mapped read-only on first use (the "Share" call
        on a connection of its own, ps_server.shared_weights); None where it
        does not share them: another host, TLS, or a server that said no."""
        if not self._wants_shared or not self._socket_name or self._share_refused:
            return None
        if self._shared is not None:
            return self._shared
        sock = self._connect_locally(timeout)
        if sock is None:
            return None
        connection = _Connection(sock)
        try:
            header = pb.DataHeader(method="Share", last=True, auth_token=self._token, timeout=timeout)
            data_channel.write(sock, header)
            answer, body, fds = data_channel.read_with_fds(sock, max_fds=1)
        except OSError:  # data_channel.Closed included: the pull that follows reports the trouble
            connection.close()
            return None
        if answer.code != Code.OK or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            connection.close()
            self._share_refused = True  # not yet initialized, say: bytes, as before
            return None
        try:
            memory = memoryview(mmap.mmap(fds[0], pb.ShareResponse.FromString(body).size, prot=mmap.PROT_READ))
        finally:
            os.close(fds[0])
        with self._lock:
            self._shared = memory
            self._idle.append(connection)
        return memory

    def _send(self, connection: _Connection, header: pb.DataHeader, body: bytes | list[Any] = b"") -> None:
        try:
            data_channel.write(connection.sock, header, body)
        except OSError:
            # A server that refused the call early answers, then closes: its
            # answer says why better than the broken pipe.
            self._answer(connection)
            raise

    def _answer(self, connection: _Connection) -> tuple[pb.DataHeader, memoryview]:
        """The server's next message; its status raised as a PSError."""
        header = self._answer_header(connection)
        return header, connection.receiver.read_body(header)

    def _answer_header(self, connection: _Connection) -> pb.DataHeader:
        """The server's next message's header (the body follows); its status raised as a PSError."""
        header = connection.receiver.read_header()
        if header.last and header.code != Code.OK:
            raise self._error(header.code, header.details)
        return header

    @contextmanager
    def _connected(self, timeout: float) -> Iterator[_Connection]:
        """A connection for one call: back to the pool after a clean call,
        closed after anything else (its position in the stream is unknown)."""
        connection = self._checkout(timeout)
        try:
            yield connection
        except TimeoutError:
            connection.close()
            raise self._error(Code.DEADLINE_EXCEEDED, "data channel call timed out") from None
        except OSError as exc:  # data_channel.Closed included
            connection.close()
            raise self._error(Code.UNAVAILABLE, f"data channel connection lost: {exc}") from None
        except BaseException:
            connection.close()
            raise
        with self._lock:
            self._idle.append(connection)

    def _checkout(self, timeout: float) -> _Connection:
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            sock = self._connect_locally(timeout) or self._connect(timeout)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_hostname=self._host)
                except OSError as exc:  # ssl.SSLError included
                    sock.close()
                    raise self._error(Code.UNAVAILABLE, f"data channel TLS handshake failed: {exc}") from None
            connection = _Connection(sock)
        connection.sock.settimeout(timeout)
        return connection

    def _connect_locally(self, timeout: float) -> socket.socket | None:
        """A connection to the server's Unix socket; None where it cannot be
        reached: another host (another network namespace has its own
        abstract names), or the server restarted under a new name."""
        name = self._socket_name
        if not name:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(min(timeout, 10.0))
        try:
            sock.connect("\0" + name)
        except OSError:
            sock.close()
            self._socket_name = ""  # TCP from now on
            return None
        data_channel.tune(sock)
        return sock

    def _connect(self, timeout: float) -> socket.socket:
        """A TCP connection to the server's data port."""
        try:
            sock = socket.create_connection((self._host, self._port), timeout=min(timeout, 10.0))
        except OSError as exc:
            self.lost = True  # a restarted server may listen elsewhere: its Hello says where
            raise self._error(
                Code.UNAVAILABLE,
                f"cannot reach the data channel at {self._host}:{self._port}: {exc} (open that port, fix it on "
                "the servers with --data-port, or run workers with --no-data-channel)",
            ) from None
        data_channel.tune(sock)
        return sock
