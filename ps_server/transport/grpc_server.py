"""The gRPC transport of the server: ParameterService's methods as gRPC
methods, with the standard health and reflection services beside them.

Requests are decoded here (Init and Push as Frames read without copying
tensor bytes, everything else by protobuf, leniently: bytes that do not
parse reach the service as Malformed and are refused with
INVALID_ARGUMENT rather than gRPC's INTERNAL). A PSError becomes the
call's status here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ps_common import wire
from ps_common.errors import PSError
from ps_common.proto import ps_pb2 as pb
from ps_common.security import TOKEN_METADATA_KEY, bearer
from ps_server.handler import ParameterService
from ps_server.security import ServerSecurity

__all__ = ["GrpcServer"]

T = TypeVar("T")

# Probes (Kubernetes, docker healthchecks) cannot present a token.
_OPEN_METHODS = ("/grpc.health.v1.Health/",)
_STATUS = {code.value[0]: code for code in grpc.StatusCode}


def _abort(context: grpc.ServicerContext, error: PSError) -> None:
    context.abort(_STATUS[int(error.code)], str(error))


class _Servicer:
    """Each gRPC method calls the service's and translates its PSError."""

    def __init__(self, service: ParameterService) -> None:
        self._service = service

    def _unary(self, context: grpc.ServicerContext, call: Callable[[], T]) -> T:
        try:
            return call()
        except PSError as exc:
            _abort(context, exc)
            raise  # abort raises; this line is for the type checker

    def Hello(self, request: Any, context: grpc.ServicerContext) -> pb.HelloResponse:
        return self._unary(context, lambda: self._service.hello(request))

    def Init(self, requests: Iterator[Any], context: grpc.ServicerContext) -> pb.InitResponse:
        return self._unary(context, lambda: self._service.init(requests))

    def Push(self, requests: Iterator[Any], context: grpc.ServicerContext) -> pb.PushResponse:
        return self._unary(context, lambda: self._service.push(requests))

    def _streamed(self, context: grpc.ServicerContext, messages: Iterator[list[Any]]) -> Iterator[bytes]:
        """Each message of an answer stream, joined from its pieces."""
        try:
            for parts in messages:
                yield b"".join(parts)
        except PSError as exc:
            _abort(context, exc)

    def Pull(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        return self._streamed(context, self._service.pull(request, context.time_remaining()))

    def Stats(self, request: Any, context: grpc.ServicerContext) -> pb.StatsResponse:
        return self._unary(context, lambda: self._service.stats(request))

    def Checkpoint(self, request: Any, context: grpc.ServicerContext) -> pb.CheckpointResponse:
        return self._unary(context, lambda: self._service.checkpoint(request))

    def Leave(self, request: Any, context: grpc.ServicerContext) -> pb.LeaveResponse:
        return self._unary(context, lambda: self._service.leave(request))

    def GetState(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        return self._streamed(context, self._service.get_state(request))

    def SetState(self, requests: Iterator[Any], context: grpc.ServicerContext) -> pb.SetStateResponse:
        return self._unary(context, lambda: self._service.set_state(requests))


def _handlers(servicer: _Servicer) -> dict[str, grpc.RpcMethodHandler]:
    """Every method of the proto's service, checked to have a handler."""
    handlers = {
        "Hello": grpc.unary_unary_rpc_method_handler(
            servicer.Hello, wire.lenient(pb.HelloRequest), pb.HelloResponse.SerializeToString
        ),
        "Init": grpc.stream_unary_rpc_method_handler(
            servicer.Init, wire.decode_init, pb.InitResponse.SerializeToString
        ),
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, wire.decode_push, pb.PushResponse.SerializeToString
        ),
        # The service serializes its answers itself (wire.pull_parts).
        "Pull": grpc.unary_stream_rpc_method_handler(servicer.Pull, wire.lenient(pb.PullRequest), None),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, wire.lenient(pb.StatsRequest), pb.StatsResponse.SerializeToString
        ),
        "Checkpoint": grpc.unary_unary_rpc_method_handler(
            servicer.Checkpoint, wire.lenient(pb.CheckpointRequest), pb.CheckpointResponse.SerializeToString
        ),
        "GetState": grpc.unary_stream_rpc_method_handler(servicer.GetState, wire.lenient(pb.StateRequest), None),
        "SetState": grpc.stream_unary_rpc_method_handler(
            servicer.SetState, wire.lenient(pb.SetStateRequest), pb.SetStateResponse.SerializeToString
        ),
        "Leave": grpc.unary_unary_rpc_method_handler(
            servicer.Leave, wire.lenient(pb.LeaveRequest), pb.LeaveResponse.SerializeToString
        ),
    }
    missing = set(wire.METHODS) - set(handlers)
    if missing:
        raise RuntimeError(f"proto methods without a gRPC handler: {sorted(missing)}")
    return handlers


class _TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Answer UNAUTHENTICATED unless the call carries the shared token."""

    def __init__(self, security: ServerSecurity) -> None:
        self._security = security

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(_OPEN_METHODS):
            return continuation(details)
        presented = dict(details.invocation_metadata).get(TOKEN_METADATA_KEY, "")
        if isinstance(presented, bytes):
            presented = presented.decode(errors="replace")
        prefix = bearer("")
        try:
            self._security.check_token(presented[len(prefix) :] if presented.startswith(prefix) else "\0")
        except PSError as exc:
            return _refusal(continuation(details), exc)
        return continuation(details)


def _refusal(handler: grpc.RpcMethodHandler | None, error: PSError) -> grpc.RpcMethodHandler | None:
    """A handler of the same streaming kind that only answers `error`."""
    if handler is None:
        return None

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        _abort(context, error)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class GrpcServer:
    """Serves `service` on `host:port` (0: a free one) with `security`;
    health reports NOT_SERVING until `serving()`."""

    def __init__(self, service: ParameterService, host: str, port: int, threads: int, security: ServerSecurity) -> None:
        self._executor = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ps-server")
        interceptors = [_TokenInterceptor(security)] if security.requires_token else []
        self._server = grpc.server(self._executor, interceptors=interceptors)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(wire.SERVICE, _handlers(_Servicer(service))),)
        )
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection([wire.SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)
        bind = f"{host}:{port}"
        tls = security.tls
        if tls is None:
            self.port = self._server.add_insecure_port(bind)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key, tls.cert)], root_certificates=tls.client_ca, require_client_auth=tls.client_ca is not None
            )
            self.port = self._server.add_secure_port(bind, credentials)
        if self.port == 0:
            self._executor.shutdown()
            raise OSError(f"could not bind {bind}")
        self._server.start()

    def serving(self) -> None:
        """Health: SERVING, for the server as a whole and for the service."""
        for service in ("", wire.SERVICE):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def health(self, service: str = "") -> str:
        """What the health service answers for `service` now: SERVING, NOT_SERVING..."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), None)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def stop_serving(self) -> None:
        """Health: NOT_SERVING, while calls in flight finish."""
        self._health.enter_graceful_shutdown()

    def stop(self, grace: float | None) -> None:
        self._server.stop(grace).wait()
        self._executor.shutdown(wait=True)
