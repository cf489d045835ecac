"""The faust app: take a batch, run the pipeline off the event loop, publish, acknowledge.

Nothing else happens here. Offsets advance only through faust's acknowledgements, and
``take_events`` acknowledges a batch only after this agent's loop body has returned for it — by
then every output and dead-letter record of the batch has been acknowledged by the broker
(``_publish`` awaits each delivery). So a commit never covers an unpublished record
(at-least-once). Any error while publishing crashes the worker (``CrashingSupervisor``) instead
of skipping the batch: a supervisor restarts it and the uncommitted records are read again.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import faust
from mode import CrashingSupervisor

from .batching import batches
from .pipeline import BatchResult, Enricher, Outgoing
from .settings import Settings

log = logging.getLogger("emostream.worker")


def broker_credentials(settings: Settings):
    """faust credentials object for SASL / SSL, or None for PLAINTEXT."""
    proto = settings.security_protocol
    ctx = None
    if "SSL" in proto:
        ctx = ssl.create_default_context(cafile=settings.ssl_cafile or None)
        if settings.ssl_certfile:
            ctx.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile or None, settings.ssl_key_password or None)
    if proto.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username, password=settings.sasl_password,
            mechanism=settings.sasl_mechanism, ssl_context=ctx,
        )
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


async def _publish(producer, topic: str, records: Sequence[Outgoing]) -> None:
    """Send all records, then wait until the broker has acknowledged every one (raises if any fails)."""
    futures = [await producer.send(topic, r.key, r.value, None, None, None) for r in records]
    if futures:
        await asyncio.gather(*futures)


def create_app(settings: Settings, enricher: Enricher) -> faust.App:
    app = faust.App(
        settings.group_id,
        broker=settings.broker,
        broker_credentials=broker_credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",  # stateless: no tables, no changelogs
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        broker_commit_interval=settings.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        processing_guarantee="at_least_once",
        web_enabled=False,
        agent_supervisor=CrashingSupervisor,
    )
    source = app.topic(settings.input_topic, key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw")
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emostream-infer")
    app.emostream_executor = executor  # type: ignore[attr-defined]

    @app.agent(source, name="enrich")
    async def enrich(stream) -> None:
        loop = asyncio.get_running_loop()
        async for batch in batches(stream, settings.batch_max, settings.batch_window_s):
            result: BatchResult = await loop.run_in_executor(executor, enricher, batch)
            await _publish(app.producer, settings.output_topic, result.outputs)
            await _publish(app.producer, settings.dlq_topic, result.dead_letters)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("batch of %d: %d out, %d dead-lettered, %.1f ms inference, partitions %s", result.size,
                          len(result.outputs), len(result.dead_letters), result.inference_s * 1000,
                          sorted({m.partition for m in batch}))
            # Leaving the loop body lets take_events ack these events; commit follows.

    return app
