"""The batcher over a stand-in for a faust stream (the same processor + passive-drain calls faust's
own take_events uses): batch size, the window counted from a batch's first record, records
buffered during inference, backpressure, and which references are held until release."""

from __future__ import annotations

import asyncio
import time

import pytest

from emostream.worker.batching import batches


class Message:
    def __init__(self, offset: int, timestamp: float = 0.0):
        self.value, self.key, self.topic, self.partition, self.offset = b"x", None, "t", 0, offset
        self.timestamp = timestamp  # seconds since the epoch, as faust gives it; 0: none
        self.refs = 1  # the stream's own reference
        self.committable = False

    def incref(self):
        self.refs += 1

    def decref(self):
        self.refs -= 1
        self.committable = self.refs == 0


class Event:
    def __init__(self, offset: int, timestamp: float = 0.0):
        self.message = Message(offset, timestamp)
        self.value = offset

    def ack(self):
        self.message.decref()


class Stream:
    """What batches() touches on a faust Stream."""

    def __init__(self):
        self.processors = []
        self.should_stop = False
        self.enable_acks = True
        self.current_event = None
        self.channel = self
        self.passive = False

    def __aiter__(self):
        return self

    async def __anext__(self):  # the passive drain is not simulated: deliver() plays it
        raise StopAsyncIteration

    def add_processor(self, p):
        self.processors.append(p)

    def _enable_passive(self, channel):
        self.passive = True

    async def wait(self, *events, timeout=None):
        await asyncio.wait_for(events[0].wait(), timeout)

    async def wait_for_stopped(self, event, timeout=None):
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self.should_stop

    async def ack(self, event):
        event.ack()

    async def deliver(self, offset: int, produced_s_ago: float | None = None) -> Event:
        event = Event(offset, 0.0 if produced_s_ago is None else time.time() - produced_s_ago)
        self.current_event = event
        for p in self.processors:
            await p(event.value)
        return event


async def _next(gen, timeout=5.0):
    return await asyncio.wait_for(gen.__anext__(), timeout)


async def started(s: Stream) -> None:
    """Let the generator run up to its first wait (it registers its processor on the way)."""
    for _ in range(100):
        if s.processors:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("batches() never registered its processor")


async def opened(batch_max: int, window_s: float):
    """A stand-in stream, batches() over it, and the agent's first request for a batch (pending)."""
    s = Stream()
    gen = batches(s, batch_max, window_s=window_s)
    first = asyncio.ensure_future(_next(gen))
    await started(s)
    return s, gen, first


def run(coro):
    return asyncio.run(coro)


def test_a_full_batch_goes_at_once_and_holds_its_offsets_until_release():
    async def main():
        s, gen, first = await opened(3, 60.0)
        assert s.passive and s.enable_acks is False
        events = [await s.deliver(i) for i in range(3)]
        batch = await first  # full: no 60 s window
        assert [m.offset for m in batch.messages] == [0, 1, 2]
        assert not any(e.message.committable for e in events)  # handed out, not yet published
        batch.release()
        assert all(e.message.committable for e in events)
        await gen.aclose()
    run(main())


def test_a_partial_batch_closes_one_window_after_its_first_record():
    async def main():
        s, gen, nxt = await opened(100, 0.05)
        await s.deliver(0)
        await s.deliver(1)
        batch = await nxt
        assert [m.offset for m in batch.messages] == [0, 1]
        await gen.aclose()
    run(main())


def test_records_arriving_during_inference_are_buffered_and_an_overdue_batch_goes_at_once():
    async def main():
        s, gen, nxt = await opened(2, 0.05)
        await s.deliver(0)
        await s.deliver(1)
        await nxt  # the agent now "infers" this batch; meanwhile a record arrives
        await s.deliver(2)
        await asyncio.sleep(0.1)  # longer than the window: the record is already overdue
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        batch = await _next(gen)
        assert [m.offset for m in batch.messages] == [2]
        assert loop.time() - t0 < 0.05  # taken without waiting another window
        await gen.aclose()
    run(main())


def test_a_full_buffer_stops_the_stream_until_the_batch_is_taken():
    async def main():
        s, gen, nxt = await opened(2, 0.3)
        for i in range(2):
            await s.deliver(i)
        batch = await nxt
        assert [m.offset for m in batch.messages] == [0, 1]
        for i in range(2, 4):  # the agent is busy with the batch: the buffer fills again
            await s.deliver(i)
        fifth = asyncio.ensure_future(s.deliver(4))
        await asyncio.sleep(0.05)
        assert not fifth.done()  # backpressure: the processor waits, so faust's fetcher does too
        batch = await _next(gen)
        assert [m.offset for m in batch.messages] == [2, 3]
        await asyncio.wait_for(fifth, 5)
        assert [m.offset for m in (await _next(gen)).messages] == [4]
        await gen.aclose()
    run(main())


def test_buffered_records_never_handed_out_stay_uncommitted():
    async def main():
        s, gen, nxt = await opened(10, 60.0)
        event = await s.deliver(0)
        nxt.cancel()  # the agent stops before the window closed
        with pytest.raises(asyncio.CancelledError):
            await nxt
        assert not event.message.committable
    run(main())


def test_window_zero_hands_out_whatever_has_arrived():
    """Continuous batching: no wait for more records once the agent asks."""
    async def main():
        s, gen, nxt = await opened(100, 0.0)
        await s.deliver(0)
        batch = await nxt
        assert [m.offset for m in batch.messages] == [0]
        for i in (1, 2, 3):  # arrive while the agent is busy: one batch when it asks again
            await s.deliver(i)
        assert [m.offset for m in (await _next(gen)).messages] == [1, 2, 3]
        await gen.aclose()
    run(main())


def test_the_window_counts_from_when_the_oldest_record_was_produced():
    """Time already spent in the broker (a held fetch, lag) comes off the window: a record produced
    59.9 s ago does not wait a 60 s window again; one produced just now does."""
    async def main():
        s, gen, nxt = await opened(100, 60.0)
        await s.deliver(0, produced_s_ago=0.0)
        await asyncio.sleep(0.05)
        assert not nxt.done()  # a fresh record: its window is still open
        await s.deliver(1, produced_s_ago=59.9)  # older, arriving later: the batch is due sooner
        batch = await nxt
        assert [m.offset for m in batch.messages] == [0, 1]
        await gen.aclose()
    run(main())


def test_a_timestamp_in_the_future_counts_as_arrival():
    """A producer clock an hour ahead must not hold a batch an hour: the window then runs from arrival."""
    async def main():
        s, gen, nxt = await opened(100, 0.05)
        await s.deliver(0, produced_s_ago=-3600.0)
        batch = await nxt  # _next gives up after 5 s
        assert [m.offset for m in batch.messages] == [0]
        await gen.aclose()
    run(main())
