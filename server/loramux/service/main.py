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
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from loramux.config import EngineConfig, ServerConfig, load_toml
from loramux.engine.engine import Engine
from loramux.service.admin import AdminService
from loramux.service.auth import BearerTokenAuth
from loramux.service.handlers import ServerState
from loramux.service.inference import InferenceService
from loramux.service.metrics import Metrics, StateCollector, serve_metrics
from loramux.service.runner import EngineRunner, RunnerLimits
from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

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
        if self.cfg.metrics_port >= 0:
            self._http = serve_metrics(self.registry, self.cfg.metrics_host, self.cfg.metrics_port)
            self.metrics_port = self._http.server_port
        engine: Engine = await asyncio.get_running_loop().run_in_executor(None, self._engine_factory)
        runner = EngineRunner(
            engine, RunnerLimits(engine.config.max_batch_rows + self.cfg.max_waiting), self.state.metrics
        )
        runner.start()
        self.state.engine, self.state.runner = engine, runner
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving gRPC on %s:%s, metrics on %s", self.cfg.host, self.port, self.metrics_port)
        if self.cfg.port_file is not None:
            _write_atomic(self.cfg.port_file, f"{self.port} {self.metrics_port or -1}\n")

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new requests, let in-flight ones finish within
        the grace period, then stop everything."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        runner = self.state.runner
        finished = await runner.drain(self.cfg.grace_seconds) if runner else True
        if not finished:
            log.warning("grace period over with %d requests in flight; cancelling them", runner.outstanding)
        await self._grpc.stop(grace=1.0)
        if runner is not None:
            runner.stop()
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
        pb_grpc.add_InferenceServicer_to_server(InferenceService(self.state), server)
        pb_grpc.add_AdminServicer_to_server(AdminService(self.state), server)
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


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from loramux.cli import add_model_args

    p.add_argument("--config", type=Path, help="TOML file ([server], [model], [adapters], "
                   "[slots], [merges], [engine]); flags given on the command line win")
    add_model_args(p)
    g = p.add_argument_group("server")
    d = ServerConfig()
    g.add_argument("--host", default=d.host, help="address to listen on (default: %(default)s)")
    g.add_argument("--port", type=int, default=d.port, help="gRPC port; 0 picks one (default: %(default)s)")
    g.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help="HTTP /metrics port; 0 picks one, -1 turns it off (default: %(default)s)")
    g.add_argument("--max-waiting", type=int, default=d.max_waiting,
                   help="queued requests beyond the running rows (default: %(default)s)")
    g.add_argument("--max-batch-rows", type=int, default=EngineConfig.max_batch_rows,
                   help="rows decoding together (default: %(default)s)")
    g.add_argument("--grace-seconds", type=float, default=d.grace_seconds,
                   help="on SIGTERM, time in-flight requests get to finish (default: %(default)s)")
    g.add_argument("--export-root", type=Path, help="directory Admin.Export writes into (off if unset)")
    g.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
    g.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    g.add_argument("--tls-client-ca", type=Path, help="CA bundle; requires client certificates (mTLS)")
    g.add_argument("--api-token-file", type=Path,
                   help="bearer token for Inference (else env LORAMUX_API_TOKEN; none: no auth)")
    g.add_argument("--admin-token-file", type=Path,
                   help="bearer token for Admin (else env LORAMUX_ADMIN_TOKEN, else the API token)")
    g.add_argument("--port-file", type=Path, help="write '<grpc port> <metrics port>' here when serving")
    p.set_defaults(serve_defaults={a.dest: a.default for a in p._actions})


_SERVER_FLAGS = ("host", "port", "metrics_port", "max_waiting", "grace_seconds", "export_root",
                 "tls_cert", "tls_key", "tls_client_ca", "api_token_file", "admin_token_file", "port_file")


def serve_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """Engine and server configs: defaults, then the TOML file, then explicit flags."""
    from loramux.cli import engine_config

    explicit = {k for k, v in vars(args).items() if k in args.serve_defaults and v != args.serve_defaults[k]}
    flags_engine = engine_config(args)
    engine, server = load_toml(args.config) if args.config else (EngineConfig(), ServerConfig())
    if args.config is None:
        engine = flags_engine
    else:
        engine = _overlay_engine(engine, flags_engine, explicit)
    if "max_batch_rows" in explicit or args.config is None:
        engine.max_batch_rows = args.max_batch_rows
        if "max_batch_tokens" not in explicit and engine.max_batch_tokens < engine.max_batch_rows:
            engine.max_batch_tokens = engine.max_batch_rows  # every row decodes a token per step
    server = replace(server, **{k: getattr(args, k) for k in _SERVER_FLAGS if k in explicit})
    return engine.validate(), server.validate()


# flag dest → (EngineConfig section, field)
_ENGINE_FLAGS = {
    "model": ("model", "path"), "model_cache": ("model", "cache_dir"), "device": ("model", "device"),
    "dtype": ("model", "dtype"), "quantization": ("model", "quantization"),
    "adapter_root": ("adapters", "roots"), "max_rank": ("adapters", "max_rank"),
    "host_cache_bytes": ("adapters", "host_cache_bytes"), "slots": ("slots", "num_slots"),
    "kv_cache_bytes": ("kv_cache", "bytes"), "kv_block_size": ("kv_cache", "block_size"),
    "prefix_caching": ("kv_cache", "prefix_caching"),
    "max_batch_tokens": (None, "max_batch_tokens"), "prefill_chunk_tokens": (None, "prefill_chunk_tokens"),
}


def _overlay_engine(base: EngineConfig, flags: EngineConfig, explicit: set[str]) -> EngineConfig:
    for dest, (section, name) in _ENGINE_FLAGS.items():
        if dest in explicit:
            into, source = (base, flags) if section is None else (getattr(base, section), getattr(flags, section))
            setattr(into, name, getattr(source, name))
    return base


def read_secrets(cfg: ServerConfig, env=os.environ) -> Secrets:
    def read(path: Path | None, var: str) -> str | None:
        token = Path(path).read_text().strip() if path else env.get(var, "").strip()
        return token or None

    return Secrets(read(cfg.api_token_file, "LORAMUX_API_TOKEN"), read(cfg.admin_token_file, "LORAMUX_ADMIN_TOKEN"))


def cmd_serve(args: argparse.Namespace) -> int:
    from loramux.app import build_engine

    engine_cfg, server_cfg = serve_configs(args)
    secrets = read_secrets(server_cfg)
    if server_cfg.tls_cert is None and (secrets.api_token or secrets.admin_token) and server_cfg.host not in (
        "127.0.0.1", "localhost", "::1"
    ):
        log.warning("bearer tokens over plaintext gRPC on %s: enable TLS (--tls-cert/--tls-key)", server_cfg.host)
    return asyncio.run(serve(server_cfg, lambda: build_engine(engine_cfg), secrets))
