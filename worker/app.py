"""The faust app: take a batch, infer it off the event loop, publish, release its offsets.

The agent is a chain of named steps: :func:`~.batching.batches` → :class:`~.inflight.OrderedInFlight`
(inference on executor threads, up to ``batches_in_flight`` at once, results in batch order) →
:class:`~.publishing.Publisher` (at-least-once or exactly-once, chosen by ``delivery``) → release.
A batch's events are released (:meth:`~.batching.Batch.release`) only after the publisher returned,
that is after every output, dead-letter and alert record of the batch was acknowledged by the
broker (or committed in its transaction), so a commit never covers an unpublished record. A
publish that fails is retried or ends the process with a non-zero code; it is never skipped.

Around the agent: the rebalance hooks (readiness, the publisher's partitions), the event-loop
heartbeat behind ``/healthz``, the broker watch and model reloading.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Sequence

import faust
from mode import CrashingSupervisor

from .batching import Batch, batches
from .inflight import OrderedInFlight
from .kafka_io import faust_credentials
from .metrics import Metrics
from .ops_server import OpsServer
from .pipeline import BatchResult, Enricher
from .publishing import make_publisher
from .settings import Settings

log = logging.getLogger("emostream.worker")

EXIT_BROKER_LOST = 3


class Shutdown:
    """Stops this worker process with a non-zero exit code, asked for from inside the running app.

    :meth:`stop` stops the worker like SIGTERM does (so nothing unpublished is committed); if that
    hangs on a dead broker, the process exits hard after ``grace_s`` — still safe, because offsets
    of unpublished records were never committed. ``code`` is the first code asked for (0: none).
    """

    def __init__(self, grace_s: float = 20.0):
        self.code = 0
        self.grace_s = grace_s

    def stop(self, code: int, reason: str) -> None:
        if self.code:
            return
        self.code = code
        log.error("stopping the worker with exit code %d: %s", code, reason)
        timer = threading.Timer(self.grace_s, os._exit, [code])
        timer.daemon = True
        timer.start()
        os.kill(os.getpid(), signal.SIGTERM)


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


class BrokerWatch:
    """Says when the broker goes away and comes back; applies ``on_broker_loss=exit``.

    faust and aiokafka retry a lost broker on their own, silently; this check (every 2 s) is what
    puts it in the log, and what ends the process after ``broker_loss_exit_s`` when asked to.
    """

    def __init__(self, settings: Settings, exit_with: Callable[[int, str], None],
                 reachable: Callable[[], Awaitable[bool]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.exit_with = exit_with
        self.reachable = reachable or (lambda: broker_reachable(settings.bootstrap_servers))
        self.clock = clock
        self.down_since: float | None = None

    async def check(self) -> None:
        s = self.settings
        up = await self.reachable()
        now = self.clock()
        since = self.down_since
        if up:
            if since is not None:
                log.warning("broker %s reachable again after %.0f s", s.broker, now - since)
            self.down_since = None
            return
        if since is None:
            self.down_since = since = now
            log.error("broker %s unreachable (policy on_broker_loss=%s); consuming and publishing are paused, "
                      "nothing unpublished is committed", s.broker, s.on_broker_loss)
        elif int(now - since) % 10 < 2:
            log.error("broker %s unreachable for %.0f s", s.broker, now - since)
        if s.on_broker_loss == "exit" and now - since >= s.broker_loss_exit_s:
            self.exit_with(EXIT_BROKER_LOST, f"broker unreachable for {now - since:.0f} s")


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
        broker_credentials=faust_credentials(settings),
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


def create_app(settings: Settings, enricher: Enricher, shutdown: Shutdown | None = None,
               metrics: Metrics | None = None, ops: OpsServer | None = None, reloader=None,
               datadir: str | None = None) -> faust.App:
    """The faust app around one Enricher; metrics, the operations server and reloading are optional."""
    shutdown = shutdown or Shutdown()
    metrics = metrics or Metrics()
    set_fetch_max_wait(settings.fetch_max_wait_ms, exactly_once=settings.delivery == "exactly_once")
    app = faust.App(settings.group_id, **faust_config(settings, datadir), agent_supervisor=CrashingSupervisor)
    source = app.topic(settings.input_topic, key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw")
    in_flight = settings.batches_in_flight if settings.publish_overlap else 1
    executor = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="emostream-infer")
    app.emostream_executor = executor  # type: ignore[attr-defined]
    publisher = make_publisher(settings, lambda: app.producer, metrics, shutdown.stop)
    published = 0  # batches published so far: the batch id in debug logs

    def infer(batch: Batch) -> Awaitable[BatchResult]:
        return asyncio.get_running_loop().run_in_executor(executor, enricher, batch.messages)

    async def publish(batch: Batch, result: BatchResult) -> None:
        """Publish (in batch order), then release the batch's offsets and count it."""
        nonlocal published
        await publisher.publish(batch.messages, result)
        batch.release()
        published += 1
        metrics.observe_batch(result, time.time())
        if result.alerts:
            metrics.observe_alerts(result.alerts_fired.elements())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch of %d: %d out, %d dead-lettered, %d alerts, %.1f ms inference, partitions %s",
                      result.size, len(result.outputs), len(result.dead_letters), len(result.alerts),
                      result.inference_s * 1000, sorted({m.partition for m in batch.messages}),
                      extra={"batch_id": published, "size": result.size, "out": len(result.outputs),
                             "dlq": len(result.dead_letters), "alerts": len(result.alerts),
                             "inference_ms": round(result.inference_s * 1000, 1)})

    runner = OrderedInFlight(infer, publish, limit=in_flight, overlap=settings.publish_overlap)

    @app.agent(source, name="enrich")
    async def enrich(stream) -> None:
        """Batches → inference (executor threads, up to batches_in_flight) → publish in order → release."""
        await runner.run(batches(stream, settings.batch_max, settings.batch_window_s))

    def assigned_input_partitions() -> int:
        try:
            return sum(1 for tp in app.consumer.assignment() if tp.topic == settings.input_topic)
        except Exception:  # noqa: BLE001 - consumer not started yet
            return 0

    @app.on_rebalance_complete.connect
    async def _rebalanced(sender, **kwargs) -> None:
        n = assigned_input_partitions()
        if ops is not None:
            ops.set_partitions(n)
        else:
            metrics.set_partitions(n)
        log.info("Worker ready: %d partition(s) of %s assigned", n, settings.input_topic,
                 extra={"partitions": n})

    @app.on_partitions_assigned.connect
    async def _assigned(sender, assigned, **kwargs) -> None:
        await publisher.on_assigned(assigned)

    @app.on_partitions_revoked.connect
    async def _revoked(sender, revoked, **kwargs) -> None:
        if ops is not None:
            ops.set_partitions(0)
        await publisher.on_revoked(revoked)

    @app.on_before_shutdown.connect
    async def _stop_publisher(sender, **kwargs) -> None:
        await publisher.stop()

    if ops is not None:
        @app.task
        async def _heartbeat() -> None:
            """Liveness: /healthz fails when this stops beating (the loop is stuck)."""
            await ops.heartbeat.run()

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
            """Swap the model on the inference threads, between two batches — never inside one."""
            if not reloader.due():
                return
            loop = asyncio.get_running_loop()
            new_model = await loop.run_in_executor(None, reloader.load)
            if new_model is not None:
                await loop.run_in_executor(executor, enricher.swap_model, new_model)
                metrics.set_model(new_model.info)
                log.warning("model reloaded: %s", new_model.info, extra={"model": new_model.info})

    watch = BrokerWatch(settings, shutdown.stop)
    app.timer(interval=2.0, name="watch_broker")(watch.check)
    return app
