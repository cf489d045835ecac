"""The faust app: take a batch, run the pipeline off the event loop, publish, release offsets.

Nothing else happens here. Offsets advance only through faust's acknowledgements, and a batch's
events are released (batching.Batch.release) only after every output, dead-letter and alert
record of the batch has been acknowledged by the broker (``publish`` awaits each delivery). So a
commit never covers an unpublished record (at-least-once). A publish that fails is retried
(``on_broker_loss=retry``) or ends the process with a non-zero code (``exit``); it is never
skipped. With ``delivery=exactly_once`` the records and offsets commit in one Kafka transaction
per input partition instead (transactions.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import faust
from mode import CrashingSupervisor

from .batching import Batch, batches
from .health import HealthServer
from .metrics import Metrics
from .pipeline import BatchResult, Enricher, Outgoing
from .settings import Settings
from .transactions import TransactionalPublisher, producer_factory

log = logging.getLogger("emostream.worker")

EXIT_BROKER_LOST = 3
EXIT_PUBLISH_FAILED = 4


class ExitRequest:
    """A shutdown with a non-zero exit code, asked for from inside the running app.

    The worker is stopped like on SIGTERM (so nothing unpublished is committed); if that hangs
    on a dead broker, the process exits hard after ``grace_s`` — still safe, because offsets of
    unpublished records were never committed.
    """

    def __init__(self, grace_s: float = 20.0):
        self.code = 0
        self.grace_s = grace_s

    def __call__(self, code: int, reason: str) -> None:
        if self.code:
            return
        self.code = code
        log.error("stopping the worker with exit code %d: %s", code, reason)
        timer = threading.Timer(self.grace_s, os._exit, [code])
        timer.daemon = True
        timer.start()
        os.kill(os.getpid(), signal.SIGTERM)


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


async def send_all(producer, topic: str, records: Sequence[Outgoing]) -> None:
    """Send all records, then wait until the broker has acknowledged every one (raises if any fails)."""
    futures = [await producer.send(topic, r.key, r.value, None, None, None) for r in records]
    if futures:
        await asyncio.gather(*futures)


async def _unless_stopped(awaitable, publisher: asyncio.Task) -> None:
    """Await ``awaitable``, but raise what stopped the publisher task if it ends first (it never
    ends on its own: waiting on a queue it no longer serves would hang)."""
    fut = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({fut, publisher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not fut.done():
            fut.cancel()
    if publisher.done():
        publisher.result()  # raises what stopped it
        raise RuntimeError("the publisher stopped")


async def broker_reachable(servers: Sequence[str], timeout: float = 2.0) -> bool:
    """True when a TCP connection to any bootstrap server opens."""
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
            writer.close()
            return True
        except (OSError, asyncio.TimeoutError, ValueError):
            continue
    return False


def set_fetch_max_wait(ms: int, exactly_once: bool = False) -> None:
    """Make faust's consumers use ``fetch_max_wait_ms=ms`` in this process; with ``exactly_once``
    also read_committed, and leave committing offsets to the transactions.

    faust-streaming hard-codes 1500 ms when it builds its aiokafka consumer. Real Kafka answers a
    waiting fetch as soon as data arrives, but a broker that holds the fetch (Tansu) adds up to that
    wait to a record's latency; `emostream bench` measured p99 ≈ 1.1 s at half capacity with it.
    faust also sets the isolation level from its own processing guarantee, which we do not use
    for exactly-once (see transactions.py). And faust commits the offsets of acknowledged records
    on a timer: under exactly-once that second writer races the transactions' offset commits, and
    a late plain commit moved a partition's offset back (64 duplicates after kill -9 on Apache
    Kafka, tests/test_kafka.py), so there the consumer's own commit does nothing.
    """
    import aiokafka

    base = getattr(aiokafka.AIOKafkaConsumer, "_emostream_base", aiokafka.AIOKafkaConsumer)

    class Consumer(base):  # type: ignore[misc, valid-type]
        _emostream_base = base

        def __init__(self, *args, **kwargs):
            kwargs["fetch_max_wait_ms"] = ms
            if exactly_once:
                kwargs["isolation_level"] = "read_committed"
            super().__init__(*args, **kwargs)

        async def commit(self, offsets=None):
            if exactly_once:
                return  # the transaction of each batch commits its input offset (transactions.py)
            return await super().commit(offsets)

    aiokafka.AIOKafkaConsumer = Consumer


def faust_config(settings: Settings, datadir: str | None = None) -> dict:
    """faust.App keyword arguments for a stateless, at-least-once worker (shared with the naive agent)."""
    return dict(
        broker=settings.broker,
        broker_credentials=broker_credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",  # stateless: no tables, no changelogs
        datadir=datadir or tempfile.mkdtemp(prefix="emostream-faust-"),  # faust wants one; we keep nothing
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        broker_commit_interval=settings.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_request_timeout=settings.publish_timeout_s,
        producer_max_request_size=settings.max_request_bytes,
        stream_buffer_maxsize=settings.buffer_max,
        processing_guarantee="at_least_once",
        web_enabled=False,
    )


def create_app(settings: Settings, enricher: Enricher, exit_request: ExitRequest | None = None,
               metrics: Metrics | None = None, health: HealthServer | None = None, reloader=None,
               datadir: str | None = None) -> faust.App:
    """The faust app around one Enricher; metrics, health and reloading are optional collaborators."""
    exit_request = exit_request or ExitRequest()
    metrics = metrics or Metrics()
    exactly_once = settings.delivery == "exactly_once"
    set_fetch_max_wait(settings.fetch_max_wait_ms, exactly_once=exactly_once)
    app = faust.App(settings.group_id, **faust_config(settings, datadir), agent_supervisor=CrashingSupervisor)
    source = app.topic(settings.input_topic, key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw")
    in_flight_max = settings.batches_in_flight if settings.publish_overlap else 1
    executor = ThreadPoolExecutor(max_workers=in_flight_max, thread_name_prefix="emostream-infer")
    app.emostream_executor = executor  # type: ignore[attr-defined]
    broker_down_since: list[float | None] = [None]
    txn = TransactionalPublisher(producer_factory(settings), settings.group_id, settings.output_topic,
                                 settings.dlq_topic, settings.alerts_topic) if exactly_once else None

    async def publish(batch, result: BatchResult) -> None:
        """Publish a batch's records; retry or exit on failure, never return without publishing."""
        delay = 0.5
        done: set = set()  # exactly_once: partitions whose transaction already committed
        while True:
            try:
                if settings.fault_publish_delay_ms:
                    await asyncio.sleep(settings.fault_publish_delay_ms / 1000)
                if txn is not None:
                    await txn.publish(batch, result, done)
                    return
                await send_all(app.producer, settings.output_topic, result.outputs)
                await send_all(app.producer, settings.dlq_topic, result.dead_letters)
                await send_all(app.producer, settings.alerts_topic, result.alerts)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every publish failure is handled the same way
                metrics.publish_failed()
                if settings.on_broker_loss == "exit":
                    exit_request(EXIT_PUBLISH_FAILED, f"publishing a batch of {result.size} failed: {exc!r}")
                    await asyncio.Event().wait()  # never ack this batch; shutdown cancels us
                log.error("publishing a batch of %d failed (%r); retrying in %.1f s — nothing is committed "
                          "until it succeeds (at_least_once: records already sent may be duplicated)", result.size, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def finish(batch: Batch, result: BatchResult, batch_id: int) -> None:
        """After the broker acknowledged a batch's records: release its offsets, count it."""
        batch.release()
        metrics.observe_batch(result, time.time())
        if enricher.cache is not None:
            metrics.sync_cache(enricher.cache_stats())
        if result.alerts:
            metrics.observe_alerts(result.alerts_fired.elements())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch of %d: %d out, %d dead-lettered, %d alerts, %.1f ms inference, partitions %s",
                      result.size, len(result.outputs), len(result.dead_letters), len(result.alerts),
                      result.inference_s * 1000, sorted({m.partition for m in batch.messages}),
                      extra={"batch_id": batch_id, "size": result.size, "out": len(result.outputs),
                             "dlq": len(result.dead_letters), "alerts": len(result.alerts),
                             "inference_ms": round(result.inference_s * 1000, 1)})

    @app.agent(source, name="enrich")
    async def enrich(stream) -> None:
        """Batch → inference (executor threads) → publish in batch order → release offsets.

        Up to ``batches_in_flight`` batches are inferred at once while a publisher task publishes
        finished ones strictly in batch order; a batch's offsets are released only once all its
        records are acknowledged. Memory stays bounded: at most ``batches_in_flight`` inferring
        plus as many waiting for the publisher. ``publish_overlap=false``: one batch at a time.
        """
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(in_flight_max)
        ready: asyncio.Queue = asyncio.Queue(maxsize=in_flight_max)

        async def publisher() -> None:
            while True:
                batch, batch_id, inferred = await ready.get()
                try:
                    result: BatchResult = await inferred
                    await publish(batch.messages, result)
                    finish(batch, result, batch_id)
                finally:
                    ready.task_done()

        publishing = asyncio.create_task(publisher())
        batch_id = 0
        try:
            taking = batches(stream, settings.batch_max, settings.batch_window_s).__aiter__()
            while True:
                # A free inference slot first, then the batch: what waited meanwhile joins it, and
                # with batch_window_ms=0 a batch is whatever arrived by the time a slot is free.
                await slots.acquire()
                try:
                    batch = await taking.__anext__()
                except StopAsyncIteration:
                    slots.release()
                    break
                batch_id += 1
                inferred = loop.run_in_executor(executor, enricher, batch.messages)
                inferred.add_done_callback(lambda _: slots.release())
                await _unless_stopped(ready.put((batch, batch_id, inferred)), publishing)
                if not settings.publish_overlap:
                    await _unless_stopped(ready.join(), publishing)
            await _unless_stopped(ready.join(), publishing)
        finally:
            if not publishing.done():
                # Shutting down: give batches already inferred a moment to be published (their
                # offsets are then committed, fewer duplicates for the next owner), else drop
                # them unreleased — they are read again, never lost.
                try:
                    await asyncio.wait_for(asyncio.shield(_unless_stopped(ready.join(), publishing)), timeout=5.0)
                except BaseException:  # noqa: BLE001 - cancelled or timed out: nothing was released
                    pass
                publishing.cancel()

    def _count_assigned() -> int:
        try:
            return sum(1 for tp in app.consumer.assignment() if tp.topic == settings.input_topic)
        except Exception:  # noqa: BLE001 - consumer not started yet
            return 0

    @app.on_rebalance_complete.connect
    async def _rebalanced(sender, **kwargs) -> None:
        n = _count_assigned()
        if health is not None:
            health.set_partitions(n)
        else:
            metrics.set_partitions(n)
        log.info("Worker ready: %d partition(s) of %s assigned", n, settings.input_topic,
                 extra={"partitions": n})

    @app.on_partitions_revoked.connect
    async def _revoked(sender, revoked, **kwargs) -> None:
        if health is not None:
            health.set_partitions(0)
        if txn is not None:
            await txn.on_revoked(revoked)

    if txn is not None:
        @app.on_partitions_assigned.connect
        async def _assigned(sender, assigned, **kwargs) -> None:
            await txn.on_assigned(assigned)

        @app.on_before_shutdown.connect
        async def _stop_transactions(sender, **kwargs) -> None:
            await txn.stop()

    if reloader is not None:
        @app.task
        async def _install_reload() -> None:
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGHUP, lambda: reloader.request("SIGHUP"))
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
                pass

        @app.timer(interval=max(settings.reload_poll_s, 0.5) if settings.reload_poll_s else 1.0)
        async def _reload() -> None:
            """Swap the model on the inference thread, between two batches — never inside one."""
            if not reloader.due():
                return
            loop = asyncio.get_running_loop()
            new_model = await loop.run_in_executor(None, reloader.load)
            if new_model is not None:
                await loop.run_in_executor(executor, enricher.swap_model, new_model)
                metrics.set_model(new_model.info)
                log.warning("model reloaded: %s", new_model.info, extra={"model": new_model.info})

    @app.timer(interval=2.0)
    async def watch_broker() -> None:
        """Say when the broker goes away and comes back; apply on_broker_loss=exit."""
        up = await broker_reachable(settings.bootstrap_servers)
        now = time.monotonic()
        since = broker_down_since[0]
        if up:
            if since is not None:
                log.warning("broker %s reachable again after %.0f s", settings.broker, now - since)
            broker_down_since[0] = None
            return
        if since is None:
            broker_down_since[0] = since = now
            log.error("broker %s unreachable (policy on_broker_loss=%s); consuming and publishing are paused, "
                      "nothing unpublished is committed", settings.broker, settings.on_broker_loss)
        elif int(now - since) % 10 < 2:
            log.error("broker %s unreachable for %.0f s", settings.broker, now - since)
        if settings.on_broker_loss == "exit" and now - since >= settings.broker_loss_exit_s:
            exit_request(EXIT_BROKER_LOST, f"broker unreachable for {now - since:.0f} s")

    return app
