"""The broker the bench's broker stages run against, obtained in one place: :func:`open_broker`."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class BenchBroker:
    """What the stages need of a broker: where the workers connect, and its process on this machine
    (its CPU is metered, and stage 5 pins it away from the worker's core); None when it has none."""

    url: str
    pid: int | None


@contextmanager
def open_broker(out: Path) -> Iterator[BenchBroker]:
    """The embedded broker (Tansu, in memory) for the run, its log in ``out/tansu.log``."""
    from emostream.worker.broker import EmbeddedBroker

    with EmbeddedBroker(log_path=Path(out) / "tansu.log") as broker:
        yield BenchBroker(broker.url, broker.proc.pid if broker.proc is not None else None)
