"""The broker the bench's broker stages run against, obtained in one place: :func:`open_broker`.

Either engine of :func:`emostream.worker.broker.make_broker`: the embedded Tansu (in memory, holds
a fetch until its wait ends) or a single-node Apache Kafka (answers a fetch as soon as data arrives).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class BenchBroker:
    """What the stages need of a broker: its engine, where the workers connect, and its processes
    on this machine (their CPU is metered, and stage 5 pins them away from the worker's core)."""

    engine: str
    url: str
    pids: tuple[int, ...]


@contextmanager
def open_broker(out: Path, engine: str = "tansu") -> Iterator[BenchBroker]:
    """A broker of ``engine`` for the run, its log in ``out/<engine>.log``."""
    from emostream.worker.broker import make_broker

    Path(out).mkdir(parents=True, exist_ok=True)
    with make_broker(engine, log_path=Path(out) / f"{engine}.log") as broker:
        procs = [n.proc for n in broker.nodes] if engine == "kafka" else [broker.proc]
        yield BenchBroker(engine, broker.url, tuple(p.pid for p in procs if p is not None))
