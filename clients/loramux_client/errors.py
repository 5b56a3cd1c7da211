"""Client errors: one class per gRPC status the server uses, all mapped by `from_rpc_error`.

    try:
        client.generate("hi", adapter="nope")
    except loramux_client.NotFound as e:
        print(e.code, e.details)
"""

from __future__ import annotations

import grpc


class LoramuxClientError(Exception):
    """A call failed. code: the grpc.StatusCode; details: the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code_name(code)}: {details}")
        self.code = code
        self.details = details

    @property
    def code_name(self) -> str:
        return code_name(self.code)


class InvalidArgument(LoramuxClientError):
    """The request is wrong: bad name, bad parameter, bad mix."""


class NotFound(LoramuxClientError):
    """The named adapter or merge does not exist."""


class FailedPrecondition(LoramuxClientError):
    """Well formed, but the server's state does not allow it now."""


class ResourceExhausted(LoramuxClientError):
    """A bounded resource (cache bytes, device slots, queue) is full."""


class Unavailable(LoramuxClientError):
    """The server cannot be reached, or is starting up or draining."""


class Unauthenticated(LoramuxClientError):
    """Missing or wrong bearer token."""


class PermissionDenied(LoramuxClientError):
    """The token is valid but not allowed this call (e.g. Admin without the admin token)."""


class DeadlineExceeded(LoramuxClientError):
    """The call's timeout passed."""


class Cancelled(LoramuxClientError):
    """The call was cancelled."""


_BY_CODE: dict[grpc.StatusCode, type[LoramuxClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def code_name(code: grpc.StatusCode) -> str:
    """INVALID_ARGUMENT → InvalidArgument."""
    return "".join(part.capitalize() for part in code.name.split("_"))


def from_rpc_error(error: grpc.RpcError) -> LoramuxClientError:
    """The client error for a failed sync or grpc.aio call (both raise grpc.RpcError
    subclasses with .code() and .details())."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(code, LoramuxClientError)(code, details or str(error))
