"""The gRPC face of a shard: decodes requests, calls the Shard, encodes
answers, and turns our typed errors into gRPC status codes."""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from ps_common import PROTOCOL_VERSION, codec, wire
from ps_common.errors import FailedPrecondition, InvalidArgument, PSError
from ps_common.proto import ps_pb2 as pb
from ps_common.proto import ps_pb2_grpc
from ps_server.checkpointer import Checkpointer
from ps_server.config import ServerConfig
from ps_server.data_server import DataServer
from ps_server.metrics import ServerMetrics
from ps_server.optimizer import warm_up
from ps_server.security import TokenInterceptor, credentials, tls_context
from ps_server.shard import Gradient, PulledKey, Shard

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# What a PullRequest's dtype may ask for. Not fp16: a weight beyond its range
# would arrive as Inf.
_PULL_DTYPES = {pb.DTYPE_UNSPECIFIED: None, pb.BFLOAT16: torch.bfloat16}


def _status_errors(method: F) -> F:
    """Answer a PSError with its status code and message instead of UNKNOWN,
    and a request that did not parse with INVALID_ARGUMENT."""

    @functools.wraps(method)
    def unary(self: ParameterService, request: Any, context: grpc.ServicerContext, **options: Any) -> Any:
        try:
            return method(self, _parsed(request), context, **options)
        except PSError as exc:
            self.reject(exc, context)

    @functools.wraps(method)
    def streaming(self: ParameterService, request: Any, context: grpc.ServicerContext, **options: Any) -> Any:
        try:
            yield from method(self, _parsed(request), context, **options)
        except PSError as exc:
            self.reject(exc, context)

    return streaming if inspect.isgeneratorfunction(method) else unary  # type: ignore[return-value]


