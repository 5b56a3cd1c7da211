"""Python client of the loramux gRPC API (no torch, no server code needed).

    from loramux_client import Client, Mix

    with Client("localhost:50051", token="...") as client:
        g = client.generate("Hello", mix=Mix({"sql": 0.6, "chat": 0.4}, method="ties",
                                              params={"density": 0.5}))
        print(g.text, g.finish_reason, g.resolution)

AsyncClient has the same methods for asyncio. Failed calls raise LoramuxClientError
subclasses named after the gRPC status (InvalidArgument, NotFound, ...).
"""

from loramux_client.aio import AsyncClient
from loramux_client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LoramuxClientError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from loramux_client.sync import Client
from loramux_client.transport import DEFAULT_TARGET
from loramux_client.types import (
    AdapterInfo,
    CacheUsage,
    ExportResult,
    GenerateOptions,
    Generation,
    MergeInfo,
    Mix,
    PinResult,
    Resolution,
    ServerInfo,
    StreamChunk,
    TLSConfig,
)

__all__ = [
    "AdapterInfo", "AsyncClient", "CacheUsage", "Cancelled", "Client", "DEFAULT_TARGET",
    "DeadlineExceeded", "ExportResult", "FailedPrecondition", "GenerateOptions", "Generation",
    "InvalidArgument", "LoramuxClientError", "MergeInfo", "Mix", "NotFound", "PermissionDenied",
    "PinResult", "Resolution", "ResourceExhausted", "ServerInfo", "StreamChunk", "TLSConfig",
    "Unauthenticated", "Unavailable", "from_rpc_error",
]
