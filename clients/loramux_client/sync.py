"""Blocking client.

    with Client("localhost:50051", token="...") as client:
        print(client.generate("Write SQL: users older than 30", adapter="sql").text)
        for chunk in client.stream(messages=[{"role": "user", "content": "hi"}],
                                   mix=Mix({"sql": 0.6, "chat": 0.4}, method="ties",
                                           params={"density": 0.5})):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Unpack

import grpc

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


class Client(ClientCore):
    """A blocking loramux client over one gRPC channel; use as a context manager or
    call close(). Every method takes timeout= (seconds) and raises a
    LoramuxClientError subclass (InvalidArgument, NotFound, ...) when the call fails."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 admin_token: str | None = None, tls: TLSConfig | None = None,
                 timeout: float | None = None) -> None:
        super().__init__(grpc, target, token=token, admin_token=admin_token, tls=tls, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel connects; Unavailable after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                              f"no connection to {self.target} within {timeout}s") from None

    def _call(self, call: Call, timeout: float | None):
        method, kwargs = self._invocation(call, timeout)
        try:
            response = method(call.request, **kwargs)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return call.parse(response)

    def _stream(self, call: Call, timeout: float | None) -> Iterator:
        method, kwargs = self._invocation(call, timeout)
        responses = method(call.request, **kwargs)
        try:
            for response in responses:
                yield call.parse(response)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            responses.cancel()  # frees the server row when the caller stops early

    # Inference ---------------------------------------------------------------

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **options: Unpack[GenerateOptions]) -> Generation:
        """Generate from `prompt` or messages=[{"role", "content"}, ...] and wait for
        the whole answer. Options (types.GenerateOptions): adapter= | merge= | mix=,
        max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop,
        ignore_eos, request_id; unset sampling options take the server defaults."""
        return self._call(calls.generate(prompt, **options), timeout)

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               **options: Unpack[GenerateOptions]) -> Iterator[StreamChunk]:
        """Like generate, yielding text as it is produced; the last chunk carries
        `.result`. Stopping the iteration early cancels the request on the server."""
        return self._stream(calls.stream(prompt, **options), timeout)

    # Admin -------------------------------------------------------------------

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        return self._call(calls.list_adapters(), timeout)

    def load_adapter(self, name: str, keep: bool = False, *, timeout: float | None = None) -> AdapterInfo:
        """Read, validate and cache an adapter now; keep=True never evicts it."""
        return self._call(calls.load_adapter(name, keep), timeout)

    def unload_adapter(self, name: str, *, timeout: float | None = None) -> None:
        return self._call(calls.unload_adapter(name), timeout)

    def create_merge(self, name: str, mix, replace: bool = False, *,
                     timeout: float | None = None) -> MergeInfo:
        """Build a named merge from a Mix (or a dict of weights: a linear mix)."""
        return self._call(calls.create_merge(name, mix, replace), timeout)

    def list_merges(self, *, timeout: float | None = None) -> list[MergeInfo]:
        return self._call(calls.list_merges(), timeout)

    def delete_merge(self, name: str, *, timeout: float | None = None) -> None:
        return self._call(calls.delete_merge(name), timeout)

    def pin(self, *, adapter: str | None = None, merge: str | None = None, mix=None,
            timeout: float | None = None) -> PinResult:
        """Fold exactly one of adapter / merge / mix into the base weights."""
        return self._call(calls.pin(adapter, merge, mix), timeout)

    def unpin(self, *, timeout: float | None = None) -> PinResult:
        """Restore the original base weights bit for bit."""
        return self._call(calls.unpin(), timeout)

    def export(self, destination: str, *, adapter: str | None = None, merge: str | None = None,
               mix=None, pinned_model: bool = False, timeout: float | None = None) -> ExportResult:
        """Write one source (adapter / merge / mix as a PEFT directory, or
        pinned_model=True as a dense model) to `destination` under the export root."""
        return self._call(calls.export(destination, adapter, merge, mix, pinned_model), timeout)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        return self._call(calls.server_info(), timeout)
