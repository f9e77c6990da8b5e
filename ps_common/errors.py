"""Typed errors and the status codes they travel as, whatever the transport.

The server's core raises them; each transport turns one into its own status
once, at its edge (gRPC's status code, the data channel's header code), and
the client's transport turns a failed call back into the same type, so both
sides speak the same errors. The codes' numbers are gRPC's, so one number
means the same on every transport.
"""

from __future__ import annotations

import enum

__all__ = [
    "Cancelled",
    "Code",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PSError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WaitTimeout",
    "error_for",
]


class Code(enum.IntEnum):
    """A call's status (the numbers and names of gRPC's status codes)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class PSError(Exception):
    """Base class of every error this project raises on purpose."""

    code: Code = Code.UNKNOWN


class InvalidArgument(PSError):
    """The request is malformed: wrong shape, dtype, value or option."""

    code = Code.INVALID_ARGUMENT


class NotFound(PSError):
    """The request names a key or optimizer the server does not know."""

    code = Code.NOT_FOUND


class FailedPrecondition(PSError):
    """The request is valid but not now: before Init, or a step ahead."""

    code = Code.FAILED_PRECONDITION


class WaitTimeout(PSError):
    """A wait (for other workers, initialization, a server) ran out of time."""

    code = Code.DEADLINE_EXCEEDED


class Unavailable(PSError):
    """The server cannot be reached or is shutting down."""

    code = Code.UNAVAILABLE


class ResourceExhausted(PSError):
    """The request needs more memory than the server can have."""

    code = Code.RESOURCE_EXHAUSTED


class Unauthenticated(PSError):
    """The call carried no token, or the wrong one."""

    code = Code.UNAUTHENTICATED


class Unimplemented(PSError):
    """The server has no such method."""

    code = Code.UNIMPLEMENTED


class Cancelled(PSError):
    """The caller abandoned the call."""

    code = Code.CANCELLED


_BY_CODE: dict[Code, type[PSError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, FailedPrecondition, WaitTimeout, Unavailable, ResourceExhausted,
        Unauthenticated, Unimplemented, Cancelled,
    )
}  # fmt: skip


def error_for(code: int, message: str) -> PSError:
    """The typed error for a status `code` (any number: an unknown one is UNKNOWN)."""
    try:
        status = Code(code)
    except ValueError:
        status = Code.UNKNOWN
    cls = _BY_CODE.get(status)
    if cls is not None:
        return cls(message)
    error = PSError(message)
    error.code = status
    return error
