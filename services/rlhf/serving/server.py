"""The gRPC server every service runs on: health, reflection, interceptors, /metrics, graceful shutdown.

A service is one or more :class:`Component` objects (a servicer plus the dependencies it owns). The host

1. starts each component (connects its dependencies) with health NOT_SERVING,
2. serves grpc.health.v1 truthfully: a component's service is SERVING only while its ``check()`` passes,
   re-checked every ``health_interval_s``; the overall status ("") is SERVING only when all are; health needs no
   token (probes send none), every other call the token its scope asks for (rlhf.serving.access),
3. serves over TLS (mutual TLS with ``tls_client_ca_file``) when ``tls_cert_file`` is set, else plaintext,
4. on SIGTERM / SIGINT: reports NOT_SERVING, stops accepting calls, lets in-flight calls finish for
   ``shutdown_grace_s``, then stops the components (producers flush) and the metrics endpoint.
"""
from __future__ import annotations

import abc
import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge, start_http_server

from rlhf.serving import tls
from rlhf.serving.access import AccessPolicy
from rlhf.serving.config import ServerConfig
from rlhf.serving.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor, ParseInterceptor

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

DEPENDENCY_UP = Gauge(
    "rlhf_dependency_up", "1 when a dependency a service needs answered its last check, else 0.", ["service"]
)


class Component(abc.ABC):
    """A servicer and the dependencies it owns."""

    #: Full gRPC service name, e.g. "rlhf.v1.FeedbackService" (health and reflection report it).
    service_name: str

    @abc.abstractmethod
    def register(self, server: grpc.aio.Server) -> None:
        """Add the servicer to the server."""

    def bound(self, address: str) -> None:
        """The server's address once its port is bound (before ``start``): a component may call the other
        services of its own server (embedded mode) there."""

    async def start(self) -> None:
        """Connect dependencies. Called once before the server accepts calls."""

    async def check(self) -> None:
        """Raise when a dependency this service cannot serve without is down."""

    async def stop(self) -> None:
        """Flush and release dependencies. Called after in-flight calls finished."""


class ServiceHost:
    """Runs components on one gRPC port with the shared plumbing."""

    def __init__(self, config: ServerConfig, components: Sequence[Component]) -> None:
        if not components:
            raise ValueError("ServiceHost needs at least one component")
        self.config = config
        self.components = list(components)
        self.access = AccessPolicy.from_config(config)
        self.health = health_aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_httpd = None
        self._health_task: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Outermost first: metrics -> auth -> errors -> parsing (see rlhf.serving.interceptors)."""
        chain: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor()]
        if self.access.enabled:
            chain.append(AuthInterceptor(self.access))
        chain += [ErrorInterceptor(), ParseInterceptor()]
        return chain

    def _bind(self, server: grpc.aio.Server) -> int:
        """Bind the gRPC port, over TLS when configured; the port bound."""
        cfg = self.config
        address = f"{cfg.host}:{cfg.port}"
        credentials = tls.server_credentials(cfg)  # ConfigError naming the flag when a file is bad
        try:
            if credentials is None:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio raises "Failed to bind" where older releases returned 0
            return 0

    def _log_security(self) -> None:
        """One line on auth and TLS at start (counts of tokens, never tokens), and what to fix when half set."""
        cfg = self.config
        log.info("%s", self.access.summary())
        if cfg.auth_tokens and not cfg.admin_tokens:
            log.warning("admin calls (LoadPolicy, SetTrafficSplit, Rollback, training, Promote, ...) are refused: "
                        "auth_token is set but admin_token is not; set admin_token (RLHF_ADMIN_TOKEN) to allow them")
        if cfg.tls:
            log.info("TLS on (%s)", "mutual: client certificates required" if cfg.tls_client_ca_file
                     else "server certificate only")

    async def start(self) -> None:
        """Start components, the gRPC server and the metrics endpoint; health follows the dependency checks."""
        cfg = self.config
        # 1. the server, every service NOT_SERVING until its first successful check
        self._server = grpc.aio.server(
            interceptors=self._interceptors(),
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = [c.service_name for c in self.components]
        for component in self.components:
            component.register(self._server)
            await self.health.set(component.service_name, NOT_SERVING)
        await self.health.set("", NOT_SERVING)
        reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                             reflection.SERVICE_NAME], self._server)
        self.port = self._bind(self._server)
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC port {cfg.host}:{cfg.port} (in use?); choose another with --port")
        self._log_security()
        # 2. dependencies
        for component in self.components:
            component.bound(self.address)
        for component in self.components:
            await component.start()
        # 3. metrics over HTTP
        if cfg.metrics_port >= 0:
            self._metrics_httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.host)
            self.metrics_port = self._metrics_httpd.server_port
        await self._server.start()
        await self.refresh_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="health-checks")
        log.info("serving %s on %s (metrics on %s)", ", ".join(names), self.address, self.metrics_port)

    async def refresh_health(self) -> bool:
        """Run every component's check now and publish the result; True when all serve."""
        all_ok = True
        for component in self.components:
            try:
                await asyncio.wait_for(component.check(), timeout=max(self.config.health_interval_s, 1.0) * 2)
                ok = True
            except Exception as exc:  # noqa: BLE001 - any failure means not serving
                log.warning("%s not serving: %s", component.service_name, exc)
                ok = False
            DEPENDENCY_UP.labels(component.service_name).set(1 if ok else 0)
            if not self._stopping:
                await self.health.set(component.service_name, SERVING if ok else NOT_SERVING)
            all_ok &= ok
        if not self._stopping:
            await self.health.set("", SERVING if all_ok else NOT_SERVING)
        return all_ok

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self.refresh_health()

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown (idempotent)."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        log.info("shutting down (grace %.1fs)", grace)
        # 1. tell load balancers and probes
        await self.health.enter_graceful_shutdown()
        if self._health_task:
            self._health_task.cancel()
        # 2. stop accepting calls; in-flight ones get `grace` seconds
        if self._server is not None:
            await self._server.stop(grace)
        # 3. flush producers, close clients
        for component in reversed(self.components):
            try:
                await component.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                log.exception("stopping %s failed", component.service_name)
        # 4. metrics endpoint
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run_until_signal(self, announce: Callable[["ServiceHost"], None] | None = None) -> None:
        """Start, serve until SIGTERM or SIGINT, then shut down gracefully. ``announce`` runs once started."""
        await self.start()
        if announce is not None:
            announce(self)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        await self.wait_stopped()
