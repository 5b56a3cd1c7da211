"""What every RPC handler shares: the server state it needs, error mapping and
the per-RPC request counter."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import message_factory

from loramux.engine.engine import Engine
from loramux.errors import InvalidArgument, Unavailable
from loramux.service.metrics import Metrics
from loramux.service.runner import EngineRunner
from loramux.service.status import status_of


@dataclass
class ServerState:
    """The live objects RPCs work on. engine and runner stay None until the model is
    loaded; handlers then answer UNAVAILABLE."""

    metrics: Metrics
    export_root: Path | None = None
    engine: Engine | None = None
    runner: EngineRunner | None = None
    # Serializes operations on the base weights (pin, unpin, dense export).
    weights_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def ready(self) -> "ServerState":
        if self.runner is None or self.runner.draining:
            reason = "loading the model" if self.runner is None else "shutting down"
            raise Unavailable(f"the server is {reason}; retry shortly")
        return self


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not decode (see `add_servicer`)."""

    message_type: str


def _lenient(message_class):
    """A request deserializer that never raises: grpc would answer UNKNOWN with a
    Python class name; the handler answers INVALID_ARGUMENT instead."""

    def decode(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError, or a nested message too deep
            return Malformed(message_class.DESCRIPTOR.full_name)

    return decode


def add_servicer(server, servicer, service) -> None:
    """Register `servicer` for the service descriptor `service`, as the generated
    add_*Servicer_to_server does, but with lenient request decoding."""
    handlers = {}
    for m in service.methods:
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _check_decoded(request) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument(f"the request is not a valid {request.message_type} message (protobuf decoding failed)")


def _cancel_code(context) -> str:
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


@contextlib.asynccontextmanager
async def _reported(state: ServerState, rpc: str, context):
    """Map domain errors raised inside to their status and count the outcome."""
    try:
        yield
    except asyncio.CancelledError:
        state.metrics.observe_rpc(rpc, _cancel_code(context))
        raise
    except Exception as e:
        code, message = status_of(e)
        state.metrics.observe_rpc(rpc, code.name)
        await context.abort(code, message)
    state.metrics.observe_rpc(rpc, "OK")


def unary(rpc: str):
    """Wrap a unary handler: map domain errors to their status, count the outcome."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            async with _reported(self.state, rpc, context):
                _check_decoded(request)
                return await fn(self, request, context)

        return handler

    return wrap


def streaming(rpc: str):
    """As `unary`, for a server-streaming handler (an async generator)."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            async with _reported(self.state, rpc, context):
                _check_decoded(request)
                async for item in fn(self, request, context):
                    yield item

        return handler

    return wrap
