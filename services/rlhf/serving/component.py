"""The component base of every service on the bus and the cache: it owns them unless they were given (embedded mode
shares one in-process bus and cache between components), creates the platform's topics at start, and closes what it
owns at stop."""
from __future__ import annotations

import asyncio
import logging

from rlhf.bus import bus_from_url, topics
from rlhf.bus.base import Bus
from rlhf.cache import cache_from_url
from rlhf.cache.base import Cache
from rlhf.serving.config import ServiceConfig
from rlhf.serving.server import Component

log = logging.getLogger(__name__)


class ServiceComponent(Component):
    """A :class:`Component` with the bus and cache of its :class:`ServiceConfig`.

    Subclasses call ``await self.ensure_topics()`` in ``start`` and ``await self.close_dependencies()`` last in
    ``stop``."""

    def __init__(self, config: ServiceConfig, *, bus: Bus | None = None, cache: Cache | None = None) -> None:
        self.config = config
        self._owns_bus = bus is None
        self._owns_cache = cache is None
        self.bus = bus if bus is not None else bus_from_url(config.bus_url)
        self.cache = cache if cache is not None else cache_from_url(config.cache_url)

    async def ensure_topics(self) -> None:
        """Create the platform's topics when ``create_topics`` is set. A bus that is down now is not fatal: the
        service starts, health says what it needs, and the topics are created by whichever service starts next."""
        if not self.config.create_topics:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self.bus.ensure_topics, topics.platform_topics(partitions=self.config.topic_partitions)
            )
        except Exception as exc:  # noqa: BLE001 - the bus may come up later
            log.warning("%s: could not ensure topics now (%s); going on without", self.service_name, exc)

    async def close_dependencies(self) -> None:
        """Flush and close the bus and the cache this component owns (not those it was given)."""
        if self._owns_bus:
            await asyncio.get_running_loop().run_in_executor(None, self.bus.close, self.config.shutdown_grace_s)
        if self._owns_cache:
            await self.cache.close()
