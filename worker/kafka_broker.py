"""Apache Kafka on 127.0.0.1 without Docker: the pinned release's jars from Maven Central, run in
KRaft combined mode (each node broker + controller), one node or a three-node cluster.

The same launcher serves ``emostream broker --engine kafka``, the test suite's Kafka tier and
``emostream bench --engine kafka``, so what is tested is what a user runs locally. Its broker
settings (:func:`cluster_properties`) are also what docker-compose.yml's Kafka runs
(a test compares them).

First use fetches the jars with Maven (``mvn dependency:copy-dependencies`` of a small pom) into
``<cache>/kafka-<version>/libs``; Java 17+ and Maven must be on PATH. A node's data lives in
``<data-dir>/node-<id>``; ``<data-dir>/emostream-kafka.json`` keeps the cluster id and controller
ports, so starting again with the same data directory restarts the same cluster with its data.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .broker import BrokerError, free_port, wait_for_port

KAFKA_VERSION = "4.1.2"
LOG4J_VERSION = "2.24.3"
SLF4J_VERSION = "1.7.36"
READY_LINE = "Kafka Server started"

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>emostream</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>{slf4j}</version></dependency>
  </dependencies>
</project>
"""

# INFO keeps the start-up line we wait for; the chattiest loggers are turned down.
LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
"""


def default_cache_dir() -> Path:
    """``$EMOSTREAM_CACHE_DIR`` or ``~/.cache/emostream``."""
    return Path(os.environ.get("EMOSTREAM_CACHE_DIR") or Path.home() / ".cache" / "emostream")


def java_major(java: str) -> int | None:
    """The major version ``java -version`` reports (17 for "17.0.15"), or None if it cannot run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major  # "1.8" is Java 8


def require_java() -> str:
    java = shutil.which("java")
    major = java_major(java) if java else None
    if major is None or major < 17:
        found = f"found Java {major}" if major else "no 'java' on PATH"
        raise BrokerError(f"Apache Kafka {KAFKA_VERSION} needs Java 17 or newer ({found}); install OpenJDK 17, "
                          "or use the embedded broker (--engine tansu)")
    return java


