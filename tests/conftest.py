"""Shared fixtures: the embedded broker, worker processes, and Kafka helpers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest

from emostream.worker.broker import EmbeddedBroker
from emostream.worker.kafka_io import consume, ensure_topics, produce
from emostream.worker.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


class Topics:
    """Unique topic and group names for one test, so tests never see each other's records."""

    def __init__(self, broker: EmbeddedBroker, partitions: int = 4, **overrides):
        tag = uuid.uuid4().hex[:8]
        overrides.setdefault("metrics_port", 0)  # several workers per test: no fixed port
        self.settings = Settings.from_env(
            environ={},
            broker=broker.url,
            input_topic=f"in-{tag}",
            output_topic=f"out-{tag}",
            dlq_topic=f"dlq-{tag}",
            group_id=f"g-{tag}",
            partitions=partitions,
            session_timeout_s=10,
            commit_interval_s=0.5,
            **overrides,
        )
        asyncio.run(ensure_topics(self.settings, [self.settings.input_topic, self.settings.output_topic,
                                                  self.settings.dlq_topic]))

    def env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMOSTREAM_")}
        env.update(self.settings.as_env())
        for name, value in extra.items():
            env[env_name(name)] = str(value)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def produce(self, values, keys=None) -> int:
        keys = keys or [None] * len(values)
        return asyncio.run(produce(self.settings, self.settings.input_topic, zip(keys, values)))

    def consume(self, topic: str, n: int, timeout: float = 60.0) -> list:
        async def run():
            return [r async for r in consume(self.settings, [topic], n, timeout)]

        return asyncio.run(run())

    def outputs(self, n: int, timeout: float = 60.0) -> list[dict]:
        return [orjson.loads(r.value) for r in self.consume(self.settings.output_topic, n, timeout)]

    def dead_letters(self, n: int, timeout: float = 30.0) -> list[dict]:
        return [orjson.loads(r.value) for r in self.consume(self.settings.dlq_topic, n, timeout)]


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, module_args=("emostream.worker.cli", "worker")):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", *module_args], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.output():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False


@pytest.fixture
def topics(broker):
    return Topics(broker)


@pytest.fixture
def start_worker(tmp_path):
    started: list[WorkerProcess] = []

    def start(t: Topics, **extra) -> WorkerProcess:
        w = WorkerProcess(t.env(**extra), tmp_path / f"worker-{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL if w.proc.poll() is None else signal.SIGTERM)
