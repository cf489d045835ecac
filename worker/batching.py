"""Batches from a faust stream: a batch closes at ``batch_max`` records, or ``batch_window`` after
its *first* record arrived — the way Triton's dynamic batcher bounds a request's queue delay.

Why not faust's ``take_events``: its timeout starts when the agent asks for the next batch, and
records arriving while a batch is inferred are held back until then. A record that arrives
during inference so waits for the rest of that inference *and then* a whole window. Here the
buffer keeps filling while a batch is inferred (up to ``batch_max``, then the stream waits:
backpressure), and a batch whose oldest record has already waited its window goes at once.

The window counts from when a record was *produced* (its Kafka timestamp), not from when it
reached the worker: time a record already spent in the broker — a fetch held until data piles
up, a consumer catching up — is part of the same latency budget, so the batch does not add a
whole window on top. A timestamp in the future (producer clock ahead) or missing counts as
arrival; one far in the past (clock behind, or lag) just lets the batch go as soon as asked.

Offsets: ``take_events`` acknowledges a batch when the agent asks for the next one — and also
when the agent is cancelled mid-batch, which would commit records never published. Here every
event is *held* (one extra reference on its message) from the moment it is buffered, and only
:meth:`Batch.release` — called after the batch's records are acknowledged by the broker — drops
the last reference, which is what lets faust commit the offset. Buffered records not yet handed
out are never acknowledged, so a stop or crash leaves them for the next owner (at-least-once).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from .decode import RawMessage


def to_raw(event) -> RawMessage:
    m = event.message
    return RawMessage(value=m.value, key=m.key, topic=m.topic, partition=m.partition, offset=m.offset,
                      timestamp=m.timestamp)


@dataclass
class Batch:
    events: Sequence  # faust events, each holding one extra reference until release()
    messages: list[RawMessage]

    def release(self) -> None:
        """Drop our reference: the stream acknowledged these at hand-out, so faust may now commit them."""
        for event in self.events:
            event.ack()
        self.events = ()


async def batches(stream, batch_max: int, window_s: float) -> AsyncIterator[Batch]:
    """Yield batches of at most ``batch_max`` messages; a batch goes at the latest ``window_s`` after
    its oldest record was produced (0: take whatever has arrived as soon as the agent is free).

    Uses the mechanism of faust's own ``take_events`` (a stream processor fills a buffer while the
    stream is drained passively), with the window and hand-over described in the module docstring.
    """
    loop = asyncio.get_running_loop()
    events: list = []
    due: list[float] = []  # per buffered record (loop clock): its batch goes by then at the latest
    head_due = float("inf")  # the earliest of due[:batch_max], the batch that goes next
    arrived = asyncio.Event()  # a record entered the buffer
    wake = asyncio.Event()  # the buffer is full, or the next batch became due sooner
    room = asyncio.Event()  # the buffer has room again
    room.set()

    def due_by(event) -> float:
        now = loop.time()
        ts = event.message.timestamp
        age = time.time() - ts if ts and ts > 0 else 0.0
        return now + window_s - max(0.0, age)

    async def add_to_buffer(value):
        while len(events) >= batch_max:  # backpressure: the stream (and faust's fetcher) wait
            room.clear()
            await stream.wait(room)
            if stream.should_stop:
                return value
        event = stream.current_event
        if event is None:
            raise RuntimeError("batching: the stream has no current event")
        nonlocal head_due
        event.message.incref()  # held until Batch.release
        events.append(event)
        due.append(due_by(event))
        arrived.set()
        if len(events) <= batch_max and due[-1] < head_due:
            head_due = due[-1]
            wake.set()
        if len(events) >= batch_max:
            wake.set()
        return value

    stream.enable_acks = False  # acknowledged below at hand-out; committed only at release
    stream.add_processor(add_to_buffer)
    stream._enable_passive(aiter(stream.channel))
    while not stream.should_stop:
        if not events:
            arrived.clear()
            await stream.wait_for_stopped(arrived)
            continue
        left = head_due - loop.time()
        if len(events) < batch_max and left > 0:
            wake.clear()
            await stream.wait_for_stopped(wake, timeout=left)
            continue
        taken = events[:batch_max]
        del events[:len(taken)], due[:len(taken)]
        head_due = min(due[:batch_max], default=float("inf"))
        wake.clear()
        room.set()
        for event in taken:
            await stream.ack(event)  # our own reference keeps the offset uncommitted
        yield Batch(taken, [to_raw(e) for e in taken])
