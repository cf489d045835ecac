"""delivery=exactly_once: the transactional publisher against a broker model, and refusal on Tansu.

The embedded broker has no transactions, so the publisher's protocol (one transaction per input
partition holding its records and its next offset; abort and retry without resending committed
partitions; fencing when a partition moves) is checked against ``FakeCluster``, a small model of
Kafka's transaction semantics: records and offsets become visible only at commit, and starting a
producer with a transactional id fences the previous producer with that id. The publisher is
driven through the interface the app uses for both guarantees (``publish(messages, result)``,
retries included; see test_publishing.py for the at-least-once side).
"""

from __future__ import annotations

import asyncio
import signal

import orjson
import pytest
from aiokafka.errors import KafkaConnectionError, ProducerFenced
from aiokafka.structs import TopicPartition

from emostream.worker.decode import RawMessage
from emostream.worker.metrics import Metrics
from emostream.worker.pipeline import BatchResult, Outgoing
from emostream.worker.settings import Settings
from emostream.worker.transactions import (ExactlyOncePublisher, TransactionsUnsupported, probe,
                                           producer_factory)

GROUP = "g"
SETTINGS = Settings.from_env(environ={}, group_id=GROUP, output_topic="out", dlq_topic="dlq", alerts_topic="alerts",
                             delivery="exactly_once")


class FakeCluster:
    def __init__(self):
        self.visible: dict[str, list[bytes]] = {}
        self.offsets: dict[tuple[str, TopicPartition], int] = {}
        self.epochs: dict[str, int] = {}
        self.fail_sends_containing: bytes | None = None
        self.transactions = 0
        self.aborts = 0

    def producer(self, tid: str) -> "FakeProducer":
        return FakeProducer(self, tid)


class FakeProducer:
    def __init__(self, cluster: FakeCluster, tid: str):
        self.cluster, self.tid, self.epoch = cluster, tid, None
        self.pending: list[tuple[str, bytes]] | None = None
        self.pending_offsets: dict = {}
        self.stopped = False

    async def start(self):
        self.epoch = self.cluster.epochs[self.tid] = self.cluster.epochs.get(self.tid, 0) + 1

    async def stop(self):
        self.stopped = True

    def _check(self):
        if self.cluster.epochs[self.tid] != self.epoch:
            raise ProducerFenced()

    async def begin_transaction(self):
        self._check()
        assert self.pending is None, "transaction already open"
        self.pending, self.pending_offsets = [], {}

    async def send(self, topic, value, key=None):
        assert self.pending is not None, "send outside a transaction"
        fut = asyncio.get_running_loop().create_future()
        if self.cluster.fail_sends_containing and self.cluster.fail_sends_containing in value:
            fut.set_exception(KafkaConnectionError("injected"))
        else:
            self.pending.append((topic, value))
            fut.set_result(None)
        return fut

    async def send_offsets_to_transaction(self, offsets, group_id):
        self._check()
        self.pending_offsets.update({(group_id, tp): off for tp, off in offsets.items()})

    async def commit_transaction(self):
        self._check()
        for topic, value in self.pending:
            self.cluster.visible.setdefault(topic, []).append(value)
        self.cluster.offsets.update(self.pending_offsets)
        self.cluster.transactions += 1
        self.pending = None

    async def abort_transaction(self):
        self._check()
        self.cluster.aborts += 1
        self.pending = None


def batch_of(spec: dict[int, list[int]], topic: str = "in") -> tuple[list[RawMessage], BatchResult]:
    """Messages at the given partition → offsets; each gets an output, every third a dead letter instead,
    and offset 0 of each partition also an alert."""
    msgs, result = [], BatchResult()
    for p, offsets in spec.items():
        for off in offsets:
            m = RawMessage(value=orjson.dumps({"text": f"t{p}-{off}"}), key=None, topic=topic, partition=p,
                           offset=off, timestamp=None)
            msgs.append(m)
            value = orjson.dumps({"id": f"{topic}-{p}-{off}"})
            (result.dead_letters if off % 3 == 2 else result.outputs).append(Outgoing(None, value, None, m))
            if off == 0:
                result.alerts.append(Outgoing(None, value, None, m))
    result.size = len(msgs)
    return msgs, result


class Retries:
    """The publisher's sleep between tries: counts them and lets the test act before the next one."""

    def __init__(self, before_retry=None):
        self.delays: list[float] = []
        self.before_retry = before_retry

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.before_retry is not None:
            self.before_retry()


def no_exit(code: int, reason: str) -> None:
    raise AssertionError(f"the publisher asked to exit ({code}): {reason}")


def publisher(cluster: FakeCluster, sleep=None) -> ExactlyOncePublisher:
    return ExactlyOncePublisher(cluster.producer, SETTINGS, Metrics(), exit_with=no_exit, sleep=sleep or Retries())


def ids(values: list[bytes]) -> list[str]:
    return sorted(orjson.loads(v)["id"] for v in values)


def test_one_transaction_per_partition_with_records_and_next_offset():
    cluster = FakeCluster()
    pub = publisher(cluster)
    msgs, result = batch_of({0: [0, 1, 2, 3], 3: [7, 8]})
    asyncio.run(pub.publish(msgs, result))
    assert cluster.transactions == 2 and cluster.aborts == 0
    assert cluster.offsets == {(GROUP, TopicPartition("in", 0)): 4, (GROUP, TopicPartition("in", 3)): 9}
    assert ids(cluster.visible["out"]) == ["in-0-0", "in-0-1", "in-0-3", "in-3-7"]
    assert ids(cluster.visible["dlq"]) == ["in-0-2", "in-3-8"]
    assert ids(cluster.visible["alerts"]) == ["in-0-0"]
    assert set(cluster.epochs) == {"g-in-0", "g-in-3"}  # one transactional id per input partition


