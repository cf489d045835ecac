"""OrderedInFlight, the worker's infer-while-publishing step, without a broker or a clock.

Each item's ``start`` returns a future the test resolves, and ``finish`` can be held by the test,
so every scenario is a fixed order of events; ``idle()`` lets the loop run everything runnable
(no time passes), after which whatever still waits is waiting for the test.
"""

from __future__ import annotations

import asyncio

import pytest

from emostream.worker.inflight import OrderedInFlight


async def idle(steps: int = 100) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


class Harness:
    """Items 0, 1, 2, ... from a source; the test completes starts and releases finishes."""

    def __init__(self, limit: int, overlap: bool = True, count: int = 100, drain_s: float = 5.0):
        self.pulled = 0
        self.count = count
        self.started: dict[int, asyncio.Future] = {}
        self.finished: list[tuple[int, str]] = []
        self.hold_finish: asyncio.Event | None = None
        self.finish_error: dict[int, Exception] = {}
        self.runner = OrderedInFlight(self.start, self.finish, limit=limit, overlap=overlap, drain_s=drain_s)

    async def source(self):
        while self.pulled < self.count:
            item = self.pulled
            self.pulled += 1
            yield item

    def start(self, item: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.started[item] = fut
        return fut

    async def finish(self, item: int, result: str) -> None:
        if self.hold_finish is not None:
            await self.hold_finish.wait()
        if item in self.finish_error:
            raise self.finish_error[item]
        self.finished.append((item, result))

    def complete(self, item: int) -> None:
        self.started[item].set_result(f"r{item}")

    def in_progress(self) -> list[int]:
        return sorted(i for i, f in self.started.items() if not f.done())


def test_results_are_finished_in_order_even_when_started_ones_complete_out_of_order():
    async def scenario():
        h = Harness(limit=3, count=3)
        running = asyncio.create_task(h.runner.run(h.source()))
        await idle()
        assert h.in_progress() == [0, 1, 2]
        h.complete(2)
        h.complete(1)
        await idle()
        assert h.finished == []  # 1 and 2 wait for 0
        h.complete(0)
        await running
        assert h.finished == [(0, "r0"), (1, "r1"), (2, "r2")]

    asyncio.run(scenario())


def test_at_most_limit_in_progress_and_the_source_waits_for_a_slot():
    async def scenario():
        h = Harness(limit=2)
        running = asyncio.create_task(h.runner.run(h.source()))
        await idle()
        assert h.in_progress() == [0, 1]
        assert h.pulled == 2  # a slot is taken before the next item is pulled
        h.complete(1)  # a slot frees up (item 1 still waits for 0 to be finished)
        await idle()
        assert h.in_progress() == [0, 2] and h.pulled == 3
        h.complete(0)
        await idle()
        assert h.finished == [(0, "r0"), (1, "r1")] and h.in_progress() == [2, 3]
        running.cancel()
        h.complete(2)
        h.complete(3)
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(scenario())


def test_a_slow_finisher_stops_the_source_backpressure():
    async def scenario():
        h = Harness(limit=2)
        h.hold_finish = asyncio.Event()  # publishing is stuck
        running = asyncio.create_task(h.runner.run(h.source()))
        for _ in range(10):  # every start completes at once: only the finisher holds things back
            await idle()
            for i in h.in_progress():
                h.complete(i)
        await idle()
        # item 0 in finish; items 1 and 2 wait for it (queue of `limit`); item 3 started and waits
        # for room in that queue; the source is not pulled further however long this lasts.
        assert h.pulled == 4 and h.finished == []
        h.hold_finish.set()
        h.count = 6
        for _ in range(10):
            await idle()
            for i in h.in_progress():
                h.complete(i)
        await running
        assert [i for i, _ in h.finished] == [0, 1, 2, 3, 4, 5]

    asyncio.run(scenario())


def test_without_overlap_one_item_at_a_time_from_pull_to_finish():
    async def scenario():
        h = Harness(limit=1, overlap=False, count=3)
        h.hold_finish = asyncio.Event()
        running = asyncio.create_task(h.runner.run(h.source()))
        await idle()
        h.complete(0)
        await idle()
        assert h.pulled == 1  # item 0 inferred but not finished: item 1 is not pulled yet
        h.hold_finish.set()
        await idle()
        assert h.finished == [(0, "r0")] and h.pulled == 2
        h.complete(1)
        await idle()
        h.complete(2)
        await running
        assert [i for i, _ in h.finished] == [0, 1, 2]

    asyncio.run(scenario())


def test_a_failure_in_finish_surfaces_and_nothing_after_it_is_finished():
    async def scenario():
        h = Harness(limit=2)
        h.finish_error[1] = RuntimeError("publish failed for good")
        running = asyncio.create_task(h.runner.run(h.source()))
        for _ in range(5):
            await idle()
            for i in h.in_progress():
                h.complete(i)
        with pytest.raises(RuntimeError, match="publish failed for good"):
            await running
        assert h.finished == [(0, "r0")]
        pulled = h.pulled
        await idle()
        assert h.pulled == pulled  # stopped pulling

    asyncio.run(scenario())


def test_a_failure_in_start_surfaces_in_order():
    async def scenario():
        h = Harness(limit=2, count=2)
        running = asyncio.create_task(h.runner.run(h.source()))
        await idle()
        h.complete(1)
        h.started[0].set_exception(ValueError("inference crashed"))
        with pytest.raises(ValueError, match="inference crashed"):
            await running
        assert h.finished == []  # item 1 is never finished before (or without) item 0

    asyncio.run(scenario())


def test_stopping_finishes_what_was_started_within_the_drain_time():
    async def scenario():
        h = Harness(limit=2)
        running = asyncio.create_task(h.runner.run(h.source()))
        await idle()
        running.cancel()  # shutdown while items 0 and 1 are inferred
        await idle()
        h.complete(0)
        h.complete(1)
        with pytest.raises(asyncio.CancelledError):
            await running
        assert [i for i, _ in h.finished] == [0, 1]  # released, so their offsets get committed

    asyncio.run(scenario())


def test_stopping_drops_what_cannot_be_finished_in_time():
    async def scenario():
        h = Harness(limit=2, drain_s=0.05)  # the drain time is the behaviour under test here
        h.hold_finish = asyncio.Event()  # publishing hangs (a dead broker)
        running = asyncio.create_task(h.runner.run(h.source()))
        await idle()
        h.complete(0)
        await idle()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert h.finished == []  # never released: read again by the next owner

    asyncio.run(scenario())


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        OrderedInFlight(lambda x: x, lambda x, r: None, limit=0)
