"""The service logic of one server, whatever transport carried the call.

Each method takes a decoded request (or a `wire.Malformed` where the bytes
did not parse) and returns its answer or raises a PSError; each transport
(ps_server.transport) adapts its bytes to these methods and turns a PSError
into its own status once, at its edge. A refusal is counted here, by status,
so that every transport's refusals show in the metrics alike.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

from ps_common import PROTOCOL_VERSION, assembly, codec, wire
from ps_common.errors import FailedPrecondition, InvalidArgument, PSError, Unavailable
from ps_common.proto import ps_pb2 as pb
from ps_server.checkpointer import Checkpointer
from ps_server.config import ServerConfig
from ps_server.shard import Gradient, PulledKey, Shard

__all__ = ["ParameterService"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# What a PullRequest's dtype may ask for. Not fp16: a weight beyond its range
# would arrive as Inf.
_PULL_DTYPES = {pb.DTYPE_UNSPECIFIED: None, pb.BFLOAT16: torch.bfloat16}
# Left of a call's deadline for sending the answer after a pull's wait.
_TRANSFER_MARGIN = 0.05


def _counted(method: F) -> F:
    """Count a refusal by its status before the transport answers it."""

    @functools.wraps(method)
    def unary(self: ParameterService, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except PSError as exc:
            self.shard.count(f"rejected_{exc.code.name.lower()}", 1)
            raise

    @functools.wraps(method)
    def streaming(self: ParameterService, *args: Any, **kwargs: Any) -> Any:
        try:
            yield from method(self, *args, **kwargs)
        except PSError as exc:
            self.shard.count(f"rejected_{exc.code.name.lower()}", 1)
            raise

    return streaming if inspect.isgeneratorfunction(method) else unary  # type: ignore[return-value]


def _check_protocol(version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise InvalidArgument(f"client speaks protocol version {version}, this server speaks {PROTOCOL_VERSION}")


def _parsed(request: T | wire.Malformed) -> T:
    """The request, unless it did not parse."""
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


def _assemble(messages: Iterator[wire.Frame], assembler: assembly.ChunkAssembler) -> None:
    for index, message in enumerate(messages):
        if index and message.header is not None:
            raise InvalidArgument("only the first message of a stream may carry a header")
        for chunk in message.chunks:
            assembler.add(chunk)


class ParameterService:
    """One server's methods, over `shard`; `data_port` and `data_socket`
    are announced in Hello once the data channel is up."""

    def __init__(self, shard: Shard, config: ServerConfig, checkpointer: Checkpointer | None) -> None:
        self.shard = shard
        self.config = config
        self.checkpointer = checkpointer
        self.data_port = 0
        self.data_socket = ""

    @_counted
    def hello(self, request: pb.HelloRequest | wire.Malformed) -> pb.HelloResponse:
        request = _parsed(request)
        _check_protocol(request.protocol_version)
        job, clock = self.shard.hello(request.worker_id, request.num_workers)
        return pb.HelloResponse(
            protocol_version=PROTOCOL_VERSION, initialized=job is not None, job=job, clock=clock,
            data_port=self.data_port, data_socket=self.data_socket,
        )  # fmt: skip

    @_counted
    def init(self, requests: Iterator[wire.Frame | wire.Malformed]) -> pb.InitResponse:
        header, messages = _split_stream(requests, "Init")
        _check_protocol(header.protocol_version)
        if header.worker_id != 0:
            raise InvalidArgument(f"only worker 0 initializes the job, not worker {header.worker_id}")
        assembler = assembly.ChunkAssembler(self.shard.init_allocator(header.job))
        _assemble(messages, assembler)
        already = self.shard.init(header.job, assembler.finish())
        return pb.InitResponse(already_initialized=already)

    @_counted
    def push(self, requests: Iterator[wire.Frame | wire.Malformed]) -> pb.PushResponse:
        header, messages = _split_stream(requests, "Push")
        assembler = assembly.ChunkAssembler(self.shard.push_allocator, keep_sparse=self.shard.push_layout)
        _assemble(messages, assembler)
        grads: dict[str, Gradient] = {**assembler.finish(), **assembler.sparse}
        accepted, duplicates = self.shard.push(
            header.worker_id, header.step, header.groups, grads, assembler.absent, header.prune_thresholds
        )
        return pb.PushResponse(accepted=accepted, duplicates=duplicates)

    @_counted
    def pull(
        self, request: pb.PullRequest | wire.Malformed, time_remaining: float | None, shares: bool = False
    ) -> Iterator[list[Any]]:
        """The serialized PullResponses answering `request` (at most
        `chunk_bytes` of tensor data each), as its keys become readable; each
        as its pieces, which are views of the live weights where those hold
        still (BSP), valid until the next message is asked for or the answer
        is closed. `time_remaining`: of the call's deadline (None: none).
        `shares`: the transport is one on which the server shares its weights
        (the Unix socket), so `request.shared` is honoured: where they hold
        still, keys are answered with their place in them instead of bytes."""
        request = _parsed(request)
        chunk_bytes = self.config.chunk_bytes
        limits = [self.config.max_wait]
        if request.wait_seconds > 0:
            limits.append(request.wait_seconds)
        if time_remaining is not None:
            limits.append(max(0.0, time_remaining - _TRANSFER_MARGIN))
        if request.dtype not in _PULL_DTYPES:
            raise InvalidArgument(
                f"pull dtype must be DTYPE_UNSPECIFIED (as stored) or BFLOAT16, got code {request.dtype}"
            )
        cast_to = _PULL_DTYPES[request.dtype]
        hold_still = self.shard.values_hold_still()
        shared = shares and request.shared and hold_still
        cache = hold_still and not request.masks  # half-precision casts shared by the workers
        sent = shared_bytes = 0
        # Keys go out in the batches the shard makes them readable (BSP: as
        # their steps complete), each batch in messages of its own, so that
        # no message waits for a key that is not ready.
        readable = self.shard.pull(
            request.worker_id, request.step, request.keys, request.wait_for_all_workers, min(limits), request.masks
        )
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

    @_counted
    def checkpoint(self, request: pb.CheckpointRequest | wire.Malformed) -> pb.CheckpointResponse:
        _parsed(request)
        if self.checkpointer is None:
            raise FailedPrecondition("this server has no checkpoint directory (--checkpoint-dir)")
        path, version = self.checkpointer.write_now()
        return pb.CheckpointResponse(path=str(path), version=version)

    @_counted
    def get_state(self, request: pb.StateRequest | wire.Malformed) -> Iterator[list[Any]]:
        """The optimizer state of every key (Shard.get_state) as serialized
        PullResponses, each as its pieces."""
        state = self.shard.get_state(_parsed(request).worker_id)
        chunk_bytes = self.config.chunk_bytes
        chunks = (chunk for name, value in state for chunk in codec.tensor_to_chunks(name, value, chunk_bytes))
        for batch in codec.batched(chunks, chunk_bytes):
            yield wire.pull_parts(wire.Frame(chunks=batch))

    @_counted
    def set_state(self, requests: Iterator[pb.SetStateRequest | wire.Malformed]) -> pb.SetStateResponse:
        first = None
        assembler = assembly.ChunkAssembler(assembly.new_tensor_for)
        for request in map(_parsed, requests):
            if first is not None and (request.worker_id, request.check_only) != (first.worker_id, first.check_only):
                raise InvalidArgument("every SetState message must name the same worker and check_only")
            first = first or request
            for chunk in request.chunks:
                assembler.add(chunk)
        if first is None:
            raise InvalidArgument("SetState carried no message")
        keys = self.shard.set_state(first.worker_id, assembler.finish(), check_only=first.check_only)
        return pb.SetStateResponse(keys=keys)

    @_counted
    def leave(self, request: pb.LeaveRequest | wire.Malformed) -> pb.LeaveResponse:
        self.shard.leave(_parsed(request).worker_id)
        return pb.LeaveResponse()

    @_counted
    def stats(self, request: pb.StatsRequest | wire.Malformed) -> pb.StatsResponse:
        _parsed(request)
        return self.shard.stats()

    @_counted
    def share(self) -> tuple[int, int]:
        """A read-only descriptor of the shard's shared weights (the caller
        closes it) and their size in bytes (ps_server.shared_weights)."""
        shared = self.shard.shared
        if shared is None:
            raise FailedPrecondition("this server shares its weights only once a job is initialized")
        try:
            return shared.readonly_fd(), shared.size
        except OSError as exc:  # closed: the server is stopping
            raise Unavailable(f"shared weights unavailable: {exc}") from None
