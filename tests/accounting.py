"""Accounting for the fault tests: read everything a worker wrote, by Kafka key.

Every input record of a fault test carries a unique key, which both its enriched record and its
dead-letter record keep; so "lost" and "duplicated" are set arithmetic over keys. With
``read_committed`` only committed transactions count (exactly-once).
"""

from __future__ import annotations

import asyncio
import base64
import time

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from emostream.worker.kafka_io import client_kwargs, consume

from conftest import Topics


def read_all(t: Topics, topic: str, idle_s: float = 3.0, read_committed: bool = False) -> list:
    async def run():
        return [r async for r in consume(t.settings, [topic], None, idle_s, read_committed=read_committed)]

    return asyncio.run(run())


def keys_out(t: Topics, idle_s: float = 3.0, read_committed: bool = False) -> tuple[list[bytes], dict[bytes, str]]:
    """Keys of all enriched records (with repeats), and key → reason of all dead letters."""
    outs = [r.key for r in read_all(t, t.settings.output_topic, idle_s, read_committed)]
    dlq = {}
    for r in read_all(t, t.settings.dlq_topic, 1.0, read_committed):
        d = orjson.loads(r.value)
        dlq[base64.b64decode(d["key"]) if d["key"] else None] = d["error"]["code"]
    return outs, dlq


def wait_all_accounted(t: Topics, keys: set[bytes], timeout: float, workers=(),
                       read_committed: bool = False) -> tuple[list, dict]:
    """Until every key is in the output or the dead-letter topic (or ``timeout``); every worker
    given must stay alive meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        outs, dlq = keys_out(t, 2.0, read_committed)
        missing = keys - set(outs) - set(dlq)
        if not missing or time.monotonic() > deadline:
            return outs, dlq
        for w in workers:
            assert w.proc.poll() is None, f"worker died:\n{w.output()[-3000:]}"
        time.sleep(2)


def committed_offsets(t: Topics) -> dict[int, int]:
    async def run():
        c = AIOKafkaConsumer(group_id=t.settings.group_id, enable_auto_commit=False, **client_kwargs(t.settings))
        await c.start()
        try:
            out = {}
            for p in range(t.settings.partitions):
                off = await c.committed(TopicPartition(t.settings.input_topic, p))
                out[p] = off if off is not None else 0
            return out
        finally:
            await c.stop()

    return asyncio.run(run())


def end_offsets_total(t: Topics, topic: str) -> int:
    """Records in a topic now (a snapshot; consuming would keep reading while the worker writes)."""
    async def run():
        c = AIOKafkaConsumer(**client_kwargs(t.settings))
        await c.start()
        try:
            tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or []]
            if not tps:
                await c._client.force_metadata_update()
                tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or []]
            return sum((await c.end_offsets(tps)).values())
        finally:
            await c.stop()

    return asyncio.run(run())


def wait_for_outputs(t: Topics, at_least: int, timeout: float) -> int:
    """Until the output topic holds at least ``at_least`` records; returns how many it holds."""
    deadline = time.monotonic() + timeout
    while (got := end_offsets_total(t, t.settings.output_topic)) < at_least:
        assert time.monotonic() < deadline, f"only {got} of {at_least} outputs after {timeout:.0f} s"
        time.sleep(0.1)
    return got


def records(n: int, prefix: str = "r", text=None) -> tuple[list[bytes], list[bytes]]:
    keys = [f"{prefix}{i}".encode() for i in range(n)]
    values = [orjson.dumps({"id": f"{prefix}{i}", "text": text or f"post {i}: what a day, honestly"})
              for i in range(n)]
    return keys, values


def produce_records(t: Topics, n: int, prefix: str = "r", text=None) -> list[bytes]:
    """Send ``n`` keyed records (:func:`records`) to the input topic; returns their keys."""
    keys, values = records(n, prefix, text)
    t.produce(values, keys)
    return keys

