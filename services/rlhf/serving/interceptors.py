"""Server interceptors: Prometheus metrics, bearer-token auth, the mapping of exceptions to status codes, and
request parsing.

Metrics and errors are async context managers around the call (``scope``); :class:`_ScopeInterceptor` applies them
to the four kinds of handlers, so unary and streaming calls are treated alike. Auth decides from the method and
the metadata alone, before the request is read. Order on the server (:meth:`ServiceHost._interceptors`):
metrics (outermost, so it sees the final code, UNAUTHENTICATED included) -> auth -> errors -> parsing (innermost, so
a request that does not parse is an InvalidArgument the error interceptor maps and metrics counts) -> servicer.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from prometheus_client import Counter, Histogram

from rlhf.serving.access import AccessPolicy, Refusal
from rlhf.serving.errors import InvalidArgument, status_for

log = logging.getLogger(__name__)

_BEHAVIORS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

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

    def scope(self, info: MethodInfo, context: grpc.aio.ServicerContext) -> contextlib.AbstractAsyncContextManager:
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        info = MethodInfo.of(details.method, handler)
        for attr in _BEHAVIORS:
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


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls the bearer token does not allow (rlhf.serving.access), before anything reads the request.

    The decision takes the method and the metadata only, so a refused call gets a handler that answers the refusal
    without parsing the request (an unauthenticated caller learns nothing about what parses); an allowed call gets
    the handler unchanged (no wrapper, no cost per message)."""

    def __init__(self, policy: AccessPolicy) -> None:
        if not policy.enabled:
            raise ValueError("AuthInterceptor needs a policy with at least one token")
        self._policy = policy

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        refusal = self._policy.check(details.method, details.invocation_metadata)
        return handler if refusal is None else _refusing(handler, refusal)


def _refusing(handler: grpc.RpcMethodHandler, refusal: Refusal) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(refusal.code, refusal.message)

    for attr in _BEHAVIORS:
        if getattr(handler, attr) is not None:
            # A coroutine serves all four kinds: grpc.aio awaits it (for streaming responses too).
            return handler._replace(request_deserializer=None, **{attr: refuse})
    return handler


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


class ParseInterceptor(grpc.aio.ServerInterceptor):
    """Parses requests itself, so that bytes that are not the method's request message are INVALID_ARGUMENT naming
    the type (``request: cannot parse the bytes as rlhf.v1.GenerateRequest``; ``requests[3]: ...`` for the 4th
    message of a stream).

    grpc.aio parses a request before any handler or interceptor code runs: a unary call that does not parse is
    answered UNKNOWN ("Unexpected DecodeError"), and a stream fails inside the servicer's loop (INTERNAL). This
    interceptor sets the handler's ``request_deserializer`` to None (grpc.aio then hands over the bytes) and parses
    with that deserializer (the message class' ``FromString``) in the handler. Innermost, so the error interceptor
    maps the InvalidArgument and metrics counts it as such.

    Servicers read request streams by iterating them (``async for``); ``context.read()`` would return bytes.
    """

    def __init__(self) -> None:
        # method -> (the handler seen, its parsing twin): handlers are registered once, so each is wrapped once.
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        seen = self._handlers.get(details.method)
        if seen is None or seen[0] is not handler:
            seen = (handler, _parsing(handler))
            self._handlers[details.method] = seen
        return seen[1]


def _message_name(parse: Callable[[bytes], Any]) -> str:
    message_class = getattr(parse, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or getattr(parse, "__qualname__", repr(parse))


def _parsing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with its request parsing moved into the behaviour."""
    parse = handler.request_deserializer
    problem = f"cannot parse the bytes as {_message_name(parse)}"
    attr = next(a for a in _BEHAVIORS if getattr(handler, a) is not None)
    behavior = getattr(handler, attr)
    if handler.request_streaming:
        wrapped = _parse_stream(behavior, parse, problem)
    else:
        wrapped = _parse_unary(behavior, parse, problem)
    return handler._replace(request_deserializer=None, **{attr: wrapped})


def _parse_unary(behavior: Callable[..., Any], parse: Callable[[bytes], Any], problem: str) -> Callable[..., Any]:
    def parsed(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:  # noqa: BLE001 - DecodeError, or whatever a custom deserializer raises
            raise InvalidArgument("request", problem) from None

    if inspect.isasyncgenfunction(behavior):

        async def stream_wrapper(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = parsed(raw)
            async for item in behavior(request, context):
                yield item

        return stream_wrapper

    async def wrapper(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        result = behavior(parsed(raw), context)
        if inspect.isawaitable(result):
            result = await result
        return result

    return wrapper


class _ParsedStream:
    """The request stream of one call, parsed message by message; keeps the error of the first that fails."""

    __slots__ = ("_raw", "_parse", "_problem", "failure")

    def __init__(self, raw: AsyncIterator[bytes], parse: Callable[[bytes], Any], problem: str) -> None:
        self._raw = raw
        self._parse = parse
        self._problem = problem
        self.failure: InvalidArgument | None = None

    async def messages(self) -> AsyncIterator[Any]:
        parse = self._parse
        index = 0
        async for raw in self._raw:
            try:
                message = parse(raw)
            except Exception:  # noqa: BLE001 - as in _parse_unary
                self.failure = InvalidArgument(f"requests[{index}]", self._problem)
                raise self.failure from None
            index += 1
            yield message

    def settle(self, exc: BaseException | None = None) -> None:
        """The call ended (with ``exc``): when a request did not parse, that is its answer, whatever the servicer
        made of the error (it may have swallowed it, or wrapped it)."""
        if self.failure is not None and exc is not self.failure:
            raise self.failure from exc


def _parse_stream(behavior: Callable[..., Any], parse: Callable[[bytes], Any], problem: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream_wrapper(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            stream = _ParsedStream(raw, parse, problem)
            try:
                async for item in behavior(stream.messages(), context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised, or replaced by the parse error
                stream.settle(exc)
                raise
            stream.settle()

        return stream_wrapper

    async def wrapper(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        stream = _ParsedStream(raw, parse, problem)
        try:
            result = behavior(stream.messages(), context)
            if inspect.isawaitable(result):
                result = await result
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised, or replaced by the parse error
            stream.settle(exc)
            raise
        stream.settle()
        return result

    return wrapper
