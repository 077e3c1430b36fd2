"""GroupCommit: concurrent calls merged into fewer calls, each caller getting exactly its own results."""
from __future__ import annotations

import asyncio

import pytest

from rlhf.serving.group_commit import GroupCommit


class Recorder:
    """A batch operation that records its calls and waits for ``gate`` before answering (item -> item * 10)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail_on: int | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await self.gate.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"item {self.fail_on} refused")
        return [i * 10 for i in items]


async def queue_behind_a_running_call(
    gc: GroupCommit, first: list[int], later: list[list[int]]
) -> tuple[asyncio.Future, list[asyncio.Future]]:
    """Start ``gc(first)`` (its run blocks on the recorder's gate), then the ``later`` calls, which all wait."""
    running = asyncio.ensure_future(gc(first))
    await asyncio.sleep(0)
    waiting = [asyncio.ensure_future(gc(items)) for items in later]
    await asyncio.sleep(0.01)
    return running, waiting


def test_an_idle_call_runs_at_once() -> None:
    async def main() -> None:
        run = Recorder()
        run.gate.set()
        gc = GroupCommit(run)
        assert await gc([1, 2, 3]) == [10, 20, 30]
        assert await gc([]) == []
        assert run.calls == [[1, 2, 3]]

    asyncio.run(main())


def test_callers_arriving_during_a_call_share_the_next_one() -> None:
    async def main() -> None:
        run = Recorder()
        gc = GroupCommit(run, limit=1)
        first, waiting = await queue_behind_a_running_call(gc, [1], [[10 * n + k for k in range(n)]
                                                                     for n in range(2, 6)])
        assert run.calls == [[1]] and gc.running == 1  # the others wait for the running call
        run.gate.set()
        assert await first == [10]
        results = await asyncio.gather(*waiting)
        assert results == [[(10 * n + k) * 10 for k in range(n)] for n in range(2, 6)]
        assert len(run.calls) == 2 and run.calls[1] == [10 * n + k for n in range(2, 6) for k in range(n)]

    asyncio.run(main())


def test_callers_of_one_pass_of_the_event_loop_share_a_call() -> None:
    """Several requests read off the network at once: no call is running, yet they go in one call."""
    async def main() -> None:
        run = Recorder()
        run.gate.set()
        gc = GroupCommit(run, limit=1)
        assert await asyncio.gather(*(gc([n]) for n in range(5))) == [[0], [10], [20], [30], [40]]
        assert run.calls == [[0, 1, 2, 3, 4]]

    asyncio.run(main())


def test_limit_runs_that_many_calls_at_once() -> None:
    async def main() -> None:
        run = Recorder()
        gc = GroupCommit(run, limit=2)
        calls = []
        for n in range(5):  # one caller per pass of the loop
            calls.append(asyncio.ensure_future(gc([n])))
            await asyncio.sleep(0.001)
        assert run.calls == [[0], [1]] and gc.running == 2
        run.gate.set()
        assert await asyncio.gather(*calls) == [[0], [10], [20], [30], [40]]
        assert run.calls == [[0], [1], [2, 3, 4]]

    asyncio.run(main())


def test_an_error_reaches_the_callers_of_its_call_only() -> None:
    async def main() -> None:
        run = Recorder()
        gc = GroupCommit(run, limit=1)
        first, doomed = await queue_behind_a_running_call(gc, [1], [[2], [3]])
        run.fail_on = 3
        run.gate.set()
        assert await first == [10]
        for fut in doomed:
            with pytest.raises(ValueError, match="item 3 refused"):
                await fut
        run.fail_on = None
        assert await gc([4]) == [40]  # the next call is unaffected

    asyncio.run(main())


def test_max_items_bounds_a_merged_call_without_splitting_a_caller() -> None:
    async def main() -> None:
        run = Recorder()
        gc = GroupCommit(run, limit=1, max_items=4)
        first, rest = await queue_behind_a_running_call(gc, [0], [[1, 2], [3, 4], [5], [6, 7, 8, 9, 10], [11]])
        run.gate.set()
        await first
        await asyncio.gather(*rest)
        assert run.calls == [[0], [1, 2, 3, 4], [5], [6, 7, 8, 9, 10], [11]]

    asyncio.run(main())


def test_a_cancelled_waiting_caller_is_left_out_and_a_wrong_result_count_is_an_error() -> None:
    async def main() -> None:
        run = Recorder()
        gc = GroupCommit(run, limit=1)
        first, (gone, kept) = await queue_behind_a_running_call(gc, [1], [[2], [3]])
        gone.cancel()
        run.gate.set()
        await first
        assert await kept == [30]
        assert run.calls == [[1], [3]]

        async def short(items: list[int]) -> list[int]:
            return items[:-1]

        with pytest.raises(RuntimeError, match="2 results for 3 items"):
            await GroupCommit(short)([1, 2, 3])

    asyncio.run(main())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        GroupCommit(Recorder(), limit=0)
    with pytest.raises(ValueError):
        GroupCommit(Recorder(), max_items=0)
