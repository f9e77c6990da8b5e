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
    """Base class of every error this project raises on purpose; a subclass
    names its status: `class NotFound(PSError, code=Code.NOT_FOUND)`."""

    code: Code = Code.UNKNOWN

    def __init_subclass__(cls, code: Code | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code


class InvalidArgument(PSError, code=Code.INVALID_ARGUMENT):
    """The request is malformed: wrong shape, dtype, value or option."""


class NotFound(PSError, code=Code.NOT_FOUND):
    """The request names a key or optimizer the server does not know."""


class FailedPrecondition(PSError, code=Code.FAILED_PRECONDITION):
    """The request is valid but not now: before Init, or a step ahead."""


class WaitTimeout(PSError, code=Code.DEADLINE_EXCEEDED):
    """A wait (for other workers, initialization, a server) ran out of time."""


class Unavailable(PSError, code=Code.UNAVAILABLE):
    """The server cannot be reached or is shutting down."""


class ResourceExhausted(PSError, code=Code.RESOURCE_EXHAUSTED):
    """The request needs more memory than the server can have."""


class Unauthenticated(PSError, code=Code.UNAUTHENTICATED):
    """The call carried no token, or the wrong one."""


class Unimplemented(PSError, code=Code.UNIMPLEMENTED):
    """The server has no such method."""


class Cancelled(PSError, code=Code.CANCELLED):
    """The caller abandoned the call."""


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
