"""Server interceptors: bearer-token auth, Prometheus metrics, and the mapping of exceptions to status codes.

Each interceptor is an async context manager around the call (``scope``); :class:`_ScopeInterceptor` applies it
to the four kinds of handlers, so unary and streaming calls are treated alike. Order on the server:
metrics (outermost, so it sees the final code, UNAUTHENTICATED included) -> auth -> errors -> servicer.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from prometheus_client import Counter, Histogram

from rlhf.serving.errors import status_for

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_PREFIX = "grpc.reflection."

# Names and labels of the go-grpc-prometheus convention, so existing dashboards and alerts apply.
GRPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_type", "grpc_service", "grpc_method"]
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its completion on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    service: str
    method: str
    type: str  # "unary" | "client_stream" | "server_stream" | "bidi_stream"

    @classmethod
    def of(cls, full_method: str, handler: grpc.RpcMethodHandler) -> "MethodInfo":
        service, _, method = full_method.lstrip("/").rpartition("/")
        kind = {
            (False, False): "unary",
            (True, False): "client_stream",
            (False, True): "server_stream",
            (True, True): "bidi_stream",
        }[(bool(handler.request_streaming), bool(handler.response_streaming))]
        return cls(service, method, kind)


class _ScopeInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler's behaviour in ``self.scope(info, context)``."""

    def applies(self, info: MethodInfo) -> bool:
        return True

    def scope(self, info: MethodInfo, context: grpc.aio.ServicerContext) -> contextlib.AbstractAsyncContextManager:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        info = MethodInfo.of(details.method, handler)
        if not self.applies(info):
            return handler
        for attr in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, attr)
            if behavior is not None:
                return handler._replace(**{attr: self._wrap(behavior, info)})
        return handler

    def _wrap(self, behavior: Callable[..., Any], info: MethodInfo) -> Callable[..., Any]:
        scope = self.scope
        if inspect.isasyncgenfunction(behavior):

            async def stream_wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with scope(info, context):
                    async for item in behavior(request, context):
                        yield item

            return stream_wrapper

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(info, context):
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result

        return wrapper


class MetricsInterceptor(_ScopeInterceptor):
    """``grpc_server_started_total``, ``grpc_server_handled_total`` by code, ``grpc_server_handling_seconds``."""

    @contextlib.asynccontextmanager
    async def scope(self, info: MethodInfo, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        labels = (info.type, info.service, info.method)
        GRPC_STARTED.labels(*labels).inc()
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
            code = context.code() or grpc.StatusCode.OK
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except BaseException:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            GRPC_HANDLED.labels(*labels, code.name).inc()
            GRPC_HANDLING_SECONDS.labels(*labels).observe(time.perf_counter() - start)


class AuthInterceptor(_ScopeInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (health checks exempt, for probes)."""

    def __init__(self, token: str, exempt_services: Iterable[str] = (HEALTH_SERVICE,)) -> None:
        if not token:
            raise ValueError("AuthInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode()
        self._exempt = frozenset(exempt_services)

    def applies(self, info: MethodInfo) -> bool:
        return info.service not in self._exempt

    @contextlib.asynccontextmanager
    async def scope(self, info: MethodInfo, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        supplied = b""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                supplied = value.encode() if isinstance(value, str) else value
                break
        if not hmac.compare_digest(supplied, self._expected):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token: send metadata `authorization: Bearer <token>`",
            )
        yield


class ErrorInterceptor(_ScopeInterceptor):
    """Turns exceptions raised by servicers into status codes (see rlhf.serving.errors.status_for)."""

    @contextlib.asynccontextmanager
    async def scope(self, info: MethodInfo, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps them
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s/%s failed", info.service, info.method)
            await context.abort(code, message)
