"""`loramux serve`: build the gRPC server around an engine and run it until SIGTERM.

Start-up order: bind the ports and answer health NOT_SERVING at once (so probes see
a live process), load the model off the event loop, then flip to SERVING. SIGTERM
or SIGINT: health NOT_SERVING, new requests UNAVAILABLE, in-flight requests get
`grace_seconds` to finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from loramux.config import ConfigError, EngineConfig, ServerConfig
from loramux.engine.engine import Engine
from loramux.service.admin import AdminService
from loramux.service.auth import BearerTokenAuth
from loramux.service.handlers import ServerState, add_servicer
from loramux.service.inference import InferenceService
from loramux.service.metrics import Metrics, StateCollector, serve_metrics
from loramux.service.runner import EngineRunner, RunnerLimits, run_alone
from loramux_api.v1 import loramux_pb2 as pb

log = logging.getLogger(__name__)

# Seconds before the end of the grace period at which unfinished requests are cut.
_CUT_MARGIN_SECONDS = 2.0

SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Inference", "Admin"))


@dataclass(frozen=True)
class Secrets:
    """Bearer tokens, read once at start (from files or the environment)."""

    api_token: str | None = None
    admin_token: str | None = None


class LoramuxServer:
    """One server: gRPC services, health, reflection, metrics, the engine runner.

    `engine_factory` builds the engine (the model load); tests pass one that
    returns an engine they already built.
    """

    def __init__(self, cfg: ServerConfig, engine_factory, secrets: Secrets = Secrets()):
        self.cfg, self._engine_factory, self.secrets = cfg, engine_factory, secrets
        self.registry = CollectorRegistry()
        self.state = ServerState(Metrics(self.registry), export_root=cfg.export_root)
        self.registry.register(StateCollector(lambda: self.state if self.state.runner else None))
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http = None

    async def start(self) -> None:
        """Bind and serve NOT_SERVING, load the engine, then serve."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._grpc = self._build_grpc()
        await self._grpc.start()
        log.info("gRPC listening on %s (NOT_SERVING until the model is loaded)", _address(self.cfg.host, self.port))
        if self.cfg.metrics_port >= 0:
            host = self.cfg.metrics_bind_host  # the gRPC host unless metrics_host says otherwise
            self._http = serve_metrics(self.registry, host, self.cfg.metrics_port)
            self.metrics_port = self._http.server_port
            log.info("metrics on http://%s/metrics", _address(host, self.metrics_port))
        engine: Engine = await run_alone(self._engine_factory)
        merges = engine.config.merges
        limits = RunnerLimits(
            engine.config.max_batch_rows + self.cfg.max_waiting,
            merge_workers=merges.max_concurrent, merge_timeout=merges.timeout_seconds,
        )
        runner = EngineRunner(engine, limits, self.state.metrics)
        runner.start()
        self.state.engine, self.state.runner = engine, runner
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        metrics = _address(self.cfg.metrics_bind_host, self.metrics_port) if self._http is not None else "off"
        log.info("serving gRPC on %s, metrics on %s", _address(self.cfg.host, self.port), metrics)
        if self.cfg.port_file is not None:
            _write_atomic(self.cfg.port_file, f"{self.port} {self.metrics_port or -1}\n")

    async def stop(self) -> None:
        """Drain within the grace period: NOT_SERVING, refuse new requests, let
        in-flight ones finish, and shortly before the grace ends cut what is left
        (each caller gets UNAVAILABLE saying so, streams a last message with what
        was generated); then stop everything. Returns within `grace_seconds`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.cfg.grace_seconds
        # Room at the end of the grace to cut, deliver the final messages and close.
        margin = min(_CUT_MARGIN_SECONDS, self.cfg.grace_seconds / 4)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        runner = self.state.runner
        finished = await runner.drain(max(end - margin - loop.time(), 0.0)) if runner else True
        if not finished:
            log.warning("grace period ending with %d requests in flight; cutting them", runner.outstanding)
            await runner.cut(timeout=margin / 2)
        await self._grpc.stop(grace=max(min(end - loop.time(), margin / 4), 0.0))
        if runner is not None:
            runner.stop(timeout=max(end - loop.time(), 0.1))
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    async def _set_health(self, status) -> None:
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, status)

    def _build_grpc(self) -> grpc.aio.Server:
        cfg = self.cfg
        interceptors = []
        if self.secrets.api_token or self.secrets.admin_token:
            metrics = self.state.metrics
            interceptors.append(BearerTokenAuth(
                self.secrets.api_token, self.secrets.admin_token,
                on_denied=lambda rpc: metrics.observe_rpc(rpc, "UNAUTHENTICATED"),
            ))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        add_servicer(server, InferenceService(self.state), pb.DESCRIPTOR.services_by_name["Inference"])
        add_servicer(server, AdminService(self.state), pb.DESCRIPTOR.services_by_name["Admin"])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            SERVICE_NAMES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        address = f"{cfg.host}:{cfg.port}"
        creds = _server_credentials(cfg)
        self.port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        return server


def _server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    if cfg.tls_cert is None:
        return None
    ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---- running it ----------------------------------------------------------------


async def serve(cfg: ServerConfig, engine_factory, secrets: Secrets = Secrets()) -> int:
    """Run until SIGTERM/SIGINT, then drain and return 0."""
    server = LoramuxServer(cfg, engine_factory, secrets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    log.info("signal received; draining (grace %.0f s)", cfg.grace_seconds)
    await server.stop()
    return 0


class ServerThread:
    """A LoramuxServer on its own event loop thread, for tests and `loramux bench`."""

    def __init__(self, cfg: ServerConfig, engine_factory, secrets: Secrets = Secrets()):
        self.server = LoramuxServer(cfg, engine_factory, secrets)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loramux-grpc", daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the `serve` subcommand ------------------------------------------------------


# The flags and the configs they make live in loramux.cliargs: `loramux serve`
# parses and checks them there before this module (torch, grpc: seconds) loads.
# Re-exported for callers that build a serve command line against this module.
from loramux.cliargs import add_serve_args, serve_configs  # noqa: E402,F401


def read_secrets(cfg: ServerConfig, env=os.environ) -> Secrets:
    """The bearer tokens: each from its configured file, else from the environment.
    An unreadable file is a ConfigError naming it."""

    def read(path: Path | None, var: str, field: str) -> str | None:
        try:
            token = Path(path).read_text() if path else env.get(var, "")
        except OSError as e:
            raise ConfigError([(f"[server] {field}", f"cannot read {path}: {e.strerror}")]) from None
        return token.strip() or None

    return Secrets(read(cfg.api_token_file, "LORAMUX_API_TOKEN", "api_token_file"),
                   read(cfg.admin_token_file, "LORAMUX_ADMIN_TOKEN", "admin_token_file"))


def cmd_serve(args: argparse.Namespace) -> int:
    """`loramux serve` from parsed flags (loramux.cli.cmd_serve checks them before
    importing this module, then calls run_server)."""
    return run_server(*serve_configs(args))


def run_server(engine_cfg: EngineConfig, server_cfg: ServerConfig, env=os.environ) -> int:
    """Serve validated configs until SIGTERM/SIGINT; the exit code."""
    secrets = read_secrets(server_cfg, env)
    if server_cfg.tls_cert is None and (secrets.api_token or secrets.admin_token) and server_cfg.host not in (
        "127.0.0.1", "localhost", "::1"
    ):
        log.warning("bearer tokens over plaintext gRPC on %s: enable TLS (--tls-cert/--tls-key)", server_cfg.host)
    return asyncio.run(serve(server_cfg, lambda: _load_engine(engine_cfg), secrets))


def _load_engine(cfg: EngineConfig) -> Engine:
    """build_engine, logging what was loaded and how long it took."""
    from loramux.app import build_engine

    start = time.perf_counter()
    engine = build_engine(cfg)
    seconds = time.perf_counter() - start
    info = engine.info()
    log.info("model loaded in %.1f s", seconds, extra={
        "model": info.base_model, "load_s": round(seconds, 3), "device": info.device, "dtype": info.dtype})
    return engine


def _address(host: str, port: int | None) -> str:
    """host:port, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
