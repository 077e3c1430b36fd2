"""Group commit for asyncio: concurrent calls of one batch operation merged into fewer, larger calls.

A service that makes one cache round trip per request batch pays the client library's fixed cost per call (tens
of microseconds of Python in redis-py) however few items the batch has. :class:`GroupCommit` runs at most ``limit``
calls of the operation at once; items submitted meanwhile wait and go together in the next call. An idle service
adds no wait (a call starts at once when fewer than ``limit`` run, with every caller of the same pass of the event
loop); a busy one makes calls as large as the load.
"""
from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Merge concurrent ``await gc(items)`` into calls of ``run(all items)`` (one result per item, in order).

    Each caller gets the results of its own items, or the exception of the call they went in. ``max_items`` bounds
    a merged call (a single caller's items are never split). Items of a caller cancelled while waiting are still
    run if their call has started (as any request already sent would be).
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]], *, limit: int = 1,
                 max_items: int = 10_000) -> None:
        if limit < 1 or max_items < 1:
            raise ValueError("GroupCommit needs limit >= 1 and max_items >= 1")
        self._run = run
        self._limit = limit
        self._max_items = max_items
        self._running = 0
        self._waiting: collections.deque[tuple[list[T], asyncio.Future[list[R]]]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        """Calls of ``run`` in progress."""
        return self._running

    async def __call__(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._waiting.append((list(items), future))
        if self._running < self._limit:
            self._start()
        return await future

    def _start(self) -> None:
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._call())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[list[T], asyncio.Future[list[R]]]]:
        """The waiting callers of the next call: in order, up to ``max_items`` items (at least one caller)."""
        group: list[tuple[list[T], asyncio.Future[list[R]]]] = []
        size = 0
        while self._waiting and (not group or size + len(self._waiting[0][0]) <= self._max_items):
            items, future = self._waiting.popleft()
            if future.cancelled():
                continue
            group.append((items, future))
            size += len(items)
        return group

    async def _call(self) -> None:
        # The group is taken when the call's task first runs, not when it is scheduled: every caller that
        # arrived in the same pass of the event loop (several requests read off the network at once) goes in.
        group = self._take()
        try:
            if not group:
                return
            merged = [item for items, _ in group for item in items]
            try:
                results = list(await self._run(merged))
                if len(results) != len(merged):
                    raise RuntimeError(f"GroupCommit: run returned {len(results)} results for {len(merged)} items")
            except BaseException as exc:  # noqa: BLE001 - every waiting caller gets it, cancellation included
                for _, future in group:
                    if future.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            start = 0
            for items, future in group:
                if not future.done():
                    future.set_result(results[start:start + len(items)])
                start += len(items)
        finally:
            self._running -= 1
            while self._waiting and self._running < self._limit:
                self._start()
