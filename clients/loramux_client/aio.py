"""asyncio client (grpc.aio); the same methods as the blocking Client, awaited.

    async with AsyncClient("localhost:50051", token="...") as client:
        result = await client.generate("hi", adapter="sql")
        async for chunk in client.stream("hi", mix={"sql": 0.5, "chat": 0.5}):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Unpack

import grpc
import grpc.aio

from loramux_client import calls
from loramux_client.calls import Call
from loramux_client.errors import Unavailable, from_rpc_error
from loramux_client.transport import DEFAULT_TARGET, ClientCore
from loramux_client.types import (
    AdapterInfo,
    ExportResult,
    GenerateOptions,
    Generation,
    MergeInfo,
    PinResult,
    ServerInfo,
    StreamChunk,
    TLSConfig,
)


class AsyncClient(ClientCore):
    """The asyncio twin of loramux_client.Client (see its docstrings); create it
    inside the event loop that uses it."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 admin_token: str | None = None, tls: TLSConfig | None = None,
                 timeout: float | None = None) -> None:
        super().__init__(grpc.aio, target, token=token, admin_token=admin_token, tls=tls, timeout=timeout)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                              f"no connection to {self.target} within {timeout}s") from None

    async def _call(self, call: Call, timeout: float | None):
        method, kwargs = self._invocation(call, timeout)
        try:
            response = await method(call.request, **kwargs)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return call.parse(response)

    async def _stream(self, call: Call, timeout: float | None) -> AsyncIterator:
        method, kwargs = self._invocation(call, timeout)
        responses = method(call.request, **kwargs)
        try:
            async for response in responses:
                yield call.parse(response)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            responses.cancel()

    # Inference ---------------------------------------------------------------

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **options: Unpack[GenerateOptions]) -> Generation:
        return await self._call(calls.generate(prompt, **options), timeout)

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               **options: Unpack[GenerateOptions]) -> AsyncIterator[StreamChunk]:
        """An async iterator of chunks; the request is checked before it returns."""
        return self._stream(calls.stream(prompt, **options), timeout)

    # Admin -------------------------------------------------------------------

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        return await self._call(calls.list_adapters(), timeout)

    async def load_adapter(self, name: str, keep: bool = False, *,
                           timeout: float | None = None) -> AdapterInfo:
        return await self._call(calls.load_adapter(name, keep), timeout)

    async def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        return await self._call(calls.unload_adapter(name), timeout)

    async def create_merge(self, name: str, mix, replace: bool = False, *,
                           timeout: float | None = None) -> MergeInfo:
        return await self._call(calls.create_merge(name, mix, replace), timeout)

    async def list_merges(self, *, timeout: float | None = None) -> list[MergeInfo]:
        return await self._call(calls.list_merges(), timeout)

    async def delete_merge(self, name: str, *, timeout: float | None = None) -> None:
        return await self._call(calls.delete_merge(name), timeout)

    async def pin(self, *, adapter: str | None = None, merge: str | None = None, mix=None,
                  timeout: float | None = None) -> PinResult:
        return await self._call(calls.pin(adapter, merge, mix), timeout)

    async def unpin(self, *, timeout: float | None = None) -> PinResult:
        return await self._call(calls.unpin(), timeout)

    async def export(self, destination: str, *, adapter: str | None = None,
                     merge: str | None = None, mix=None, pinned_model: bool = False,
                     timeout: float | None = None) -> ExportResult:
        return await self._call(calls.export(destination, adapter, merge, mix, pinned_model), timeout)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        return await self._call(calls.server_info(), timeout)
