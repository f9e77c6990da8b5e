"""The worker side of the data channel (ps_common.data_channel).

`ServerStub` is what PSClient calls a server through: Hello, Stats and
Checkpoint on gRPC; init, push and pull on the server's data channel when
it offers one (its Hello says on which port, and under which Unix socket
name for workers on its host), else on gRPC. Both transports raise
grpc.RpcError with a status, so callers cannot tell them apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import mmap
import os
import socket
import ssl
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any, Protocol

import grpc
import torch

from ps_common import codec, data_channel, wire
from ps_common.data_channel import ChannelError
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb

_UNRESOLVED = -1
_HELLO_TIMEOUT = 5.0
_UNSENT_BYTES_OVER_A_LINK = 2**17


class PushCall(Protocol):
    """A push in flight (a grpc.Future on gRPC)."""

    def result(self, timeout: float | None = None) -> Any: ...
    def done(self) -> bool: ...
    def cancel(self) -> bool: ...


class _SharedReader:
    """Resolves the shared ranges of one pull in the server's mapped weights.
    For a pull in `half` precision it rounds their floats as the server casts
    what it sends (the same torch cast), into one buffer reused from key to
    key: a chunk's data is valid until the next chunk is read, as on the
    wire. (A fresh tensor per key cost more in page faults than the cast: 9.4M
    fp32 elements to bf16 on one thread, 11 ms allocating, 2.8 ms into a buffer.)"""

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


def is_loopback(host: str | None) -> bool:
    """Whether `host` (an address, or "localhost") is this host's loopback."""
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return False


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
            # may the next push start (`ServerStub._one_sending_over_a_link`).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _UNSENT_BYTES_OVER_A_LINK)
        self.stream = sock.makefile("rb")
        self.receiver = data_channel.Receiver(self.stream)

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


class _DataPush:
    """A data-channel push running on its own thread; `cancel` makes sure the
    server applies none of it (it never sees the stream's end)."""

    def __init__(self, stub: ServerStub, frames: Iterator[wire.Frame], timeout: float) -> None:
        self.cancelled = threading.Event()
        self.connection: _Connection | None = None
        self._future = stub._pushers.submit(stub._push, frames, timeout, self)

    def result(self, timeout: float | None = None) -> pb.PushResponse:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        self.cancelled.set()
        connection = self.connection
        if connection is not None:
            with contextlib.suppress(OSError):  # already closed
                connection.sock.shutdown(socket.SHUT_RDWR)
        return True


