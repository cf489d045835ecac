"""Shared fixtures: brokers of both engines, worker processes, and Kafka helpers.

Every test that takes the ``broker`` (or ``engine``) fixture runs twice: on the embedded Tansu
broker and on Apache Kafka (:mod:`emostream.worker.kafka_broker`). Tests marked ``kafka`` need
Apache Kafka itself (transactions, durability, replication). ``--engine tansu`` / ``--engine
kafka`` picks one. Without Java 17 (or without Maven before the jars are cached) the Kafka tier
is left out with one loud line — unless ``EMOSTREAM_REQUIRE_KAFKA=1`` (CI), where a Kafka that
cannot start fails the run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest

from emostream.worker.broker import ENGINES, make_broker
from emostream.worker.kafka_io import consume, ensure_topics, produce
from emostream.worker.settings import Settings, child_env, worker_command

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


REQUIRE_KAFKA = os.environ.get("EMOSTREAM_REQUIRE_KAFKA") == "1"


def kafka_unavailable() -> str | None:
    """Why the Apache Kafka tier cannot run on this machine (None: it can)."""
    from emostream.worker.kafka_broker import KAFKA_VERSION, default_cache_dir, java_major

    java = shutil.which("java")
    major = java_major(java) if java else None
    if not major or major < 17:
        return f"Java 17+ not found ({'java ' + str(major) if major else 'no java on PATH'})"
    if not (default_cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs" / ".complete").is_file() and not shutil.which("mvn"):
        return "Maven (mvn) not found to fetch the Kafka jars"
    return None


def engine_of(item) -> str | None:
    """The broker engine a collected test runs on (None: no broker)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "engine" in callspec.params:
        return callspec.params["engine"]
    return "kafka" if item.get_closest_marker("kafka") else None


def pytest_addoption(parser):
    parser.addoption("--engine", action="append", choices=ENGINES,
                     help="run the broker and fault groups on this engine only (repeatable; default: both)")


def pytest_collection_modifyitems(config, items):
    engines = config.getoption("--engine") or list(ENGINES)
    reason = kafka_unavailable() if "kafka" in engines and not REQUIRE_KAFKA else None
    keep, drop = [], []
    for item in items:
        e = engine_of(item)
        (drop if e is not None and (e not in engines or (e == "kafka" and reason)) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if reason:
        config._kafka_left_out = (reason, sum(1 for i in drop if engine_of(i) == "kafka"))


def pytest_terminal_summary(terminalreporter, config):
    left = getattr(config, "_kafka_left_out", None)
    if left:
        terminalreporter.write_line(f"APACHE KAFKA TIER NOT RUN: {left[1]} tests left out: {left[0]}. Install OpenJDK 17 "
                                    "and Maven to run it (CI sets EMOSTREAM_REQUIRE_KAFKA=1 and fails instead).",
                                    red=True, bold=True)


@pytest.fixture(scope="session", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def broker(engine, tmp_path_factory):
    """One broker of ``engine`` for the whole session (tests keep apart by unique topic names)."""
    log = tmp_path_factory.mktemp(f"broker-{engine}") / f"{engine}.log"
    with make_broker(engine, log_path=log) as b:
        yield b


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """A single-node Apache Kafka for the whole session (tests marked ``kafka``)."""
    log = tmp_path_factory.mktemp("kafka") / "kafka.log"
    with make_broker("kafka", log_path=log) as b:
        yield b


@pytest.fixture
def new_broker(engine, tmp_path):
    """Start-your-own brokers of ``engine`` (outage tests); Kafka keeps its data in tmp_path, so
    one made again on the same port comes back with it. All are killed at the end."""
    made = []

    def make(port: int | None = None, nodes: int = 1):
        n = len(made)
        data = tmp_path / "kafka-data" if engine == "kafka" else None
        b = make_broker(engine, port=port, data_dir=data, nodes=nodes, log_path=tmp_path / f"{engine}-{n}.log")
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop(kill=True)


class Topics:
    """Unique topic and group names for one test, so tests never see each other's records."""

    def __init__(self, broker, partitions: int = 4, create: bool = True, **overrides):
        tag = uuid.uuid4().hex[:8]
        overrides.setdefault("metrics_port", 0)  # several workers per test: no fixed port
        overrides.setdefault("session_timeout_s", 10)
        overrides.setdefault("commit_interval_s", 0.5)
        self.settings = Settings.from_env(
            environ={},
            broker=broker.url,
            input_topic=f"in-{tag}",
            output_topic=f"out-{tag}",
            dlq_topic=f"dlq-{tag}",
            group_id=f"g-{tag}",
            partitions=partitions,
            **overrides,
        )
        if create:
            asyncio.run(ensure_topics(self.settings, [self.settings.input_topic, self.settings.output_topic,
                                                      self.settings.dlq_topic]))

    def env(self, **extra) -> dict[str, str]:
        return child_env(self.settings, **extra)

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
    def __init__(self, env: dict[str, str], log_path: Path, cmd: list[str] | None = None):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd or worker_command(), env=env,
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
