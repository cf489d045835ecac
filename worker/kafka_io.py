"""Kafka client configuration (one builder for every client), and plain aiokafka producing and
consuming for the CLI, the demo, the benchmark and the tests."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from .settings import Settings


def client_kwargs(settings: Settings) -> dict:
    """Connection settings shared by every Kafka client (security included), as aiokafka keywords.

    The faust app's credentials are derived from these (:func:`faust_credentials`), so SASL and
    TLS are set up in this one place.
    """
    kw: dict = {"bootstrap_servers": settings.bootstrap_servers, "security_protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL"):
        kw.update(sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username,
                  sasl_plain_password=settings.sasl_password)
    if "SSL" in settings.security_protocol:
        from aiokafka.helpers import create_ssl_context

        kw["ssl_context"] = create_ssl_context(
            cafile=settings.ssl_cafile or None, certfile=settings.ssl_certfile or None,
            keyfile=settings.ssl_keyfile or None, password=settings.ssl_key_password or None,
        )
    return kw


def faust_credentials(settings: Settings):
    """The faust ``broker_credentials`` for :func:`client_kwargs`' security settings; None for PLAINTEXT."""
    import faust

    kw = client_kwargs(settings)
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=kw["sasl_plain_username"], password=kw["sasl_plain_password"],
                                     mechanism=kw["sasl_mechanism"], ssl_context=kw.get("ssl_context"))
    if "ssl_context" in kw:
        return faust.SSLCredentials(kw["ssl_context"])
    return None


async def ensure_topics(settings: Settings, topics: Iterable[str], partitions: int | None = None,
                        configs: dict[str, str] | None = None) -> None:
    """Create the topics that do not exist yet (with topic ``configs``, e.g. max.message.bytes)."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        new = [NewTopic(t, partitions or settings.partitions, settings.replication_factor, topic_configs=configs)
               for t in dict.fromkeys(topics) if t not in existing]
        if new:
            await admin.create_topics(new)
    finally:
        await admin.close()


async def produce(settings: Settings, topic: str, records: Iterable[tuple[bytes | None, bytes]],
                  on_sent=None) -> int:
    """Send (key, value) pairs and wait for every acknowledgement; returns the count."""
    producer = AIOKafkaProducer(acks="all", linger_ms=5, max_request_size=16 * 1024 * 1024,
                                **client_kwargs(settings))
    n = 0
    try:
        await producer.start()
        pending = []
        for key, value in records:
            pending.append(await producer.send(topic, value=value, key=key))
            n += 1
            if on_sent is not None:
                on_sent(n, time.time())
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return n


async def consume(settings: Settings, topics: list[str], max_records: int | None = None,
                  timeout_s: float | None = 10.0, group_id: str | None = None,
                  from_beginning: bool = True, read_committed: bool = False) -> AsyncIterator:
    """Yield ConsumerRecords until max_records are read or nothing arrives for timeout_s."""
    consumer = AIOKafkaConsumer(
        *topics, group_id=group_id, auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=group_id is not None,
        isolation_level="read_committed" if read_committed else "read_uncommitted", **client_kwargs(settings),
    )
    try:
        await consumer.start()
        n = 0
        last = time.monotonic()
        while max_records is None or n < max_records:
            batch = await consumer.getmany(timeout_ms=200, max_records=1000)
            got = False
            for records in batch.values():
                for rec in records:
                    got = True
                    yield rec
                    n += 1
                    if max_records is not None and n >= max_records:
                        return
            if got:
                last = time.monotonic()
            elif timeout_s is not None and time.monotonic() - last > timeout_s:
                return
    finally:
        await consumer.stop()
