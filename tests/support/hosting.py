"""Run a ServiceHost on its own event loop in a background thread, so tests can use blocking gRPC clients."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import grpc

from rlhf.serving.server import ServiceHost


class HostThread:
    """``with HostThread(lambda: ServiceHost(...)) as host: grpc.insecure_channel(host.address)``."""

    def __init__(self, factory: Callable[[], ServiceHost]) -> None:
        self._factory = factory
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="service-host", daemon=True)
        self.host: ServiceHost | None = None

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the host's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "HostThread":
        self._thread.start()

        async def make() -> ServiceHost:
            host = self._factory()
            await host.start()
            return host

        self.host = self.call(make())
        return self

    @property
    def address(self) -> str:
        assert self.host is not None
        return self.host.address

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stop(self, grace_s: float | None = 1.0) -> None:
        if self.host is not None:
            self.call(self.host.stop(grace_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "HostThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