def _check_protocol(version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise InvalidArgument(f"client speaks protocol version {version}, this server speaks {PROTOCOL_VERSION}")


def _parsed(request: T | wire.Malformed) -> T:
    """The request, unless it did not parse. (A client stream's iterator
    passes through; its messages are checked here one by one as read.)"""
    if isinstance(request, wire.Malformed):
        raise InvalidArgument(request.reason)
    return request


def _split_stream(requests: Iterator[wire.Frame | wire.Malformed], what: str) -> tuple[Any, Iterator[wire.Frame]]:
    """The header of a client stream's first message, and every message."""
    first = next(requests, None)
    frame = None if first is None else _parsed(first)
    if frame is None or frame.header is None:
        raise InvalidArgument(f"the first {what} message must carry the header")
    return frame.header, itertools.chain([frame], map(_parsed, requests))


def _assemble(messages: Iterator[wire.Frame], assembler: codec.ChunkAssembler) -> None:
    for index, message in enumerate(messages):
        if index and message.header is not None:
            raise InvalidArgument("only the first message of a stream may carry a header")
        for chunk in message.chunks:
            assembler.add(chunk)


class ParameterService(ps_pb2_grpc.ParameterServerServicer):
    def __init__(self, shard: Shard, config: ServerConfig, checkpointer: Checkpointer | None) -> None:
        self.shard = shard
        self.config = config
        self.checkpointer = checkpointer
        self.data_port = 0  # announced in Hello once the data channel is up
        self.data_socket = ""  # likewise

    def reject(self, error: PSError, context: grpc.ServicerContext) -> None:
        """Count the refusal by status and end the call with it."""
        self.shard.count(f"rejected_{error.code.name.lower()}", 1)
        context.abort(error.code, str(error))

    @_status_errors
    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloResponse:
        _check_protocol(request.protocol_version)
        job, clock = self.shard.hello(request.worker_id, request.num_workers)
        return pb.HelloResponse(
            protocol_version=PROTOCOL_VERSION, initialized=job is not None, job=job, clock=clock,
            data_port=self.data_port, data_socket=self.data_socket,
        )  # fmt: skip

    @_status_errors
    def Init(self, requests: Iterator[wire.Frame | wire.Malformed], context: grpc.ServicerContext) -> pb.InitResponse:
        header, messages = _split_stream(requests, "Init")
        _check_protocol(header.protocol_version)
        if header.worker_id != 0:
            raise InvalidArgument(f"only worker 0 initializes the job, not worker {header.worker_id}")
        assembler = codec.ChunkAssembler(self.shard.init_allocator(header.job))
        _assemble(messages, assembler)
        already = self.shard.init(header.job, assembler.finish())
        return pb.InitResponse(already_initialized=already)

    @_status_errors
    def Push(self, requests: Iterator[wire.Frame | wire.Malformed], context: grpc.ServicerContext) -> pb.PushResponse:
        return self._push(requests)

    @_status_errors
    def PushOne(self, request: wire.Frame, context: grpc.ServicerContext) -> pb.PushResponse:
        return self._push(iter([request]))

    def _push(self, requests: Iterator[wire.Frame | wire.Malformed]) -> pb.PushResponse:
        header, messages = _split_stream(requests, "Push")
        assembler = codec.ChunkAssembler(self.shard.push_allocator, keep_sparse=self.shard.push_layout)
        _assemble(messages, assembler)
        grads: dict[str, Gradient] = {**assembler.finish(), **assembler.sparse}
        accepted, duplicates = self.shard.push(
            header.worker_id, header.step, header.groups, grads, assembler.absent, header.prune_thresholds
        )
        return pb.PushResponse(accepted=accepted, duplicates=duplicates)

    @_status_errors
    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        for parts in self._pull(request, context, self.config.chunk_bytes):
            yield b"".join(parts)

    @_status_errors
    def pull_parts(
        self, request: pb.PullRequest, context: grpc.ServicerContext, shares: bool = False
    ) -> Iterator[list[Any]]:
        """Pull's answer for a transport that writes each message from its
        pieces without joining them (the data channel's gather write).
        `shares`: the transport is one on which the server shares its
        weights (the Unix socket), so `request.shared` is honoured."""
        yield from self._pull(request, context, self.config.chunk_bytes, shared=shares and request.shared)

    @_status_errors
    def PullOne(self, request: pb.PullRequest, context: grpc.ServicerContext) -> bytes:
        # One message: the limit is gRPC's message size, not --chunk-bytes.
        # A second message is enough to refuse; serializing the rest would be wasted.
        # Each joined as it comes: its pieces are valid only until the next is made.
        pulled = self._pull(request, context, codec.DEFAULT_CHUNK_BYTES, together=True)
        messages = [b"".join(parts) for parts in itertools.islice(pulled, 2)]
        if len(messages) > 1:
            raise InvalidArgument("the answer takes more than one message; use Pull for keys this large")
        return messages[0] if messages else b""

    def _pull(
        self,
        request: pb.PullRequest,
        context: grpc.ServicerContext,
        chunk_bytes: int,
        together: bool = False,
        shared: bool = False,
    ) -> Iterator[list[Any]]:
        """The serialized PullResponses answering `request` (at most `chunk_bytes`
        of tensor data each), as its keys become readable (`together`: once
        all are, in as few messages as fit); each as its pieces, which are
        views of the live weights where those hold still (BSP), and valid
        until the next message is asked for or the answer is closed.
        `shared`: the client maps the shard's shared weights; where they hold
        still, keys are answered with their place in them instead of bytes."""
        limits = [self.config.max_wait]
        if request.wait_seconds > 0:
            limits.append(request.wait_seconds)
        remaining = context.time_remaining()
        if remaining is not None:
            limits.append(max(0.0, remaining - 0.05))
        timeout = min(limits)
        if request.dtype not in _PULL_DTYPES:
            raise InvalidArgument(
                f"pull dtype must be DTYPE_UNSPECIFIED (as stored) or BFLOAT16, got code {request.dtype}"
            )
        cast_to = _PULL_DTYPES[request.dtype]
        hold_still = self.shard.values_hold_still()
        shared = shared and hold_still
        cache = hold_still and not request.masks  # half-precision casts shared by the workers
        sent = shared_bytes = 0
        # Keys go out in the batches the shard makes them readable (BSP: as
        # their steps complete), each batch in messages of its own, so that
        # no message waits for a key that is not ready.
        readable = self.shard.pull(
            request.worker_id, request.step, request.keys, request.wait_for_all_workers, timeout, request.masks
        )
        if together:
            readable = iter([[item for ready in readable for item in ready]])
        for ready in readable:
            chunks = (chunk for item in ready for chunk in self._chunks_of(item, chunk_bytes, cast_to, shared, cache))
            batches = codec.batched(chunks, chunk_bytes)
            while True:
                # Chunks are views of the live weights. Where an update may come
                # meanwhile, each message is copied under the lock, so it is one
                # consistent copy; elsewhere the views go out as they are.
                copy = None
                with self.shard.reading():
                    batch = next(batches, None)
                    if batch is None:
                        break
                    parts = wire.pull_parts(wire.Frame(chunks=batch))
                    if not hold_still:
                        copy = self.shard.buffers.joined(parts)
                        parts = [copy.numpy()]
                sent += sum(len(c.data) + len(c.indices) for c in batch)
                shared_bytes += sum(c.shared[1] for c in batch if c.shared is not None)
                try:
                    yield parts
                finally:
                    if copy is not None:
                        self.shard.buffers.give([copy])
        self.shard.count("bytes_out", sent)
        self.shard.count("bytes_shared", shared_bytes)

    def _chunks_of(
        self, item: PulledKey, chunk_bytes: int, cast_to: torch.dtype | None, shared: bool, cache: bool
    ) -> Iterable[codec.Chunk]:
        """A pulled key's chunks: its place in the shared weights where the
        client may read them there (as stored: a client that asked for half
        precision casts them itself), else its bytes; `cache`: cast as the
        shard keeps them for every worker (Shard.pulled_as)."""
        where = self.shard.shared.range_of(item.value) if shared and self.shard.shared is not None else None
        if where is None:
            if cache and cast_to is not None:
                return codec.tensor_to_chunks(item.key, self.shard.pulled_as(item, cast_to), chunk_bytes, item.sparse)
            return codec.tensor_to_chunks(item.key, item.value, chunk_bytes, item.sparse, cast_to)
        dtype = codec.dtype_to_proto(item.value.dtype)
        return [codec.Chunk(key=item.key, dtype=dtype, shape=list(item.value.shape), shared=where)]

    @_status_errors
    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointResponse:
        if self.checkpointer is None:
            raise FailedPrecondition("this server has no checkpoint directory (--checkpoint-dir)")
        path, version = self.checkpointer.write_now()
        return pb.CheckpointResponse(path=str(path), version=version)

    @_status_errors
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return self.shard.stats()


@dataclass
class RunningServer:
    """A started server; `stop()` shuts it down and frees its ports and threads."""

    server: grpc.Server
    shard: Shard
    service: ParameterService
    health: health.HealthServicer
    port: int
    address: str
    metrics_port: int | None
    checkpointer: Checkpointer | None
    _executor: futures.ThreadPoolExecutor
    _metrics_http: Any = None
    data_server: DataServer | None = None

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, wake waiting pulls, give in-flight calls `grace`
        seconds, then write a last checkpoint."""
        self.health.enter_graceful_shutdown()
        self.shard.close()
        if self.data_server is not None:
            self.data_server.stop(grace)
        self.server.stop(grace).wait()
        self._executor.shutdown(wait=True)
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


def start_server(config: ServerConfig) -> RunningServer:
    """Bind, start serving and return at once; health reports SERVING when ready."""
    metrics = ServerMetrics()
    shard = Shard(config.wait_log_interval, metrics, config.worker_timeout, config.fused_updates)
    metrics.watch(shard)
    checkpointer = None
    if config.checkpoint_dir:
        checkpointer = Checkpointer(
            shard, Path(config.checkpoint_dir), config.checkpoint_every_updates,
            config.checkpoint_every_seconds, config.checkpoint_keep,
        )  # fmt: skip
        checkpointer.restore()
    executor = futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="ps-server")
    interceptors = [TokenInterceptor(config.auth_token)] if config.auth_token else []
    server = grpc.server(executor, interceptors=interceptors)
    servicer = ParameterService(shard, config, checkpointer)
    wire.add_servicer(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([wire.SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    server_credentials = credentials(config)
    bind = f"{config.host}:{config.port}"
    port = server.add_secure_port(bind, server_credentials) if server_credentials else server.add_insecure_port(bind)
    if port == 0:
        executor.shutdown()
        raise OSError(f"could not bind {config.host}:{config.port}")
    server.start()
    data_server = _start_data_channel(servicer, config)
    metrics_http = None
    metrics_port = None
    if config.metrics_port is not None:
        metrics_http, _ = start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
        metrics_port = int(metrics_http.server_port)
    if checkpointer is not None:
        checkpointer.start()
    warm_up()
    # Only now is the shard ready (restored, if there was a checkpoint).
    for service in ("", wire.SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    address = f"{config.host}:{port}"
    log.info(
        "parameter server listening on %s%s%s%s", address,
        f", data channel on :{data_server.port}" if data_server else "",
        f" and on Unix socket @{data_server.socket_name}" if data_server and data_server.socket_name else "",
        f", metrics on :{metrics_port}" if metrics_port else "",
    )  # fmt: skip
    return RunningServer(
        server, shard, servicer, health_servicer, port, address, metrics_port, checkpointer, executor, metrics_http,
        data_server,
    )  # fmt: skip


def _start_data_channel(service: ParameterService, config: ServerConfig) -> DataServer | None:
    """The data channel for Init, Push and Pull (TLS as gRPC's), unless turned off."""
    if not config.data_channel:
        return None
    # A worker holds one or two connections per server, idle between calls:
    # the cap is for runaway clients, not for handler threads as --threads is.
    data_server = DataServer(
        service, config.host, config.data_port, config.auth_token, 16 * config.threads, tls_context(config)
    )
    data_server.start()
    service.data_port, service.data_socket = data_server.port, data_server.socket_name
    return data_server
