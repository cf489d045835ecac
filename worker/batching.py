"""Batches from a faust stream: close at ``batch_max`` records or after ``batch_window`` seconds.

faust's ``take_events`` disables per-event acks and acknowledges a batch's events only when the
consumer asks for the next batch, which is what makes "commit after publish" hold (see app.py).
"""

from __future__ import annotations

from typing import AsyncIterator

from .decode import RawMessage


def to_raw(event) -> RawMessage:
    m = event.message
    return RawMessage(value=m.value, key=m.key, topic=m.topic, partition=m.partition, offset=m.offset,
                      timestamp=m.timestamp)


async def batches(stream, batch_max: int, window_s: float) -> AsyncIterator[list[RawMessage]]:
    """Yield lists of at most ``batch_max`` raw messages; a partial batch waits at most ``window_s``."""
    async for events in stream.take_events(batch_max, within=window_s):
        yield [to_raw(e) for e in events]
