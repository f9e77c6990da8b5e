"""What PSClient asks of a transport: one server's methods, each with a
deadline, each failing with a PSError whose message names the server.

A transport translates its own failures (gRPC statuses, socket errors, the
data channel's status codes) into PSErrors once, at its edge; the client
never learns which transport carried a call.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from typing import Protocol

from ps_common import wire
from ps_common.assembly import Allocator, OnComplete
from ps_common.errors import Code, error_for
from ps_common.proto import ps_pb2 as pb

__all__ = ["PushCall", "Transport", "failure"]


class PushCall(Protocol):
    """A push in flight."""

    def result(self, timeout: float | None = None) -> pb.PushResponse: ...
    def done(self) -> bool: ...
    def cancel(self) -> bool: ...


class Transport(abc.ABC):
    """One server, reached one way."""

    @abc.abstractmethod
    def hello(self, request: pb.HelloRequest, timeout: float) -> pb.HelloResponse:
        """The handshake, and the heartbeat that says this worker lives."""

    @abc.abstractmethod
    def init(self, frames: Iterator[wire.Frame], timeout: float) -> pb.InitResponse:
        """Worker 0's Init stream."""

    @abc.abstractmethod
    def push(self, frames: Iterable[wire.Frame], timeout: float) -> PushCall:
        """Start pushing `frames` as they are yielded, from another thread."""

    @abc.abstractmethod
    def pull(self, request: pb.PullRequest, timeout: float, into: Allocator, done: OnComplete = None) -> None:
        """Read the answer into the tensors `into` gives (assembly.receive),
        calling `done(key)` as each is whole: here rather than by the caller,
        so that a connection cut off in the middle of a tensor fails with a
        status like any other failure."""

    @abc.abstractmethod
    def stats(self, timeout: float) -> pb.StatsResponse: ...

    @abc.abstractmethod
    def checkpoint(self, timeout: float) -> pb.CheckpointResponse: ...

    @abc.abstractmethod
    def get_state(self, request: pb.StateRequest, timeout: float, into: Allocator, done: OnComplete = None) -> None:
        """The optimizer state of the server's keys, read as `pull` reads weights."""

    @abc.abstractmethod
    def set_state(self, messages: Iterator[pb.SetStateRequest], timeout: float) -> pb.SetStateResponse:
        """Worker 0 sets the optimizer state of the server's keys."""

    @abc.abstractmethod
    def leave(self, request: pb.LeaveRequest, timeout: float) -> None:
        """Tell the server this worker left the job."""

    @abc.abstractmethod
    def close(self) -> None: ...


def failure(where: str, code: int, details: str) -> Exception:
    """The PSError of a failed call to the server at `where`."""
    try:
        name = Code(code).name
    except ValueError:
        name = f"status {code}"
    return error_for(code, f"{where}: {details} ({name})")
