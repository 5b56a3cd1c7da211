"""Domain errors → gRPC status codes: the one place this mapping lives."""

from __future__ import annotations

import logging

import grpc

from loramux import errors

log = logging.getLogger(__name__)

# Most specific first: AdapterRefused is an InvalidArgument.
_CODES: tuple[tuple[type[errors.LoramuxError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller gets for `exc`.

    Domain errors carry a message written for the caller. Anything else is a bug
    on our side: logged with its traceback, reported as INTERNAL without internals.
    """
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
