"""Exactly-once publishing for real Kafka (``delivery=exactly_once``).

The at-least-once worker publishes a batch, waits for the acks, then lets faust commit the input
offsets — a crash between the two repeats the batch. Here the records of each input partition and
that partition's next offset go into **one Kafka transaction** instead: either the enriched /
dead-letter / alert records become visible *and* the input offset moves, or neither happens.
Consumers of the output topics must read with ``isolation_level=read_committed``
(``emostream consume --read-committed``).

Zombie fencing is the classic one-producer-per-input-partition scheme: the transactional id is
``{group}-{topic}-{partition}``, so when a partition moves to another worker, that worker's producer
fences ours and a late commit from us fails with ``ProducerFenced`` — we then drop the partition's
records instead of retrying (the new owner reprocesses them from the last committed offset).

Needs brokers with transactions (Kafka ≥ 2.5); the embedded Tansu broker has none, so the worker
refuses to start with this setting against it (``probe``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any, Awaitable, Callable, Iterable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import ProducerFenced
from aiokafka.structs import TopicPartition

from .decode import RawMessage
from .kafka_io import client_kwargs
from .metrics import Metrics
from .pipeline import BatchResult, Outgoing
from .publishing import Publisher
from .settings import Settings

log = logging.getLogger("emostream.worker")

ProducerFactory = Callable[[str], AIOKafkaProducer]


class TransactionsUnsupported(RuntimeError):
    """The broker refused to start a transactional producer."""


def producer_factory(settings: Settings) -> ProducerFactory:
    """aiokafka transactional producers with the worker's connection and size settings."""

    def make(transactional_id: str) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            transactional_id=transactional_id, enable_idempotence=True, acks="all",
            request_timeout_ms=int(settings.publish_timeout_s * 1000),
            max_request_size=settings.max_request_bytes,
            **client_kwargs(settings),
        )

    return make


async def probe(factory: ProducerFactory, transactional_id: str, timeout_s: float = 30.0) -> None:
    """Start and stop one transactional producer; raise TransactionsUnsupported if the broker cannot."""
    producer = factory(transactional_id)
    try:
        await asyncio.wait_for(producer.start(), timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure here means "no transactions"
        raise TransactionsUnsupported(f"{type(exc).__name__}: {exc}") from exc
    finally:
        try:
            await asyncio.wait_for(producer.stop(), 5)
        except Exception:  # noqa: BLE001 - stopping a producer that never started
            pass


class ExactlyOncePublisher(Publisher):
    """One transactional producer per assigned input partition; one transaction per partition per batch."""

    retry_note = " (exactly_once: partitions already committed are not sent again)"

    def __init__(self, factory: ProducerFactory, settings: Settings, metrics: Metrics,
                 exit_with: Callable[[int, str], None], sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        super().__init__(settings, metrics, exit_with, sleep)
        self.factory = factory
        self.group_id = settings.group_id
        self.topics = (settings.output_topic, settings.dlq_topic, settings.alerts_topic)
        self.producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self.fenced: set[TopicPartition] = set()
        self.assigned: set[TopicPartition] | None = None  # None: not told yet (every partition counts as ours)

    def transactional_id(self, tp: TopicPartition) -> str:
        return f"{self.group_id}-{tp.topic}-{tp.partition}"

    async def _producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        producer = self.producers.get(tp)
        if producer is None:
            producer = self.factory(self.transactional_id(tp))
            await producer.start()  # init_transactions: fences any older producer with this id
            self.producers[tp] = producer
        return producer

    async def _publish_once(self, messages: Sequence[RawMessage], result: BatchResult,
                            progress: set) -> None:
        """Commit each partition's records together with its next input offset.

        ``progress`` holds the partitions whose transaction an earlier try of this batch committed:
        they are not sent again. A partition fenced or no longer assigned (now owned by another
        worker) is skipped and its records left to the new owner. Any other failure aborts the open
        transaction and raises.
        """
        offsets: dict[TopicPartition, int] = {}
        for m in messages:
            tp = TopicPartition(m.topic, m.partition)
            offsets[tp] = max(offsets.get(tp, -1), m.offset + 1)
        records: dict[TopicPartition, list[tuple[str, Outgoing]]] = defaultdict(list)
        for topic, outs in zip(self.topics, (result.outputs, result.dead_letters, result.alerts)):
            for o in outs:
                records[TopicPartition(o.source.topic, o.source.partition)].append((topic, o))
        for tp in sorted(offsets):
            if tp in progress or tp in self.fenced:
                continue
            if self.assigned is not None and tp not in self.assigned:
                # A zombie that wakes up after its partitions moved: starting a producer for tp now
                # would fence the new owner's, and committing would repeat what it already did.
                log.warning("%s is no longer assigned to this worker; its %d record(s) of this batch are left to "
                            "the new owner", tp, len(records.get(tp, ())))
                continue
            try:
                await self._commit(tp, records.get(tp, ()), offsets[tp])
                progress.add(tp)
            except ProducerFenced:
                log.warning("transactional producer for %s was fenced (partition moved to another worker); "
                            "its %d record(s) of this batch are left to the new owner", tp, len(records.get(tp, ())))
                self.fenced.add(tp)
                await self._drop(tp)

    async def _commit(self, tp: TopicPartition, records: Iterable[tuple[str, Outgoing]], next_offset: int) -> None:
        producer = await self._producer(tp)
        await producer.begin_transaction()
        try:
            futures = [await producer.send(topic, o.value, key=o.key) for topic, o in records]
            if futures:
                await asyncio.gather(*futures)
            await producer.send_offsets_to_transaction({tp: next_offset}, self.group_id)
        except BaseException:
            try:
                await producer.abort_transaction()
            except ProducerFenced:
                raise
            except Exception as exc:  # noqa: BLE001 - a producer that cannot abort is rebuilt
                log.warning("aborting the transaction for %s failed (%r); restarting its producer", tp, exc)
                await self._drop(tp)
            raise
        await producer.commit_transaction()

    async def _drop(self, tp: TopicPartition) -> None:
        producer = self.producers.pop(tp, None)
        if producer is not None:
            try:
                await producer.stop()
            except Exception:  # noqa: BLE001 - best effort on a fenced / broken producer
                pass

    async def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """The new assignment. A partition assigned (again) to us starts with a fresh producer,
        which fences any zombie."""
        self.assigned = {TopicPartition(tp.topic, tp.partition) for tp in assigned}
        for tp in self.assigned:
            self.fenced.discard(tp)

    async def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Stop the producers of partitions we no longer own; batches still holding their records
        leave them to the new owner."""
        for tp in list(revoked):
            tp = TopicPartition(tp.topic, tp.partition)
            if self.assigned is not None:
                self.assigned.discard(tp)
            await self._drop(tp)

    async def stop(self) -> None:
        for tp in list(self.producers):
            await self._drop(tp)
