"""Errors of the platform and the one place that maps them to gRPC status codes.

Core code raises these (or the bus / cache errors); servicers never build status codes themselves.
An exception that is not mapped becomes INTERNAL with a generic message (the detail goes to the log only).
"""
from __future__ import annotations

import grpc

from rlhf.bus.base import BusError, BusUnavailable
from rlhf.cache.base import CacheUnavailable


class ServiceError(Exception):
    """Base of errors that carry their own status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """Bad input. ``field`` is the path of the offending field, e.g. ``event.ranking.response_ids[2]``."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class Unavailable(ServiceError):
    """A dependency is down; the call did nothing and may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ServiceError):
    """A conflicting operation is in progress (e.g. the same event_id in flight on another replica); retry."""

    code = grpc.StatusCode.ABORTED


class ResourceExhausted(ServiceError):
    """A queue is full; retry later or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, BusUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"message bus unavailable: {exc}; not acknowledged, retry"
    if isinstance(exc, BusError):
        return grpc.StatusCode.INTERNAL, f"message bus error: {exc}"
    if isinstance(exc, CacheUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"cache unavailable: {exc}; retry"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "timed out"
    return grpc.StatusCode.INTERNAL, "internal error (see the service log)"
