"""Typed errors, one per gRPC status code we use.

The server raises them from its core logic and the service turns them into
the matching status; the client turns a failed call back into the same type,
so both sides speak the same errors.
"""

from __future__ import annotations

import grpc


class PSError(Exception):
    """Base class of every error this project raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(PSError):
    """The request is malformed: wrong shape, dtype, value or option."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PSError):
    """The request names a key or optimizer the server does not know."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(PSError):
    """The request is valid but not now: before Init, or a step ahead."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class WaitTimeout(PSError):
    """A wait (for other workers, initialization, a server) ran out of time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(PSError):
    """The server cannot be reached or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(PSError):
    """The request needs more memory than the server can have."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_BY_CODE = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, FailedPrecondition, WaitTimeout, Unavailable, ResourceExhausted)
}


def from_rpc_error(error: grpc.RpcError, where: str) -> PSError:
    """The typed error for a failed call; `where` names the server or call."""
    code = error.code()
    details = error.details()
    cls = _BY_CODE.get(code, PSError)
    return cls(f"{where}: {details} ({code.name})")
