"""Publishing a batch: one interface, an at-least-once and an exactly-once implementation.

The app calls ``await publisher.publish(messages, result)`` for each batch, in batch order, and
releases the batch's input offsets only once it returns. Which guarantee stands behind the call
is chosen once, from ``settings.delivery`` (:func:`make_publisher`) — the way quixstreams keeps
both behind one checkpoint object:

* :class:`AtLeastOncePublisher` sends every output, dead-letter and alert record of the batch
  and waits until the broker has acknowledged each one; faust commits the offsets afterwards.
  A crash between the two repeats the batch (same record ids).
* :class:`~emostream.worker.transactions.ExactlyOncePublisher` commits each input partition's
  records together with that partition's next offset in one Kafka transaction.

Both share the failure policy of :meth:`Publisher.publish`: a failed publish is counted, then
retried with backoff (``on_broker_loss=retry``; what an earlier try committed is not sent again)
or it ends the process with exit code 4 (``exit``). It never returns without having published.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any, Awaitable, Callable, Iterable, Sequence

from .decode import RawMessage
from .metrics import Metrics
from .pipeline import BatchResult, Outgoing
from .settings import Settings

log = logging.getLogger("emostream.worker")

EXIT_PUBLISH_FAILED = 4

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0


class Publisher(ABC):
    """Puts a batch's records on the broker; the retry / exit policy is the same for every guarantee."""

    retry_note = ""  # what a retry means for duplicates, in the failure's log line

    def __init__(self, settings: Settings, metrics: Metrics, exit_with: Callable[[int, str], None],
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        self.settings = settings
        self.metrics = metrics
        self.exit_with = exit_with  # stops the process with a code (Shutdown.stop)
        self.sleep = sleep

    async def publish(self, messages: Sequence[RawMessage], result: BatchResult) -> None:
        """Publish every output, dead-letter and alert record of the batch ``messages`` gave ``result``.

        Returns once all are acknowledged (committed, exactly-once). On failure: count it, then
        retry with backoff, or stop the process (``on_broker_loss=exit``) and never return.
        """
        delay = RETRY_FIRST_S
        progress: set = set()  # kept across the tries of this batch (see _publish_once)
        while True:
            try:
                if self.settings.fault_publish_delay_ms:
                    await self.sleep(self.settings.fault_publish_delay_ms / 1000)
                await self._publish_once(messages, result, progress)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every publish failure is handled the same way
                self.metrics.publish_failed()
                if self.settings.on_broker_loss == "exit":
                    self.exit_with(EXIT_PUBLISH_FAILED, f"publishing a batch of {result.size} failed: {exc!r}")
                    await asyncio.Event().wait()  # never return (so never release); shutdown cancels us
                log.error("publishing a batch of %d failed (%r); retrying in %.1f s — nothing is committed "
                          "until it succeeds%s", result.size, exc, delay, self.retry_note)
                await self.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    @abstractmethod
    async def _publish_once(self, messages: Sequence[RawMessage], result: BatchResult, progress: set) -> None:
        """One try; raises if any record was not acknowledged. ``progress`` starts empty for a batch
        and is handed to every retry of it: an implementation records there what is durable
        already and so need not be sent again."""

    async def on_assigned(self, partitions: Iterable) -> None:
        """Input partitions were assigned to this worker."""

    async def on_revoked(self, partitions: Iterable) -> None:
        """Input partitions were taken from this worker."""

    async def stop(self) -> None:
        """The worker is shutting down."""


class AtLeastOncePublisher(Publisher):
    """Sends a batch's records on the app's producer and waits for every acknowledgement.

    ``producer`` returns faust's producer (created when the app starts). A retry sends the whole
    batch again: records acknowledged before the failure are then duplicated, never lost.
    """

    retry_note = " (at_least_once: records already sent may be duplicated)"

    def __init__(self, producer: Callable[[], Any], settings: Settings, metrics: Metrics,
                 exit_with: Callable[[int, str], None], sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        super().__init__(settings, metrics, exit_with, sleep)
        self.producer = producer

    async def _publish_once(self, messages: Sequence[RawMessage], result: BatchResult, progress: set) -> None:
        producer = self.producer()
        s = self.settings
        for topic, records in ((s.output_topic, result.outputs), (s.dlq_topic, result.dead_letters),
                               (s.alerts_topic, result.alerts)):
            await send_all(producer, topic, records)


async def send_all(producer, topic: str, records: Sequence[Outgoing]) -> None:
    """Send all records, then wait until the broker has acknowledged every one (raises if any fails)."""
    futures = [await producer.send(topic, r.key, r.value, None, None, None) for r in records]
    if futures:
        await asyncio.gather(*futures)


def make_publisher(settings: Settings, producer: Callable[[], Any], metrics: Metrics,
                   exit_with: Callable[[int, str], None]) -> Publisher:
    """The publisher for ``settings.delivery``: chosen once, used the same way by the app."""
    if settings.delivery == "exactly_once":
        from .transactions import ExactlyOncePublisher, producer_factory

        return ExactlyOncePublisher(producer_factory(settings), settings, metrics, exit_with)
    return AtLeastOncePublisher(producer, settings, metrics, exit_with)
