"""The socket transport of the server, the data channel (ps_common.data_channel):
every method of the same ParameterService as the other transport, on a TCP port of its
own (with the same TLS and token), so both transports share every check,
status and counter. A PSError becomes the answer's status here and nowhere
else.

On Linux the same calls are also served on an abstract Unix socket, which
only processes in the server's network namespace can reach: workers on the
server's host (or in its pod) connect there, because a Unix socket moves
bytes on a fraction of loopback TCP's CPU (no TCP segments, acknowledgements
or softirq work), and on a machine whose cores the workers and servers
share, CPU is what a step waits for.

One thread per connection: a worker keeps one connection per concurrent
call, and a waiting pull holds its thread.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

from google.protobuf.message import Message

from ps_common import data_channel, wire
from ps_common.errors import Code, FailedPrecondition, PSError, Unavailable, Unimplemented
from ps_common.proto import ps_pb2 as pb
from ps_server.handler import ParameterService
from ps_server.security import ServerSecurity

__all__ = ["SocketServer"]

log = logging.getLogger(__name__)


class SocketServer:
    """Serves `service` on `host:port` (0: a free port), and on Linux on an
    abstract Unix socket, with `security`, until stop()."""

    def __init__(
        self, service: ParameterService, host: str, port: int, max_connections: int, security: ServerSecurity
    ) -> None:
        self._service = service
        self._security = security
        self._tls = security.tls_context
        # The methods whose request and answer are one message each.
        self._unary: dict[str, tuple[Callable[[Any], Message], Callable[[bytes], Any]]] = {
            "Hello": (service.hello, wire.lenient(pb.HelloRequest)),
            "Stats": (service.stats, wire.lenient(pb.StatsRequest)),
            "Checkpoint": (service.checkpoint, wire.lenient(pb.CheckpointRequest)),
            "Leave": (service.leave, wire.lenient(pb.LeaveRequest)),
        }
        # The methods whose requests are a stream of messages, and how each is read.
        self._client_streams: dict[str, tuple[Callable[[Any], Message], Callable[..., Any]]] = {
            "Init": (service.init, wire.read_init),
            "Push": (service.push, wire.read_push),
            "SetState": (service.set_state, _read_whole(pb.SetStateRequest)),
        }
        self._max_connections = max_connections
        host = host.strip("[]")  # "[::]", as --host may write it
        ipv6 = ":" in host
        self._listener = socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ipv6 else socket.AF_INET,
            dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6(),  # both families on [::]
        )
        self.port: int = self._listener.getsockname()[1]
        self._local_listener, self.socket_name = _local_listener()
        self._connections: set[socket.socket] = set()
        self._busy = 0  # connections in the middle of a call
        self._calls = {"tcp": 0, "unix": 0}  # calls served by socket kind (the metrics read it)
        self._lock = threading.Condition()
        self._stopped = False
        listeners = [self._listener] if self._local_listener is None else [self._listener, self._local_listener]
        self._acceptors = [
            threading.Thread(target=self._accept, args=(listener,), name="ps-data-accept", daemon=True)
            for listener in listeners
        ]

    def calls(self) -> dict[str, int]:
        """Calls served so far, by socket: "tcp" and "unix"."""
        with self._lock:
            return dict(self._calls)

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
            data_channel.write(sock, pb.DataHeader(last=True, code=Code.UNAVAILABLE, details=details))

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
        except PSError as exc:
            self._answer_error(sock, exc)
            return False
        with self._lock:
            if self._stopped:
                self._answer_error(sock, Unavailable("the server is shutting down"))
                return False
            self._busy += 1
            self._calls["unix" if sock.family == socket.AF_UNIX else "tcp"] += 1
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
        deadline = time.monotonic() + header.timeout if header.timeout > 0 else None
        try:
            self._security.check_token(header.auth_token)
            if header.method in self._client_streams:
                method, read = self._client_streams[header.method]
                response: Message = method(self._client_stream(receiver, header, read))
                data_channel.write(sock, pb.DataHeader(last=True), response.SerializeToString())
            elif header.method in ("Pull", "GetState"):
                body = bytes(receiver.read_body(header))
                if header.method == "Pull":
                    request = cast(pb.PullRequest, wire.lenient(pb.PullRequest)(body))
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    answer = self._service.pull(request, remaining, shares=_shares(sock))
                else:
                    answer = self._service.get_state(cast(pb.StateRequest, wire.lenient(pb.StateRequest)(body)))
                for message in answer:
                    data_channel.write(sock, pb.DataHeader(), message)
                data_channel.write(sock, pb.DataHeader(last=True))
            elif header.method in self._unary:
                call, parse = self._unary[header.method]
                response = call(parse(bytes(receiver.read_body(header))))
                data_channel.write(sock, pb.DataHeader(last=True), response.SerializeToString())
            elif header.method == "Share":
                self._share(sock)
            else:
                raise Unimplemented(f"no method {header.method!r} on the data channel")
        except PSError as exc:
            self._answer_error(sock, exc)
            return False
        except (data_channel.Closed, OSError):
            raise  # the connection is gone: nothing to answer
        except Exception as exc:  # a bug: answer UNKNOWN, and keep serving others
            log.exception("data channel %s failed", header.method)
            error = PSError(f"{type(exc).__name__}: {exc}")
            self._answer_error(sock, error)
            return False
        return True

    def _client_stream(
        self, receiver: data_channel.Receiver, header: pb.DataHeader, read: Callable[..., Any]
    ) -> Iterator[Any]:
        """A client stream's messages (until the one marked last); Init's and
        Push's each read from the connection as its chunks are used."""
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
        if not _shares(sock):
            raise FailedPrecondition(_SHARING_RULE)
        fd, size = self._service.share()
        try:
            response = pb.ShareResponse(size=size).SerializeToString()
            data_channel.write(sock, pb.DataHeader(last=True), response, fds=[fd])
        finally:
            os.close(fd)

    @staticmethod
    def _answer_error(sock: socket.socket, error: PSError) -> None:
        """Answer the status, then read what the client still sends (a push
        refused after its first message, say) before the connection closes:
        closing with unread input resets the connection, and the client
        could lose the answer."""
        try:
            data_channel.write(sock, pb.DataHeader(last=True, code=error.code, details=str(error)))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(_DRAIN_SECONDS)
            deadline = time.monotonic() + _DRAIN_SECONDS
            while time.monotonic() < deadline and sock.recv(2**20):
                pass
        except OSError:
            pass  # the client is gone, or too slow to wait for: nothing more to tell


_SHARING_RULE = "this server shares its weights only after Init, on Linux, through its Unix socket without TLS"
_DRAIN_SECONDS = 2.0
_HANDSHAKE_SECONDS = 10.0
_NO_DEADLINE_LIMIT = 600.0  # a call without a deadline (our clients always send one)


def _read_whole(message: type[Message]) -> Callable[[io.BufferedIOBase, int], Any]:
    """A reader of a message of `size` bytes parsed by protobuf (Malformed if it does not parse)."""
    parse = wire.lenient(message)

    def read(stream: io.BufferedIOBase, size: int) -> Any:
        return parse(data_channel.read_exactly(stream, size))

    return read


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
