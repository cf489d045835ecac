"""Ordered in-flight processing: several items started at once, finished one at a time in order.

The worker infers up to ``batches_in_flight`` batches at once (on executor threads) while the
previous ones are published; batch *n+1* may finish inference before batch *n*, but it is
published after it, so offsets are released in order. Like arroyo's ``RunTaskInThreads``, this
is a step of its own with the policy spelled out, testable without a broker:

* at most ``limit`` items are started and not yet done; a slot is taken *before* the next item is
  pulled from the source, so what arrives meanwhile still joins that item (a batch with
  ``batch_window_ms=0`` is whatever arrived by the time a slot is free);
* results are finished strictly in the order the items were pulled;
* at most ``limit`` started items wait for the finisher; beyond that the source is not pulled
  (backpressure reaches the consumer);
* ``overlap=False``: one item at a time, from pull to finish;
* a failure in ``start``'s result or in ``finish`` stops the runner and is raised from :meth:`run`.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterable, Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class OrderedInFlight(Generic[T, R]):
    """Runs ``start(item)`` for up to ``limit`` items at once and ``finish(item, result)`` in order.

    ``start`` returns an awaitable that is already running (a task, or an executor future);
    ``finish`` is awaited for one item at a time. On shutdown (the task running :meth:`run` is
    cancelled), items already started get ``drain_s`` to be finished; the rest are dropped
    unfinished — for the worker that means unpublished and so uncommitted, read again later.
    """

    def __init__(self, start: Callable[[T], Awaitable[R]], finish: Callable[[T, R], Awaitable[None]],
                 limit: int, overlap: bool = True, drain_s: float = 5.0):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.start = start
        self.finish = finish
        self.limit = limit
        self.overlap = overlap
        self.drain_s = drain_s

    async def run(self, items: AsyncIterable[T]) -> None:
        """Pull, start and finish items until ``items`` ends and every one is finished."""
        slots = asyncio.Semaphore(self.limit)
        ready: asyncio.Queue = asyncio.Queue(maxsize=self.limit)

        async def finisher() -> None:
            while True:
                item, pending = await ready.get()
                try:
                    await self.finish(item, await pending)
                finally:
                    ready.task_done()

        finishing = asyncio.create_task(finisher(), name="emostream-finisher")
        source = aiter(items)
        try:
            while True:
                await slots.acquire()
                try:
                    item = await anext(source)
                except StopAsyncIteration:
                    slots.release()
                    break
                pending = asyncio.ensure_future(self.start(item))
                pending.add_done_callback(lambda _: slots.release())
                await _unless_stopped(ready.put((item, pending)), finishing)
                if not self.overlap:
                    await _unless_stopped(ready.join(), finishing)
            await _unless_stopped(ready.join(), finishing)
        finally:
            if not finishing.done():
                # Stopping early: give what was started a moment to be finished, then drop the rest.
                try:
                    await asyncio.wait_for(asyncio.shield(_unless_stopped(ready.join(), finishing)), self.drain_s)
                except BaseException:  # noqa: BLE001 - cancelled or timed out: the rest stays unfinished
                    pass
                finishing.cancel()


async def _unless_stopped(awaitable, finishing: asyncio.Task) -> None:
    """Await ``awaitable``, but raise what stopped the finisher if it ends first (it never ends on
    its own, and waiting on a queue it no longer serves would hang)."""
    fut = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({fut, finishing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not fut.done():
            fut.cancel()
    if finishing.done():
        finishing.result()  # raises what stopped it
        raise RuntimeError("the finisher stopped")
    fut.result()
