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

    python -m emostream.bench.naive_agent
"""

from __future__ import annotations

import logging
import sys

import faust

from emostream.worker.app import faust_config
from emostream.worker.batching import to_raw
from emostream.worker.pipeline import Enricher
from emostream.worker.runner import load_model, wait_for_broker
from emostream.worker.settings import Settings

log = logging.getLogger("emostream.naive")


def create_naive_app(settings: Settings, enricher: Enricher) -> faust.App:
    app = faust.App(settings.group_id, **faust_config(settings))
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


def main() -> int:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    model = load_model(settings)
    if not wait_for_broker(settings):
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