def fetch_jars(cache_dir: Path | None = None, version: str = KAFKA_VERSION, quiet: bool = False) -> Path:
    """``<cache>/kafka-<version>/libs`` with every jar the broker and its storage tool need,
    fetched once with Maven (atomically: an interrupted fetch leaves nothing half-done)."""
    home = (cache_dir or default_cache_dir()) / f"kafka-{version}"
    libs = home / "libs"
    if (libs / ".complete").is_file():
        return libs
    require_java()
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(f"fetching Apache Kafka {version}'s jars needs Maven ('mvn' on PATH) and access to Maven "
                          "Central; install Maven, or use the embedded broker (--engine tansu)")
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=home))
    try:
        (work / "pom.xml").write_text(POM.format(kafka=version, log4j=LOG4J_VERSION, slf4j=SLF4J_VERSION))
        if not quiet:
            print(f"fetching Apache Kafka {version} jars with Maven into {libs} (first use only)", file=sys.stderr)
        cmd = [mvn, "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={work / 'libs'}"]
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            raise BrokerError(f"Maven could not fetch Apache Kafka {version}: " + " | ".join(tail))
        (work / "libs" / ".complete").write_text(version)
        try:
            os.replace(work / "libs", libs)
        except OSError:  # another process finished first
            if not (libs / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (home / "log4j2.properties").write_text(LOG4J2)
    return libs


def new_cluster_id() -> str:
    """A random cluster id the way Kafka's ``Uuid`` prints one (URL-safe base64, no leading '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def cluster_properties(nodes: int = 1) -> dict[str, str]:
    """Broker settings that depend only on the cluster's size (no ports or paths).

    One node: every internal topic at replication 1 with one partition (a single broker could not
    create them otherwise). Three: replication 3 and ``min.insync.replicas=2`` everywhere, and a
    short broker session so a killed node is fenced within seconds.
    """
    rf = str(min(nodes, 3))
    isr = "1" if nodes == 1 else "2"
    props = {
        "process.roles": "broker,controller",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "default.replication.factor": rf,
        "min.insync.replicas": isr,
        "offsets.topic.replication.factor": rf,
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": isr,
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": isr,
        "group.initial.rebalance.delay.ms": "0",
        "log.cleaner.dedupe.buffer.size": "16777216",  # the default takes 128 MiB of heap
    }
    if nodes == 1:
        props |= {"offsets.topic.num.partitions": "1", "transaction.state.log.num.partitions": "1",
                  "share.coordinator.state.topic.num.partitions": "1"}
    else:
        props |= {"broker.session.timeout.ms": "4000", "broker.heartbeat.interval.ms": "500"}
    return props


@dataclass
class KafkaNode:
    """One KRaft node (broker + controller) of a local cluster."""

    node_id: int
    port: int
    controller_port: int
    data_dir: Path
    java: str
    libs: Path
    heap_mb: int
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def properties_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    def write_properties(self, voters: str, common: dict[str, str]) -> None:
        props = dict(common) | {
            "node.id": str(self.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",  # never the controller listener
            "log.dirs": str(self.log_dir),
        }
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def format(self, cluster_id: str) -> None:
        """Format the log directory once (a restart on the same data skips this)."""
        if (self.log_dir / "meta.properties").is_file():
            return
        done = subprocess.run([self.java, "-Xmx256m", "-cp", f"{self.libs}/*", "kafka.tools.StorageTool", "format",
                               "-t", cluster_id, "-c", str(self.properties_path)],
                              capture_output=True, text=True, env=self._env())
        if done.returncode != 0:
            raise BrokerError(f"kafka storage format failed for node {self.node_id}: "
                              + (done.stdout + done.stderr).strip()[-500:])

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("KAFKA_OPTS", None)
        return env

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if wait_for_port("127.0.0.1", self.port, 0.05):
            raise BrokerError(f"port {self.port} is already in use")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = open(self.log_path, "ab")
        cmd = [self.java, f"-Xmx{self.heap_mb}m", f"-Xms{min(self.heap_mb, 128)}m", "-XX:+UseG1GC",
               "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.libs.parent / 'log4j2.properties'}",
               f"-Dkafka.logs.dir={self.data_dir / 'server-logs'}", "-cp", f"{self.libs}/*", "kafka.Kafka",
               str(self.properties_path)]
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self._env(),
                                     start_new_session=True, preexec_fn=_die_with_parent)
        out.close()

    def started(self) -> bool:
        """True once this run of the node has logged that it started (an open port is not enough)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return READY_LINE.encode() in f.read()
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, kill: bool = False, timeout: float = 30.0) -> None:
        """SIGTERM (a controlled shutdown that moves its leaderships) or SIGKILL (a crash)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def _die_with_parent() -> None:
    """Children get SIGKILL when the launching process dies, so no JVM outlives a killed test run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: best effort
        pass


