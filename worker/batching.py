"""Batches from a faust stream: close at ``batch_max`` records or after ``batch_window`` seconds.

faust's ``take_events`` acknowledges a batch's events when the agent asks for the next batch —
and also when the agent is cancelled mid-batch (its ``finally``), which would commit records that
were never published. So every event is *held* here (one extra reference on its message) and only
:meth:`Batch.release` — called after the batch's records are acknowledged by the broker — drops
the last reference, which is what lets faust commit the offset. That also lets the agent ask for
batch N+1 while batch N is still being published (see app.py).
"""

from __future__ import annotations

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
        """Drop our reference: once take_events has let go too, faust may commit these offsets."""
        for event in self.events:
            event.ack()
        self.events = ()


async def batches(stream, batch_max: int, window_s: float) -> AsyncIterator[Batch]:
    """Yield batches of at most ``batch_max`` messages; a partial batch waits at most ``window_s``."""
    async for events in stream.take_events(batch_max, within=window_s):
        for event in events:
            event.message.incref()
        yield Batch(events, [to_raw(e) for e in events])