def test_failed_partition_is_aborted_and_retry_does_not_resend_committed_partitions():
    cluster = FakeCluster()
    msgs, result = batch_of({0: [0, 1], 1: [10, 11], 2: [20]})
    cluster.fail_sends_containing = b"in-1-11"
    seen_on_retry = []

    def broker_back():  # the first try failed on partition 1: what is visible now, then heal
        seen_on_retry.append((cluster.aborts, dict(cluster.offsets), list(cluster.visible.get("out", []))))
        cluster.fail_sends_containing = None

    retries = Retries(before_retry=broker_back)
    pub = publisher(cluster, retries)
    asyncio.run(pub.publish(msgs, result))
    assert retries.delays == [0.5]  # one failed try, retried after the first backoff
    assert pub.metrics.value("emostream_publish_failures_total") == 1
    aborts, offsets, out = seen_on_retry[0]
    assert aborts == 1
    assert (GROUP, TopicPartition("in", 1)) not in offsets  # nothing of partition 1 was visible
    assert not any(b"in-1-" in v for v in out)
    every = cluster.visible["out"] + cluster.visible["dlq"]
    assert ids(every) == ["in-0-0", "in-0-1", "in-1-10", "in-1-11", "in-2-20"]  # each exactly once
    assert cluster.transactions == 3  # partition 0 was not committed a second time by the retry
    assert cluster.offsets[(GROUP, TopicPartition("in", 1))] == 12
    assert cluster.offsets[(GROUP, TopicPartition("in", 2))] == 21


def test_fenced_partition_is_left_to_its_new_owner():
    cluster = FakeCluster()
    old, new = publisher(cluster), publisher(cluster)
    first, r1 = batch_of({0: [0], 1: [5]})
    asyncio.run(old.publish(first, r1))

    # Partition 1 moves to the new worker, whose producer fences the zombie's.
    moved, r2 = batch_of({1: [6, 7]})
    asyncio.run(new.publish(moved, r2))

    late, r3 = batch_of({0: [1], 1: [6, 7]})  # the zombie still had a batch in flight
    asyncio.run(old.publish(late, r3))  # returns: a fenced partition is skipped, not retried
    assert old.fenced == {TopicPartition("in", 1)}
    # in-1-6 and in-1-7 once each (from `new`); the zombie's copies never became visible
    assert ids(cluster.visible["out"]) == ["in-0-0", "in-0-1", "in-1-6", "in-1-7"]
    assert ids(cluster.visible["dlq"]) == ["in-1-5"]
    assert cluster.offsets[(GROUP, TopicPartition("in", 1))] == 8
    assert TopicPartition("in", 1) not in old.producers
    # Fenced stays fenced until the partition is assigned to us again.
    before = cluster.transactions
    asyncio.run(old.publish(late, r3))
    assert cluster.transactions == before + 1  # partition 0 only
    asyncio.run(old.on_assigned([TopicPartition("in", 1)]))
    assert TopicPartition("in", 1) not in old.fenced


def test_revoked_partitions_stop_their_producers():
    cluster = FakeCluster()
    pub = publisher(cluster)
    msgs, result = batch_of({0: [0], 1: [0]})
    asyncio.run(pub.publish(msgs, result))
    p1 = pub.producers[TopicPartition("in", 1)]
    asyncio.run(pub.on_revoked({TopicPartition("in", 1)}))
    assert p1.stopped and set(pub.producers) == {TopicPartition("in", 0)}
    asyncio.run(pub.stop())
    assert not pub.producers


@pytest.mark.broker
def test_probe_finds_transactions_on_kafka_and_none_on_the_embedded_broker(engine, topics):
    check = probe(producer_factory(topics.settings), f"probe-{topics.settings.group_id}", timeout_s=20)
    if engine == "kafka":
        asyncio.run(check)  # no exception: Apache Kafka has transactions
    else:
        with pytest.raises(TransactionsUnsupported):
            asyncio.run(check)


@pytest.mark.broker
def test_worker_runs_exactly_once_only_where_the_broker_has_transactions(engine, topics, start_worker):
    w = start_worker(topics, delivery="exactly_once")
    if engine == "kafka":
        assert w.wait_for_log("Worker ready", 120), w.output()[-3000:]
        topics.produce([b'{"id": "a", "text": "so happy for you"}'], keys=[b"a"])
        assert [o["id"] for o in topics.outputs(1)] == ["a"]
        assert w.stop(signal.SIGTERM) == 0
        return
    assert w.proc.wait(120) == 2
    out = w.output()
    assert "delivery=exactly_once needs a broker with transactions" in out
    assert w.stop(signal.SIGTERM) == 2


def test_a_partition_no_longer_assigned_is_left_to_its_new_owner():
    cluster = FakeCluster()
    pub = publisher(cluster)
    asyncio.run(pub.on_assigned({TopicPartition("in", 0), TopicPartition("in", 1)}))
    asyncio.run(pub.on_revoked({TopicPartition("in", 1)}))  # moved while a batch of it was inferred
    msgs, result = batch_of({0: [0], 1: [0]})
    asyncio.run(pub.publish(msgs, result))
    assert set(cluster.epochs) == {"g-in-0"}  # no producer for partition 1: the new owner's is not fenced
    assert ids(cluster.visible["out"]) == ["in-0-0"]
    assert (GROUP, TopicPartition("in", 1)) not in cluster.offsets
