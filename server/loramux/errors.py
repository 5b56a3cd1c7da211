"""Domain errors. The service layer maps each class to one gRPC status code.

Engine code raises these with a message a person can act on; it never imports grpc.
"""


class LoramuxError(Exception):
    """Base class of every error loramux reports to a caller."""


class InvalidArgument(LoramuxError):
    """The request itself is wrong (bad name, bad parameter, malformed adapter)."""


class NotFound(LoramuxError):
    """A named adapter or merge does not exist."""


class FailedPrecondition(LoramuxError):
    """The request is well formed but the server's state does not allow it now."""


class ResourceExhausted(LoramuxError):
    """A bounded resource (cache bytes, device slots, queue) is full."""


class Unavailable(LoramuxError):
    """The server is starting up or draining."""


class Unauthenticated(LoramuxError):
    """The call carries no valid credentials for the service it calls."""


class AdapterRefused(InvalidArgument):
    """An adapter on disk failed validation; the message says which check and why."""
