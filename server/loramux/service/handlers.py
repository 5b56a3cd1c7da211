"""What every RPC handler shares: the server state it needs, error mapping and
the per-RPC request counter."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from pathlib import Path

from loramux.engine.engine import Engine
from loramux.errors import Unavailable
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


def _cancel_code(context) -> str:
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def unary(rpc: str):
    """Wrap a unary handler: map domain errors to their status, count the outcome."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            try:
                response = await fn(self, request, context)
            except asyncio.CancelledError:
                self.state.metrics.observe_rpc(rpc, _cancel_code(context))
                raise
            except Exception as e:
                code, message = status_of(e)
                self.state.metrics.observe_rpc(rpc, code.name)
                await context.abort(code, message)
            self.state.metrics.observe_rpc(rpc, "OK")
            return response

        return handler

    return wrap


def streaming(rpc: str):
    """As `unary`, for a server-streaming handler (an async generator)."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except asyncio.CancelledError:
                self.state.metrics.observe_rpc(rpc, _cancel_code(context))
                raise
            except Exception as e:
                code, message = status_of(e)
                self.state.metrics.observe_rpc(rpc, code.name)
                await context.abort(code, message)
            self.state.metrics.observe_rpc(rpc, "OK")

        return handler

    return wrap
