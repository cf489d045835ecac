"""BrokerWatch: the broker-loss log lines and ``on_broker_loss=exit``, on a fake clock."""

from __future__ import annotations

import asyncio
import logging

from emostream.worker.app import EXIT_BROKER_LOST, BrokerWatch
from emostream.worker.settings import Settings


class World:
    def __init__(self):
        self.now = 0.0
        self.up = True
        self.exits: list[tuple[int, str]] = []

    async def reachable(self) -> bool:
        return self.up

    def watch(self, **kw) -> BrokerWatch:
        settings = Settings.from_env(environ={}, **kw)
        return BrokerWatch(settings, lambda code, reason: self.exits.append((code, reason)),
                           reachable=self.reachable, clock=lambda: self.now)

    def check_every(self, watch: BrokerWatch, seconds: float, step: float = 2.0) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            asyncio.run(watch.check())


def test_retry_policy_logs_loss_and_return_but_never_exits(caplog):
    world = World()
    watch = world.watch(on_broker_loss="retry")
    caplog.set_level(logging.WARNING, "emostream.worker")
    world.check_every(watch, 4)
    assert watch.down_since is None and not caplog.records
    world.up = False
    world.check_every(watch, 300)
    assert world.exits == []
    assert any("unreachable (policy on_broker_loss=retry)" in r.getMessage() for r in caplog.records)
    world.up = True
    world.check_every(watch, 2)
    assert watch.down_since is None
    assert "reachable again after 300 s" in caplog.records[-1].getMessage()


def test_exit_policy_exits_once_the_broker_was_gone_long_enough():
    world = World()
    watch = world.watch(on_broker_loss="exit", broker_loss_exit_s=60)
    world.up = False
    world.check_every(watch, 60)  # first seen down at t=2: 58 s at t=60
    assert world.exits == []
    world.check_every(watch, 2)
    assert world.exits and world.exits[0][0] == EXIT_BROKER_LOST
    assert "unreachable for 60 s" in world.exits[0][1]


def test_a_short_outage_resets_the_exit_clock():
    world = World()
    watch = world.watch(on_broker_loss="exit", broker_loss_exit_s=60)
    world.up = False
    world.check_every(watch, 50)
    world.up = True
    world.check_every(watch, 2)
    world.up = False
    world.check_every(watch, 50)
    assert world.exits == []
