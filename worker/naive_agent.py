"""A naive per-message faust agent: the baseline ``emostream bench`` compares the worker with.

One inference per record, the way a first faust agent is usually written::

    async for event in stream.events():
        result = enricher([record])      # model.predict([text]), inline
        await output.send(...)           # then the next record

It reuses :class:`~emostream.worker.pipeline.Enricher` with batches of one, so the work per
record (decode, validate, tokenize, embed, heads, encode) is identical to the batching worker;
only the batching is missing. faust acknowledges each event after the loop body and flushes its
producer before committing, so delivery is at-least-once here too.

Run with the same ``EMOSTREAM_*`` variables as the worker::

    python -m emostream.worker.naive_agent
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import faust

from emostream.models.model import EmotionModel

from .app import broker_credentials
from .batching import to_raw
from .kafka_io import ensure_topics
from .pipeline import Enricher
from .settings import Settings

log = logging.getLogger("emostream.naive")


def create_naive_app(settings: Settings, enricher: Enricher) -> faust.App:
    app = faust.App(
        settings.group_id,
        broker=settings.broker,
        broker_credentials=broker_credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",
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
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(settings.input_topic, **raw)
    output = app.topic(settings.output_topic, **raw)
    dlq = app.topic(settings.dlq_topic, **raw)

    @app.agent(source, name="naive")
    async def naive(stream) -> None:
        async for event in stream.events():
            result = enricher([to_raw(event)])  # one record, one inference, on the event loop
            for out in result.outputs:
                await output.send(key=out.key, value=out.value)
            for dead in result.dead_letters:
                await dlq.send(key=dead.key, value=dead.value)

    return app


def _create_topics(settings: Settings, wait_s: float = 60.0) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            asyncio.run(ensure_topics(settings, [settings.input_topic, settings.output_topic, settings.dlq_topic]))
            return True
        except Exception as exc:  # noqa: BLE001 - broker not answering yet
            if time.monotonic() > deadline:
                log.error("broker %s unreachable: %r", settings.broker, exc)
                return False
            time.sleep(0.5)


def main() -> int:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    providers = [p.strip() for p in settings.providers.split(",") if p.strip()]
    model = EmotionModel.load(settings.model, threads=settings.inference_threads, providers=providers)
    if not _create_topics(settings):
        return 2
    app = create_naive_app(settings, Enricher(model, settings))
    log.warning("emostream naive agent: %s -> %s, group %s, one inference per record",
                settings.input_topic, settings.output_topic, settings.group_id)
    worker = faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
