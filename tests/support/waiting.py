"""Polling until something holds, for the integration tests (services apply changes in the background)."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc


def wait_for(predicate: Callable[[], Any], timeout: float = 90.0, what: str = "the condition", *,
             interval: float = 0.1, processes: Mapping[str, Any] | None = None, tolerate_rpc_errors: bool = False):
    """The first truthy value of ``predicate()``; AssertionError naming ``what`` after ``timeout`` seconds.
    ``processes`` (name -> Popen): fail at once when one of them exits. ``tolerate_rpc_errors``: a gRPC error counts
    as "not yet" (a service still starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in (processes or {}).items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode} while waiting for {what}")
        try:
            value = predicate()
        except grpc.RpcError:
            if not tolerate_rpc_errors:
                raise
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} did not hold within {timeout}s")
