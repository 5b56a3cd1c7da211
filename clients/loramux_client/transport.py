"""Channel, credentials and per-service call options shared by Client and AsyncClient."""

from __future__ import annotations

from types import ModuleType

import grpc
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc

from loramux_client.calls import ADMIN, INFERENCE, Call
from loramux_client.types import TLSConfig

DEFAULT_TARGET = "localhost:50051"


def bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def open_channel(channels: ModuleType, target: str, tls: TLSConfig | None):
    """A channel from `channels` (grpc or grpc.aio: same factory signatures)."""
    if tls is None:
        return channels.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(tls.root_ca, tls.client_key, tls.client_cert)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else None
    return channels.secure_channel(target, credentials, options)


class ClientCore:
    """Holds the channel, the stubs and the metadata each service's calls carry.

    token: bearer token of Inference calls; admin_token: of Admin calls (falls back
    to token when None). timeout: default deadline in seconds of every call (None:
    no deadline); a method's own timeout= wins.
    """

    def __init__(self, channels: ModuleType, target: str, *, token: str | None,
                 admin_token: str | None, tls: TLSConfig | None, timeout: float | None) -> None:
        self.target = target
        self._channel = open_channel(channels, target, tls)
        self._stubs = {INFERENCE: pb_grpc.InferenceStub(self._channel),
                       ADMIN: pb_grpc.AdminStub(self._channel)}
        self._metadata = {INFERENCE: bearer(token),
                          ADMIN: bearer(token if admin_token is None else admin_token)}
        self._timeout = timeout

    def _invocation(self, call: Call, timeout: float | None):
        """(stub method, its keyword arguments) for running `call`."""
        method = getattr(self._stubs[call.service], call.rpc)
        deadline = self._timeout if timeout is None else timeout
        return method, {"metadata": self._metadata[call.service], "timeout": deadline}