class KafkaCluster:
    """Apache Kafka on 127.0.0.1:port (nodes at port, port+1, …); a context manager.

    ``data_dir`` None: a temporary directory, removed on stop. Given: kept, and starting again
    with it (and the same port) brings back the same cluster with its topics and offsets.
    """

    engine = "kafka"

    def __init__(self, port: int | None = None, nodes: int = 1, data_dir: str | os.PathLike | None = None,
                 cache_dir: Path | None = None, heap_mb: int | None = None, version: str = KAFKA_VERSION,
                 log_path: str | os.PathLike | None = None):
        if nodes < 1:
            raise BrokerError("a Kafka cluster needs at least one node")
        self.nodes_n = nodes
        self.version = version
        self.cache_dir = cache_dir
        self.heap_mb = heap_mb or (512 if nodes == 1 else 320)
        self._tmp = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="emostream-kafka-"))
        self.log_path = Path(log_path) if log_path else None
        self.port = port or self._free_run(nodes)
        self.nodes: list[KafkaNode] = []

    @staticmethod
    def _free_run(n: int) -> int:
        """A port p with p … p+n-1 all free (retrying a few random candidates)."""
        for _ in range(50):
            p = free_port()
            if p + n < 65535 and all(not wait_for_port("127.0.0.1", p + i, 0.01) for i in range(n)):
                return p
        raise BrokerError(f"no run of {n} free ports found")

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{self.port + i}" for i in range(self.nodes_n)]

    @property
    def address(self) -> str:
        return ",".join(self.addresses)

    @property
    def url(self) -> str:
        """faust's broker URL (several servers separated by ';')."""
        return "kafka://" + ";".join(self.addresses)

    def _layout(self) -> tuple[str, list[int]]:
        """(cluster id, controller ports), created once per data directory and kept in it."""
        meta = self.data_dir / "emostream-kafka.json"
        if meta.is_file():
            m = json.loads(meta.read_text())
            if m.get("nodes") != self.nodes_n:
                raise BrokerError(f"{self.data_dir} holds a {m.get('nodes')}-node cluster, not {self.nodes_n}")
            return m["cluster_id"], m["controller_ports"]
        used = set(range(self.port, self.port + self.nodes_n))
        ports: list[int] = []
        while len(ports) < self.nodes_n:
            p = free_port()
            if p not in used and p not in ports:
                ports.append(p)
        cid = new_cluster_id()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"cluster_id": cid, "nodes": self.nodes_n, "controller_ports": ports,
                                    "version": self.version}))
        return cid, ports

    def start(self, timeout: float = 180.0) -> "KafkaCluster":
        java = require_java()
        libs = fetch_jars(self.cache_dir, self.version)
        cluster_id, cports = self._layout()
        voters = ",".join(f"{i + 1}@127.0.0.1:{cports[i]}" for i in range(self.nodes_n))
        common = cluster_properties(self.nodes_n)
        self.nodes = []
        for i in range(self.nodes_n):
            node_dir = self.data_dir / f"node-{i + 1}"
            log = Path(self.log_path) if self.log_path and self.nodes_n == 1 else \
                (Path(f"{self.log_path}.node{i + 1}") if self.log_path else node_dir / "kafka.log")
            node = KafkaNode(i + 1, self.port + i, cports[i], node_dir, java, libs, self.heap_mb, log)
            node.write_properties(voters, common)
            node.format(cluster_id)
            self.nodes.append(node)
        for node in self.nodes:  # all at once: a quorum of controllers must come up together
            node.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop(kill=True)
            raise
        return self

    def wait_ready(self, timeout: float = 180.0, nodes: list[KafkaNode] | None = None) -> None:
        """Until every (given) node logged its start and the cluster answers a metadata request
        listing all live brokers."""
        deadline = time.monotonic() + timeout
        waiting = list(nodes or self.nodes)
        while waiting:
            for node in list(waiting):
                if not node.alive():
                    raise BrokerError(f"Kafka node {node.node_id} exited during start-up; log: {node.log_path}\n"
                                      + _tail(node.log_path))
                if node.started():
                    waiting.remove(node)
            if waiting and time.monotonic() > deadline:
                raise BrokerError(f"Kafka nodes {[n.node_id for n in waiting]} did not start within {timeout:.0f}s; "
                                  f"log: {waiting[0].log_path}\n" + _tail(waiting[0].log_path))
            time.sleep(0.2)
        want = sum(1 for n in self.nodes if n.alive())
        while True:
            if self.brokers_registered() >= want:
                return
            if time.monotonic() > deadline:
                raise BrokerError(f"Kafka did not answer metadata requests with {want} brokers within {timeout:.0f}s")
            time.sleep(0.2)

    def brokers_registered(self) -> int:
        """Brokers in the cluster's metadata, asked of the first live node (0 if none answers)."""
        import asyncio

        from aiokafka.admin import AIOKafkaAdminClient

        live = [n.address for n in self.nodes if n.alive()]
        if not live:
            return 0

        async def ask() -> int:
            admin = AIOKafkaAdminClient(bootstrap_servers=live, request_timeout_ms=5000)
            try:
                await admin.start()
                return len((await admin.describe_cluster())["brokers"])
            finally:
                await admin.close()

        try:
            return asyncio.run(ask())
        except Exception:  # noqa: BLE001 - not up yet
            return 0

    def alive(self) -> bool:
        """Any node still running."""
        return any(n.alive() for n in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    def restart_node(self, node_id: int, timeout: float = 120.0) -> None:
        node = self.node(node_id)
        node.start()
        self.wait_ready(timeout, [node])

    def stop(self, kill: bool = False) -> None:
        for node in self.nodes:
            if node.alive():
                node.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        for node in self.nodes:
            node.stop(kill=kill)
        if self._tmp:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "KafkaCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
