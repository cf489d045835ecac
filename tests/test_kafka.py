"""Proofs only a real Apache Kafka allows: exactly-once through crashes and a zombie, durability
across a broker crash, leader fail-over in a three-node cluster, scale-out — with real processes.

Accounting is by Kafka key (tests/accounting.py). Exactly-once outputs are read with
``isolation_level=read_committed``, as a downstream consumer must.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import threading
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from emostream.worker.broker import free_port, make_broker
from emostream.worker.kafka_io import client_kwargs

from accounting import end_offsets_total, produce_records, wait_all_accounted, wait_for_outputs
from conftest import Topics
from group import assigned_by_process, wait_for_group

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.kafka]


def assigned(worker) -> int | None:
    """Partitions the worker holds now, from its latest "Worker ready" line (None: none yet)."""
    return assigned_by_process(worker.output()).get(worker.proc.pid)


def wait_until(condition, timeout: float, what: str, workers=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for w in workers:
            assert w.proc.poll() is None, f"worker died while waiting for {what}:\n{w.output()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def kill_after_more_outputs(t: Topics, w, rng: random.Random) -> None:
    """SIGKILL the worker after a random 300-3,000 further outputs: a kill mid-stream on any machine."""
    target = end_offsets_total(t, t.settings.output_topic) + rng.randint(300, 3000)
    wait_for_outputs(t, target, timeout=180)
    w.stop(signal.SIGKILL)


# -- 1. exactly-once through three kill -9 ---------------------------------------------------
def test_exactly_once_survives_three_kill9_without_duplicates(kafka, start_worker):
    seed = int(os.environ.get("FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    t = Topics(kafka, partitions=4, delivery="exactly_once")
    n = 20_000
    keys = produce_records(t, n)
    w = start_worker(t)
    for _ in range(3):
        assert w.wait_for_log("Worker ready", 120), w.output()[-3000:]
        kill_after_more_outputs(t, w, rng)
        w = start_worker(t)
    outs, dlq = wait_all_accounted(t, set(keys), timeout=400, workers=[w], read_committed=True)
    missing = set(keys) - set(outs) - set(dlq)
    assert not missing, f"{len(missing)} records lost (seed {seed})"
    assert not dlq, f"unexpected dead letters: {list(dlq.items())[:5]}"
    duplicates = len(outs) - len(set(outs))
    assert duplicates == 0, f"{duplicates} duplicates in the read_committed output (seed {seed})"
    uncommitted = end_offsets_total(t, t.settings.output_topic) - len(outs)
    print(f"seed {seed}: 0 duplicates; {uncommitted} aborted records and transaction markers were never visible")
    assert w.stop() == 0


# -- 2. a zombie is fenced -------------------------------------------------------------------
def test_exactly_once_fences_a_zombie(kafka, start_worker):
    """SIGSTOP one of two workers until its partitions move, then SIGCONT it: whatever it had in
    flight must not become visible (its producers were fenced by the new owner)."""
    t = Topics(kafka, partitions=4, delivery="exactly_once", session_timeout_s=6)
    zombie, survivor = start_worker(t), start_worker(t)
    wait_for_group([zombie, survivor], members=2, partitions=4, timeout=120)
    n = 12_000
    keys = produce_records(t, n)
    wait_for_outputs(t, 1000, timeout=180)
    os.kill(zombie.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: assigned(survivor) == 4, 90, "the zombie's partitions to move", [survivor])
        wait_for_outputs(t, end_offsets_total(t, t.settings.output_topic) + 500, timeout=120)
    finally:
        os.kill(zombie.proc.pid, signal.SIGCONT)
    outs, dlq = wait_all_accounted(t, set(keys), timeout=300, workers=[survivor], read_committed=True)
    assert not set(keys) - set(outs) - set(dlq), "records lost"
    duplicates = len(outs) - len(set(outs))
    assert duplicates == 0, f"{duplicates} duplicates after the zombie woke up"
    assert re.search(r"fenced|no longer assigned", zombie.output()), \
        "the zombie should have found its in-flight batch fenced or no longer its own:\n" + zombie.output()[-3000:]
    for w in (zombie, survivor):
        w.stop()


# -- 3. at-least-once across a broker crash ----------------------------------------------------
def test_broker_crash_and_restart_on_its_data_loses_nothing(tmp_path, start_worker):
    port = free_port()
    data = tmp_path / "kafka-data"
    b = make_broker("kafka", port=port, data_dir=data, log_path=tmp_path / "kafka-1.log").start()
    try:
        t = Topics(b, partitions=4)
        n = 12_000
        keys = produce_records(t, n)
        w = start_worker(t)
        wait_for_outputs(t, 1500, timeout=180)
        b.stop(kill=True)
        assert w.wait_for_log("unreachable", 60), w.output()[-3000:]
        b = make_broker("kafka", port=port, data_dir=data, log_path=tmp_path / "kafka-2.log").start()
        outs, dlq = wait_all_accounted(t, set(keys), timeout=300, workers=[w])
        assert not set(keys) - set(outs) - set(dlq), "records lost across the broker crash"
        assert "reachable again" in w.output()
        assert w.stop() == 0, "the worker carried on without a restart and stops cleanly"
    finally:
        b.stop(kill=True)


# -- 4. leader fail-over in a three-node cluster ----------------------------------------------
def create_led_by(t: Topics, leader: int, nodes: int = 3) -> None:
    """The test's input, output and dead-letter topics with ``leader`` first in every replica list
    (its preferred leader), so one kill takes down the leader of both ends of the stream."""
    replicas = [leader] + [i for i in range(1, nodes + 1) if i != leader]

    async def run():
        admin = AIOKafkaAdminClient(**client_kwargs(t.settings))
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, num_partitions=-1, replication_factor=-1,
                                                replica_assignments={p: replicas for p in range(t.settings.partitions)})
                                       for name in (t.settings.input_topic, t.settings.output_topic,
                                                    t.settings.dlq_topic)])
        finally:
            await admin.close()

    asyncio.run(run())


def leaders(t: Topics, topic: str) -> set[int]:
    """The node ids leading the topic's partitions now."""
    async def run():
        c = AIOKafkaConsumer(**client_kwargs(t.settings))
        await c.start()
        try:
            await c._client.force_metadata_update()
            cluster = c._client.cluster
            return {cluster.leader_for_partition(TopicPartition(topic, p)) for p in cluster.partitions_for_topic(topic)}
        finally:
            await c.stop()

    return asyncio.run(run())


