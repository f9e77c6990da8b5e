"""The ways a worker reaches a server, behind one interface (`Transport`).

- grpc_client: gRPC; every server offers it, and it is how a worker first
  reaches one.
- socket_client: the data channel (TCP, or a Unix socket on the server's
  host, with pulls from shared memory there), which a server announces in
  its Hello; the same calls at a socket's cost.

`connect` gives the transport PSClient holds for a server: the data channel
where the server offers one and the client allows it, else gRPC, found
again after a server restarts elsewhere.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ps_common import wire
from ps_common.assembly import Allocator, OnComplete
from ps_common.proto import ps_pb2 as pb
from ps_worker.links import host_of
from ps_worker.transport.base import PushCall, Transport
from ps_worker.transport.grpc_client import GrpcTransport, open_channel
from ps_worker.transport.security import ClientSecurity
from ps_worker.transport.socket_client import SocketTransport

__all__ = ["HELLO_TIMEOUT", "ClientSecurity", "PushCall", "Transport", "TransportOptions", "connect", "open_channel"]

# The longest a Hello, a heartbeat or a Leave waits: they wait for nobody.
HELLO_TIMEOUT = 5.0


@dataclass(frozen=True)
class TransportOptions:
    """Which transports a client may use (ClientConfig's fields of the same names)."""

    data_channel: bool = True
    data_socket: bool = True
    shared_weights: bool = True


def connect(address: str, security: ClientSecurity, options: TransportOptions, hello: pb.HelloRequest) -> Transport:
    """The transport to the server at `address` ("host:port", or any gRPC
    target; only host:port ones get the data channel)."""
    grpc_transport = GrpcTransport(address, security)
    host = host_of(address) if options.data_channel else None
    if host is None:
        return grpc_transport
    return _Discovered(grpc_transport, host, security, options, hello)


class _Discovered(Transport):
    """The server's data channel, learned from its Hello over gRPC on first
    use and again after the data channel was lost; gRPC where it offers none."""

    def __init__(
        self,
        grpc_transport: GrpcTransport,
        host: str,
        security: ClientSecurity,
        options: TransportOptions,
        hello: pb.HelloRequest,
    ) -> None:
        self._grpc = grpc_transport
        self._host = host
        self._security = security
        self._options = options
        self._hello = hello
        self._current: Transport | None = None
        self._lock = threading.Lock()

    def _transport(self) -> Transport:
        with self._lock:
            current = self._current
            if current is None or (isinstance(current, SocketTransport) and current.lost):
                answer = self._grpc.hello(self._hello, timeout=HELLO_TIMEOUT)  # its failure is the call's
                if current is not None:  # closed aside: a push may still be ending on it
                    threading.Thread(target=current.close, name="ps-retire-transport", daemon=True).start()
                current = self._grpc
                if answer.data_port:
                    current = SocketTransport(
                        self._grpc.address, self._host, answer.data_port,
                        answer.data_socket if self._options.data_socket else "",
                        self._security, self._options.shared_weights,
                    )  # fmt: skip
                self._current = current
            return current

    def hello(self, request: pb.HelloRequest, timeout: float) -> pb.HelloResponse:
        return self._transport().hello(request, timeout)

    def init(self, frames: Iterator[wire.Frame], timeout: float) -> pb.InitResponse:
        return self._transport().init(frames, timeout)

    def push(self, frames: Iterable[wire.Frame], timeout: float) -> PushCall:
        return self._transport().push(frames, timeout)

    def pull(self, request: pb.PullRequest, timeout: float, into: Allocator, done: OnComplete = None) -> None:
        self._transport().pull(request, timeout, into, done)

    def stats(self, timeout: float) -> pb.StatsResponse:
        return self._transport().stats(timeout)

    def checkpoint(self, timeout: float) -> pb.CheckpointResponse:
        return self._transport().checkpoint(timeout)

    def get_state(self, request: pb.StateRequest, timeout: float, into: Allocator, done: OnComplete = None) -> None:
        self._transport().get_state(request, timeout, into, done)

    def set_state(self, messages: Iterator[pb.SetStateRequest], timeout: float) -> pb.SetStateResponse:
        return self._transport().set_state(messages, timeout)

    def leave(self, request: pb.LeaveRequest, timeout: float) -> None:
        self._transport().leave(request, timeout)

    def close(self) -> None:
        with self._lock:
            current, self._current = self._current, None
        if current is not None and current is not self._grpc:
            current.close()
        self._grpc.close()
