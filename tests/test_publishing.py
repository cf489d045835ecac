"""The at-least-once publisher and the failure policy both publishers share, without a broker.

``FakeProducer`` has faust's producer ``send`` (returns a future the broker resolves on its ack);
the test resolves or fails each ack itself, so "publish returns only after every ack" is checked
as an order of events, not a timing.
"""

from __future__ import annotations

import asyncio

import pytest

from emostream.worker.decode import RawMessage
from emostream.worker.metrics import Metrics
from emostream.worker.pipeline import BatchResult, Outgoing
from emostream.worker.publishing import EXIT_PUBLISH_FAILED, AtLeastOncePublisher, make_publisher
from emostream.worker.settings import Settings
from emostream.worker.transactions import ExactlyOncePublisher


class FakeProducer:
    """faust's producer.send: returns a future per record; acks are given by the test (or at once)."""

    def __init__(self, auto_ack: bool = True):
        self.auto_ack = auto_ack
        self.sent: list[tuple[str, bytes]] = []
        self.pending: list[asyncio.Future] = []
        self.fail_next: Exception | None = None

    async def send(self, topic, key, value, partition, timestamp, headers):
        fut = asyncio.get_running_loop().create_future()
        self.sent.append((topic, value))
        if self.fail_next is not None:
            fut.set_exception(self.fail_next)
            self.fail_next = None
        elif self.auto_ack:
            fut.set_result(None)
        else:
            self.pending.append(fut)
        return fut


def result_of(n_out: int, n_dlq: int = 0, n_alerts: int = 0) -> tuple[list[RawMessage], BatchResult]:
    msgs = [RawMessage(b"{}", None, "in", 0, i, None) for i in range(n_out + n_dlq)]

    def out(i, kind):
        return Outgoing(None, f"{kind}-{i}".encode(), str(i), msgs[i])

    result = BatchResult(outputs=[out(i, "out") for i in range(n_out)],
                         dead_letters=[out(n_out + i, "dlq") for i in range(n_dlq)],
                         alerts=[out(i, "alert") for i in range(n_alerts)], size=len(msgs))
    return msgs, result


def settings(**kw) -> Settings:
    return Settings.from_env(environ={}, output_topic="out", dlq_topic="dlq", alerts_topic="alerts", **kw)


class Sleeps:
    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class Exits:
    def __init__(self):
        self.calls: list[tuple[int, str]] = []

    def __call__(self, code: int, reason: str) -> None:
        self.calls.append((code, reason))


async def until(condition, steps: int = 1000) -> None:
    """Let the loop run (no clock involved) until ``condition()`` holds."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def idle(steps: int = 50) -> None:
    """Let every runnable task run: afterwards, what is still waiting waits for something else."""
    for _ in range(steps):
        await asyncio.sleep(0)


def at_least_once(producer: FakeProducer, **kw) -> tuple[AtLeastOncePublisher, Sleeps, Exits]:
    sleeps, exits = Sleeps(), Exits()
    return AtLeastOncePublisher(lambda: producer, settings(**kw), Metrics(), exits, sleep=sleeps), sleeps, exits


def test_every_record_goes_to_its_topic():
    producer = FakeProducer()
    pub, sleeps, exits = at_least_once(producer)
    msgs, result = result_of(3, n_dlq=2, n_alerts=1)
    asyncio.run(pub.publish(msgs, result))
    assert producer.sent == [("out", b"out-0"), ("out", b"out-1"), ("out", b"out-2"),
                             ("dlq", b"dlq-3"), ("dlq", b"dlq-4"), ("alerts", b"alert-0")]
    assert sleeps.delays == [] and exits.calls == []


def test_publish_returns_only_after_every_ack():
    producer = FakeProducer(auto_ack=False)
    pub, _, _ = at_least_once(producer)
    msgs, result = result_of(3)

    async def scenario():
        publishing = asyncio.create_task(pub.publish(msgs, result))
        await until(lambda: len(producer.pending) == 3)  # all three sent, none acknowledged
        for fut in producer.pending[:2]:
            fut.set_result(None)
        await idle()
        assert not publishing.done()  # one ack still missing: the batch is not done
        producer.pending[2].set_result(None)
        await publishing

    asyncio.run(scenario())


def test_a_failed_publish_is_counted_and_retried_whole_with_backoff():
    producer = FakeProducer()
    producer.fail_next = ConnectionError("broker gone")
    pub, sleeps, exits = at_least_once(producer)
    msgs, result = result_of(2)
    asyncio.run(pub.publish(msgs, result))
    # the failed try sent both records; the retry sends both again (a duplicate, never a loss)
    assert producer.sent == [("out", b"out-0"), ("out", b"out-1"), ("out", b"out-0"), ("out", b"out-1")]
    assert sleeps.delays == [0.5]
    assert pub.metrics.value("emostream_publish_failures_total") == 1
    assert exits.calls == []


def test_backoff_doubles_up_to_its_cap():
    class Flaky(FakeProducer):
        """Fails the first seven sends."""

        failures = 7

        async def send(self, *args):
            if self.failures:
                self.failures -= 1
                self.fail_next = ConnectionError("still gone")
            return await super().send(*args)

    pub, sleeps, _ = at_least_once(Flaky())
    asyncio.run(pub.publish(*result_of(1)))
    assert sleeps.delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_on_broker_loss_exit_stops_the_process_and_never_returns():
    producer = FakeProducer()
    producer.fail_next = ConnectionError("broker gone")
    pub, sleeps, exits = at_least_once(producer, on_broker_loss="exit")
    msgs, result = result_of(1)

    async def scenario():
        publishing = asyncio.create_task(pub.publish(msgs, result))
        await until(lambda: exits.calls)
        await idle()
        assert not publishing.done()  # waits for the shutdown, so the batch is never released
        publishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await publishing

    asyncio.run(scenario())
    (code, reason), = exits.calls
    assert code == EXIT_PUBLISH_FAILED and "broker gone" in reason
    assert sleeps.delays == [] and len(producer.sent) == 1  # no retry


def test_the_delivery_setting_chooses_the_publisher():
    producer = FakeProducer()
    alo = make_publisher(settings(), lambda: producer, Metrics(), Exits())
    eos = make_publisher(settings(delivery="exactly_once"), lambda: producer, Metrics(), Exits())
    assert type(alo) is AtLeastOncePublisher and type(eos) is ExactlyOncePublisher