class ArrivalClock(threading.Thread):
    """Reads the output topic as it grows and keeps each record's arrival time, to measure a stall."""

    def __init__(self, t: Topics):
        super().__init__(daemon=True)
        self.t, self.times, self.stop_event = t, [], threading.Event()

    def run(self) -> None:
        async def read():
            c = AIOKafkaConsumer(self.t.settings.output_topic, auto_offset_reset="earliest",
                                 **client_kwargs(self.t.settings))
            await c.start()
            try:
                while not self.stop_event.is_set():
                    for recs in (await c.getmany(timeout_ms=100)).values():
                        self.times.extend([time.monotonic()] * len(recs))
            finally:
                await c.stop()

        asyncio.run(read())

    def longest_gap(self, after: float) -> float:
        ts = [x for x in self.times if x >= after - 5]
        return max((b - a for a, b in zip(ts, ts[1:])), default=0.0)


def test_three_nodes_leader_killed_mid_stream_loses_nothing(tmp_path, start_worker):
    cluster = make_broker("kafka", nodes=3, log_path=tmp_path / "kafka.log").start()
    try:
        leader = 2
        t = Topics(cluster, partitions=2, replication_factor=3, create=False)
        create_led_by(t, leader)
        n = 12_000
        keys = produce_records(t, n)
        clock = ArrivalClock(t)
        clock.start()
        w = start_worker(t)
        wait_for_outputs(t, 2000, timeout=180)
        assert leaders(t, t.settings.input_topic) == leaders(t, t.settings.output_topic) == {leader}
        killed_at = time.monotonic()
        cluster.node(leader).stop(kill=True)
        outs, dlq = wait_all_accounted(t, set(keys), timeout=300, workers=[w])
        clock.stop_event.set()
        assert not set(keys) - set(outs) - set(dlq), "records lost when the leader died"
        stall = clock.longest_gap(killed_at)
        print(f"leader node {leader} killed: longest stall without output {stall:.1f} s; "
              f"{len(outs) - len(set(outs))} duplicates")
        assert w.proc.poll() is None, "the worker carries on without a restart"
        assert w.stop() == 0
    finally:
        cluster.stop(kill=True)


# -- 5. scale out and back in on Kafka ---------------------------------------------------------
def test_scale_out_and_in_mid_stream_loses_nothing(kafka, start_worker):
    t = Topics(kafka, partitions=4)
    n = 20_000
    keys = produce_records(t, n)
    first = start_worker(t)
    wait_for_outputs(t, 1000, timeout=180)
    second = start_worker(t)
    wait_until(lambda: (assigned(second) or 0) > 0, 120, "the second worker to get partitions", [first, second])
    done = wait_for_outputs(t, end_offsets_total(t, t.settings.output_topic) + 1000, timeout=180)
    assert done < n, "scaling back in must land mid-stream"
    assert second.stop(signal.SIGTERM) == 0
    outs, dlq = wait_all_accounted(t, set(keys), timeout=300, workers=[first])
    assert not set(keys) - set(outs) - set(dlq), "records lost while scaling"
    assert first.stop() == 0