class ServerStub:
    """One server's methods. With `host` None (turned off, or a gRPC target
    that is not host:port) push and pull take gRPC; otherwise they take the
    data channel on `host` (with `tls`, as gRPC does) whenever the server's
    Hello (sent with `hello`) announces one; with `local`, through the
    server's Unix socket where this process can reach it (the same host)."""

    def __init__(
        self,
        channel: grpc.Channel,
        host: str | None,
        hello: pb.HelloRequest,
        auth_token: str | None,
        tls: ssl.SSLContext | None = None,
        local: bool = True,
        shared_weights: bool = True,
    ) -> None:
        self._grpc = wire.Stub(channel)
        self.Hello = self._grpc.Hello
        self.Stats = self._grpc.Stats
        self.Checkpoint = self._grpc.Checkpoint
        self._hello = hello
        self._host = host
        self._tls = tls
        self._port = _UNRESOLVED
        self._local = local
        self._socket_name = ""  # the server's abstract Unix socket, while worth trying
        self._wants_shared = shared_weights and tls is None
        self._shared: tuple[str, memoryview] | None = None  # (socket name, the server's weights mapped)
        self._share_refused = ""  # the socket name whose server said no
        self._token = auth_token or ""
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._pushers = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="ps-data-push")
        self._link_turn = threading.Lock()  # held by the push sending over a link

    # -- Push and Pull, on whichever transport ----------------------------------------

    def init(self, frames: Iterator[wire.Frame], timeout: float) -> pb.InitResponse:
        """Worker 0's Init stream."""
        if not self._has_data_channel():
            return self._grpc.Init(frames, timeout=timeout)  # type: ignore[no-any-return]
        return pb.InitResponse.FromString(self._client_stream("Init", frames, timeout, None))

    def push_future(self, frames: Iterable[wire.Frame], timeout: float) -> PushCall:
        """Push `frames` as they are yielded, from another thread. On the data
        channel, two pushes at a time: while the server applies one, the next
        is on its way; over a link, the second's bytes follow the first's
        (`_one_sending_over_a_link`). Later ones wait their turn. (gRPC: a
        unary call when `frames` is a list of one, much faster there.)"""
        if self._has_data_channel():
            return _DataPush(self, iter(frames), timeout)
        if isinstance(frames, list) and len(frames) == 1:
            return self._grpc.PushOne.future(frames[0], timeout=timeout)  # type: ignore[no-any-return]
        return self._grpc.Push.future(iter(frames), timeout=timeout)  # type: ignore[no-any-return]

    def pull(
        self,
        request: pb.PullRequest,
        timeout: float,
        destination: codec.Allocator,
        on_complete: Callable[[str], None] | None = None,
        one_message: bool = False,
    ) -> None:
        """Read the answer into the tensors `destination` gives (codec.receive).
        `one_message`: the answer fits in one (gRPC: a unary call, refused if
        it does not fit). The answer is read here, not by the caller, because
        on the data channel its tensor data is read from the connection as it
        is assembled: a connection cut off midway fails with a status, as
        anywhere else in the call."""
        if self._has_data_channel():
            self._pull(request, timeout, destination, on_complete)
        elif one_message:
            codec.receive([self._grpc.PullOne(request, timeout=timeout)], destination, on_complete)
        else:
            codec.receive(self._grpc.Pull(request, timeout=timeout), destination, on_complete)

    def close(self) -> None:
        self._pushers.shutdown(wait=True)
        with self._lock:
            idle, self._idle = self._idle, []
            self._shared = None  # the mapping goes with the last pull's views of it
        for connection in idle:
            connection.close()

    # -- the data channel ------------------------------------------------------------

    def _has_data_channel(self) -> bool:
        if self._host is None:
            return False
        if self._port == _UNRESOLVED:
            # A gRPC error here is the caller's, as for any call.
            answer = self.Hello(self._hello, timeout=_HELLO_TIMEOUT)
            self._port, self._socket_name = answer.data_port, answer.data_socket if self._local else ""
        return self._port != 0

    def _push(self, frames: Iterator[wire.Frame], timeout: float, call: _DataPush) -> pb.PushResponse:
        return pb.PushResponse.FromString(self._client_stream("Push", frames, timeout, call))

    def _client_stream(
        self, method: str, frames: Iterator[wire.Frame], timeout: float, call: _DataPush | None
    ) -> bytes:
        """Send a Push or Init stream; the answer's body."""
        with self._connected(timeout) as connection:
            if call is not None:
                call.connection = connection
            with self._one_sending_over_a_link(connection, timeout):
                header = pb.DataHeader(method=method, auth_token=self._token, timeout=timeout)  # opens the call
                for frame in frames:
                    self._send(connection, header, wire.request_parts(frame))
                    header = pb.DataHeader()
                if call is not None and call.cancelled.is_set():
                    raise ChannelError(grpc.StatusCode.CANCELLED, "push cancelled")
                header.last = True
                self._send(connection, header)
            _, body = self._answer(connection)
            return bytes(body)

    @contextmanager
    def _one_sending_over_a_link(self, connection: _Connection, timeout: float) -> Iterator[None]:
        """A call's turn to send over a link (Push; Init, which precedes them),
        where two pushes sending at once share its bandwidth: each takes twice
        as long to land, and so do the updates and pulls of its keys. Over
        emulated 1 Gbit/s links (2 workers, 2 servers, 9.4M parameters, 3 runs
        each taking turns, the slowest worker's median step), fp32 took
        410-433 ms a step sending in turns, 428-458 ms two at once; with
        overlap 406-423 against 435-450 (DDP: 346). One push at a time, each
        waiting for its answer, measured about the same here, but idles the
        link while the server applies a push, which matters where a link is
        fast (not measurable here: over emulated 10 Gbit/s links the cores set
        the pace, 129-149 ms a step all three ways)."""
        if not connection.over_link:
            yield
            return
        if not self._link_turn.acquire(timeout=timeout):
            raise ChannelError(grpc.StatusCode.DEADLINE_EXCEEDED, f"waited {timeout:g}s for the push before")
        try:
            yield
        finally:
            self._link_turn.release()

    def _pull(
        self,
        request: pb.PullRequest,
        timeout: float,
        destination: codec.Allocator,
        on_complete: Callable[[str], None] | None,
    ) -> None:
        shared = self._shared_weights(timeout)
        reader = None
        if shared is not None:
            half = codec.dtype_from_proto(request.dtype) if request.dtype != pb.DTYPE_UNSPECIFIED else None
            reader = _SharedReader(shared, half)
            asked, request = request, pb.PullRequest()
            request.CopyFrom(asked)
            request.shared = True
        with self._connected(timeout) as connection:
            header = pb.DataHeader(method="Pull", last=True, auth_token=self._token, timeout=timeout)
            self._send(connection, header, request.SerializeToString())
            codec.receive(self._answers(connection, reader), destination, on_complete)

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
        name = self._socket_name
        if not self._wants_shared or not name or name == self._share_refused:
            return None
        if self._shared is not None and self._shared[0] == name:
            return self._shared[1]
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
        if answer.code != 0 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            connection.close()
            self._share_refused = name  # an older server, or not yet initialized: bytes, as before
            return None
        try:
            memory = memoryview(mmap.mmap(fds[0], pb.ShareResponse.FromString(body).size, prot=mmap.PROT_READ))
        finally:
            os.close(fds[0])
        with self._lock:
            self._shared = (name, memory)
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
        """The server's next message; its status raised as a ChannelError."""
        header = self._answer_header(connection)
        return header, connection.receiver.read_body(header)

    @staticmethod
    def _answer_header(connection: _Connection) -> pb.DataHeader:
        """The server's next message's header (the body follows); its status raised as a ChannelError."""
        header = connection.receiver.read_header()
        if header.last and header.code != 0:
            raise ChannelError(data_channel.status_code(header.code), header.details)
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
            raise ChannelError(grpc.StatusCode.DEADLINE_EXCEEDED, "data channel call timed out") from None
        except OSError as exc:  # data_channel.Closed included
            connection.close()
            raise ChannelError(grpc.StatusCode.UNAVAILABLE, f"data channel connection lost: {exc}") from None
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
                    raise ChannelError(
                        grpc.StatusCode.UNAVAILABLE, f"data channel TLS handshake failed: {exc}"
                    ) from None
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
            self._socket_name = ""  # TCP, until a Hello (after a failed call) names a socket again
            return None
        data_channel.tune(sock)
        return sock

    def _connect(self, timeout: float) -> socket.socket:
        """A TCP connection to the server's data port."""
        assert self._host is not None
        try:
            sock = socket.create_connection((self._host, self._port), timeout=min(timeout, 10.0))
        except OSError as exc:
            where = f"{self._host}:{self._port}"
            self._port = _UNRESOLVED  # a restarted server may listen elsewhere: ask again next time
            raise ChannelError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot reach the data channel at {where}: {exc} (open that port, fix it on the servers "
                "with --data-port, or run workers with --no-data-channel)",
            ) from None
        data_channel.tune(sock)
        return sock
