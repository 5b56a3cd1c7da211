"""Bearer-token authentication as a grpc.aio server interceptor.

Inference RPCs need the API token, Admin RPCs the admin token (the API token when
no admin token is configured). Health and reflection stay open: probes and tools
must reach them without secrets. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

INFERENCE_PREFIX = "/loramux.v1.Inference/"
ADMIN_PREFIX = "/loramux.v1.Admin/"


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """on_denied(rpc): called with the RPC's short name ("Generate") for every call
    refused, so refusals show in the request metrics like any other outcome."""

    def __init__(
        self, api_token: str | None, admin_token: str | None, on_denied: Callable[[str], None] = lambda rpc: None
    ):
        self._tokens = {INFERENCE_PREFIX: api_token, ADMIN_PREFIX: admin_token or api_token}
        self._on_denied = on_denied

    def _required(self, method: str) -> tuple[str | None, str]:
        for prefix, token in self._tokens.items():
            if method.startswith(prefix):
                return token, "admin" if prefix == ADMIN_PREFIX else "API"
        return None, ""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        token, which = self._required(details.method)
        handler = await continuation(details)
        if token is None or handler is None:
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(_credentials(sent).encode(), token.encode()):
            return handler
        message = (
            f"missing or wrong {which} token: send metadata 'authorization: Bearer <token>'"
        )
        # A known method (handler is not None), so the label set stays bounded.
        self._on_denied(details.method.rsplit("/", 1)[-1])
        return _denied(handler, message)


def _credentials(header: str) -> str:
    """The token of an 'authorization: Bearer <token>' header ('' when the scheme is
    not Bearer). The scheme is case-insensitive (RFC 7235 section 2.1)."""
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)
