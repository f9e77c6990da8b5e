"""The gRPC transport of the client: every method of the service as a gRPC
call on one channel, with the token on every call and TLS where configured.
A failed call's grpc.RpcError becomes a PSError here and nowhere else."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc

from ps_common import assembly, wire
from ps_common.assembly import Allocator, OnComplete
from ps_common.proto import ps_pb2 as pb
from ps_common.security import TOKEN_METADATA_KEY, bearer
from ps_worker.transport.base import PushCall, Transport, failure
from ps_worker.transport.security import ClientSecurity

__all__ = ["GrpcTransport", "open_channel"]

# gRPC's reconnect backoff grows to 120 s by default: far too long to notice
# that a crashed server is back. Retry connecting every 2 s at most.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    pass


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the shared token to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._metadata = (TOKEN_METADATA_KEY, bearer(token))

    def _details(self, details: Any) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._metadata]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)  # fmt: skip

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def open_channel(address: str, security: ClientSecurity) -> grpc.Channel:
    """A channel to `address`, with `security`'s TLS and token."""
    if security.tls_ca is None:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    else:
        ca, key, cert = security.pem()
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        channel = grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    if security.auth_token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(security.auth_token))
    return channel


def _decode_pull(data: bytes) -> wire.Frame:
    return wire.decode_pull_strict(data)


class _Push:
    """A gRPC push future whose failure is a PSError."""

    def __init__(self, transport: GrpcTransport, future: Any) -> None:
        self._transport = transport
        self._future = future

    def result(self, timeout: float | None = None) -> pb.PushResponse:
        response: pb.PushResponse = self._transport.translated(lambda: self._future.result(timeout))
        return response

    def done(self) -> bool:
        return bool(self._future.done())

    def cancel(self) -> bool:
        return bool(self._future.cancel())


class GrpcTransport(Transport):
    """The server at `address`, over gRPC."""

    def __init__(self, address: str, security: ClientSecurity) -> None:
        self.address = address
        self._channel = open_channel(address, security)
        prefix = f"/{wire.SERVICE}/"
        channel = self._channel
        self._hello = channel.unary_unary(prefix + "Hello", pb.HelloRequest.SerializeToString,
                                          pb.HelloResponse.FromString)  # fmt: skip
        self._init = channel.stream_unary(prefix + "Init", wire.encode_request, pb.InitResponse.FromString)
        self._push = channel.stream_unary(prefix + "Push", wire.encode_request, pb.PushResponse.FromString)
        self._pull = channel.unary_stream(prefix + "Pull", pb.PullRequest.SerializeToString, _decode_pull)
        self._stats = channel.unary_unary(prefix + "Stats", pb.StatsRequest.SerializeToString,
                                          pb.StatsResponse.FromString)  # fmt: skip
        self._checkpoint = channel.unary_unary(prefix + "Checkpoint", pb.CheckpointRequest.SerializeToString,
                                               pb.CheckpointResponse.FromString)  # fmt: skip
        self._get_state = channel.unary_stream(prefix + "GetState", pb.StateRequest.SerializeToString, _decode_pull)
        self._set_state = channel.stream_unary(prefix + "SetState", pb.SetStateRequest.SerializeToString,
                                               pb.SetStateResponse.FromString)  # fmt: skip
        self._leave = channel.unary_unary(prefix + "Leave", pb.LeaveRequest.SerializeToString,
                                          pb.LeaveResponse.FromString)  # fmt: skip

    def translated(self, call: Callable[[], Any]) -> Any:
        """`call()`, its grpc.RpcError raised as the matching PSError."""
        try:
            return call()
        except grpc.RpcError as exc:
            raise failure(self.address, exc.code().value[0], exc.details()) from None
        except (grpc.FutureCancelledError, futures.CancelledError):
            raise failure(self.address, grpc.StatusCode.CANCELLED.value[0], "push cancelled") from None

    def hello(self, request: pb.HelloRequest, timeout: float) -> pb.HelloResponse:
        response: pb.HelloResponse = self.translated(lambda: self._hello(request, timeout=timeout))
        return response

    def init(self, frames: Iterator[wire.Frame], timeout: float) -> pb.InitResponse:
        response: pb.InitResponse = self.translated(lambda: self._init(frames, timeout=timeout))
        return response

    def push(self, frames: Iterable[wire.Frame], timeout: float) -> PushCall:
        return _Push(self, self._push.future(iter(frames), timeout=timeout))

    def pull(self, request: pb.PullRequest, timeout: float, into: Allocator, done: OnComplete = None) -> None:
        self.translated(lambda: assembly.receive(self._pull(request, timeout=timeout), into, done))

    def stats(self, timeout: float) -> pb.StatsResponse:
        response: pb.StatsResponse = self.translated(lambda: self._stats(pb.StatsRequest(), timeout=timeout))
        return response

    def checkpoint(self, timeout: float) -> pb.CheckpointResponse:
        response: pb.CheckpointResponse = self.translated(
            lambda: self._checkpoint(pb.CheckpointRequest(), timeout=timeout)
        )
        return response

    def get_state(self, request: pb.StateRequest, timeout: float, into: Allocator, done: OnComplete = None) -> None:
        self.translated(lambda: assembly.receive(self._get_state(request, timeout=timeout), into, done))

    def set_state(self, messages: Iterator[pb.SetStateRequest], timeout: float) -> pb.SetStateResponse:
        response: pb.SetStateResponse = self.translated(lambda: self._set_state(messages, timeout=timeout))
        return response

    def leave(self, request: pb.LeaveRequest, timeout: float) -> None:
        self.translated(lambda: self._leave(request, timeout=timeout))

    def close(self) -> None:
        self._channel.close()
