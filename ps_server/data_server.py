"""The server side of the data channel (ps_common.data_channel): Init, Push
and Pull on a TCP port of their own (TLS as gRPC's), answered by the same ParameterService as on gRPC,
so both transports share every check, status and counter.

On Linux the same calls are also served on an abstract Unix socket, which
only processes in the server's network namespace can reach: workers on the
server's host (or in its pod) connect there, because a Unix socket moves
bytes on a fraction of loopback TCP's CPU (no TCP segments, acknowledgements
or softirq work), and on a machine whose cores the workers and servers
share, CPU is what a step waits for.

One thread per connection: a worker keeps one connection per concurrent
call, and a waiting pull holds its thread, as it holds a gRPC handler thread.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import logging
import os
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

import grpc

from ps_common import data_channel, wire
from ps_common.data_channel import ChannelError
from ps_common.proto import ps_pb2 as pb

if TYPE_CHECKING:
    from ps_server.service import ParameterService

log = logging.getLogger(__name__)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _CallContext:
    """What ParameterService asks of a gRPC ServicerContext."""

    def __init__(self, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout if timeout > 0 else None

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class DataServer:
    """Serves `service`'s Init, Push and Pull on `host:port` (0: a free port) until stop()."""

    def __init__(
        self,
        service: ParameterService,
        host: str,
        port: int,
        auth_token: str | None,
        max_connections: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._service = service
        self._tls = tls
        self._token = auth_token.encode() if auth_token else None
        self._max_connections = max_connections
        host = host.strip("[]")  # "[::]" as gRPC writes it
        ipv6 = ":" in host
        self._listener = socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ipv6 else socket.AF_INET,
            dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6(),  # like gRPC on [::]
        )
        self.port: int = self._listener.getsockname()[1]
        self._local_listener, self.socket_name = _local_listener()
        self._connections: set[socket.socket] = set()
        self._busy = 0  # connections in the middle of a call
        self.calls = 0  # calls served, answered OK or not
        self.local_calls = 0  # of which on the Unix socket
        self._lock = threading.Condition()
        self._stopped = False
        listeners = [self._listener] if self._local_listener is None else [self._listener, self._local_listener]
        self._acceptors = [
            threading.Thread(target=self._accept, args=(listener,), name="ps-data-accept", daemon=True)
            for listener in listeners
        ]

    def start(self) -> None:
        for acceptor in self._acceptors:
            acceptor.start()

    def stop(self, grace: float | None) -> None:
        """Stop accepting, give calls in flight `grace` seconds, then end every
        connection (a call still in flight fails UNAVAILABLE on its client)."""
        for listener in (self._listener, self._local_listener):
            if listener is not None:
                _shut(listener)  # wakes the thread blocked in accept()
                listener.close()
        for acceptor in self._acceptors:
            acceptor.join(timeout=5)
        with self._lock:
            self._stopped = True
            self._lock.wait_for(lambda: self._busy == 0, timeout=grace or 0)
            connections = list(self._connections)
        for sock in connections:
            _shut(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # the listener was shut down
            data_channel.tune(sock)
            with self._lock:
                refused = self._stopped or len(self._connections) >= self._max_connections
                if not refused:
                    self._connections.add(sock)
            if refused:
                self._refuse(sock)
                continue
            threading.Thread(target=self._serve, args=(sock,), name="ps-data-conn", daemon=True).start()

    def _refuse(self, sock: socket.socket) -> None:
        """UNAVAILABLE, which clients retry after a pause. Not waiting for the
        client's request first: that would stall accepting for everyone."""
        with sock, contextlib.suppress(OSError):
            details = "the server is shutting down" if self._stopped else (
                f"{self._max_connections} data connections are open, the most this server takes; retry later"
            )  # fmt: skip
            data_channel.write(sock, pb.DataHeader(last=True, code=_number(grpc.StatusCode.UNAVAILABLE),
                                                   details=details))  # fmt: skip

    def _serve(self, sock: socket.socket) -> None:
        """Calls one after another until the client leaves or a call fails.
        Between calls the connection may idle for as long as the client
        keeps it (TCP keepalive notices a host that vanished); within a call,
        every read and write is bounded by the call's deadline, so a client
        that stops halfway cannot hold this thread."""
        try:
            if self._tls is not None:
                sock = self._handshake(sock)
            with sock, cast(io.BufferedIOBase, sock.makefile("rb")) as stream:
                receiver = data_channel.Receiver(stream)
                while self._call(sock, receiver):
                    pass
        except (data_channel.Closed, OSError) as exc:
            log.debug("data connection ended: %s", exc)
        finally:
            sock.close()
            with self._lock:
                self._connections.discard(sock)

    def _handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        """TLS, here rather than in the accept loop, so that a slow handshake
        holds up only its own client; the wrapped socket replaces the plain one
        (which TLS detaches) among those stop() shuts down."""
        assert self._tls is not None
        with self._lock:
            self._connections.discard(sock)
        sock.settimeout(_HANDSHAKE_SECONDS)
        wrapped = self._tls.wrap_socket(sock, server_side=True)
        wrapped.settimeout(None)
        with self._lock:
            if self._stopped:
                wrapped.close()
                raise data_channel.Closed("the server is stopping")
            self._connections.add(wrapped)
        return wrapped

    def _call(self, sock: socket.socket, receiver: data_channel.Receiver) -> bool:
        """Serve one call; False when the connection must close after it."""
        try:
            header = receiver.read_header()
        except data_channel.Closed:
            return False  # the client left between calls
        except ChannelError as exc:
            self._answer_error(sock, exc.code(), exc.details())
            return False
        with self._lock:
            if self._stopped:
                self._answer_error(sock, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
                return False
            self._busy += 1
            self.calls += 1
            self.local_calls += sock.family == socket.AF_UNIX
        limit = header.timeout if header.timeout > 0 else _NO_DEADLINE_LIMIT
        sock.settimeout(limit)
        try:
            return self._dispatch(sock, receiver, header)
        except TimeoutError:
            log.warning(
                "data channel %s from %s: nothing sent or read for %gs, the call's deadline, in the middle of the "
                "call; closing the connection (nothing of a push cut off is applied)",
                header.method, _peer(sock), limit,
            )  # fmt: skip
            return False
        finally:
            sock.settimeout(None)
            with self._lock:
                self._busy -= 1
                self._lock.notify_all()

    def _dispatch(self, sock: socket.socket, receiver: data_channel.Receiver, header: pb.DataHeader) -> bool:
        context = _CallContext(header.timeout)
        try:
            self._authenticate(header)
            if header.method in ("Push", "Init"):
                method, read = (
                    (self._service.Push, wire.read_push) if header.method == "Push" else
                    (self._service.Init, wire.read_init)
                )  # fmt: skip
                response = method(self._client_stream(receiver, header, read), context)
                data_channel.write(sock, pb.DataHeader(last=True), response.SerializeToString())
            elif header.method == "Pull":
                body = bytes(receiver.read_body(header))
                request = cast(pb.PullRequest, wire.lenient(pb.PullRequest)(body))  # Malformed: refused
                for message in self._service.pull_parts(request, context, shares=_shares(sock)):
                    data_channel.write(sock, pb.DataHeader(), message)
                data_channel.write(sock, pb.DataHeader(last=True))
            elif header.method == "Share":
                self._share(sock)
            else:
                raise ChannelError(grpc.StatusCode.UNIMPLEMENTED, f"no method {header.method!r} on the data channel")
        except _Aborted as exc:
            self._answer_error(sock, exc.code, exc.details)
            return False
        except ChannelError as exc:
            self._answer_error(sock, exc.code(), exc.details())
            return False
        except (data_channel.Closed, OSError):
            raise  # the connection is gone: nothing to answer
        except Exception as exc:  # a bug: answer as gRPC would, and keep serving others
            log.exception("data channel %s failed", header.method)
            self._answer_error(sock, grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _client_stream(
        self, receiver: data_channel.Receiver, header: pb.DataHeader, read: wire.Reader
    ) -> Iterator[wire.Frame | wire.Malformed]:
        """A Push or Init stream's messages (until the one marked last), each
        read from the connection as its chunks are used."""
        while True:
            if header.body_length or not header.last:
                message = read(receiver.stream, header.body_length)
                yield message
                if isinstance(message, wire.Frame):
                    wire.read_to_end(message)
            if header.last:
                return
            header = receiver.read_header()

    def _share(self, sock: socket.socket) -> None:
        """Answer with the size of the shard's shared weights, passing a
        read-only descriptor of them (ps_server.shared_weights)."""
        shared = self._service.shard.shared
        if not _shares(sock) or shared is None:
            raise ChannelError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server shares its weights only after Init, on Linux, through its Unix socket without TLS",
            )
        try:
            fd = shared.readonly_fd()
        except OSError as exc:  # closed: the server is stopping
            raise ChannelError(grpc.StatusCode.UNAVAILABLE, f"shared weights unavailable: {exc}") from None
        try:
            response = pb.ShareResponse(size=shared.size).SerializeToString()
            data_channel.write(sock, pb.DataHeader(last=True), response, fds=[fd])
        finally:
            os.close(fd)

    def _authenticate(self, header: pb.DataHeader) -> None:
        if self._token is not None and not hmac.compare_digest(header.auth_token.encode(), self._token):
            raise ChannelError(
                grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token (set PS_AUTH_TOKEN on the client)"
            )

    @staticmethod
    def _answer_error(sock: socket.socket, code: grpc.StatusCode, details: str) -> None:
        """Answer the status, then read what the client still sends (a push
        refused after its first message, say) before the connection closes:
        closing with unread input resets the connection, and the client
        could lose the answer."""
        try:
            data_channel.write(sock, pb.DataHeader(last=True, code=_number(code), details=details))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(_DRAIN_SECONDS)
            deadline = time.monotonic() + _DRAIN_SECONDS
            while time.monotonic() < deadline and sock.recv(2**20):
                pass
        except OSError:
            pass  # the client is gone, or too slow to wait for: nothing more to tell


_DRAIN_SECONDS = 2.0
_HANDSHAKE_SECONDS = 10.0
_NO_DEADLINE_LIMIT = 600.0  # a call without a deadline (our clients always send one)


def _local_listener() -> tuple[socket.socket | None, str]:
    """A listening socket in Linux's abstract namespace, under a name no
    other server has, and that name; (None, "") elsewhere."""
    if sys.platform != "linux":
        return None, ""
    name = f"ps-data-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(128)
    return listener, name


def _shares(sock: socket.socket) -> bool:
    """Whether the weights may be shared with this connection's client: on
    the Unix socket (the same host), where descriptors can pass, and not
    under TLS, whose client asked for every byte to be protected in transit."""
    return sock.family == socket.AF_UNIX and not isinstance(sock, ssl.SSLSocket)


def _peer(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return "a process on this host"
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "a client that left"


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected, or already closed by the peer
        sock.shutdown(socket.SHUT_RDWR)


def _number(code: grpc.StatusCode) -> int:
    return int(code.value[0])
