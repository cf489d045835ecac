"""Waiting for a consumer group to settle, read from the workers' logs (not from a clock)."""

from __future__ import annotations

import re
import time

# The worker logs this after every rebalance: "[<pid>] emostream.worker: Worker ready: N partition(s) ..."
READY = re.compile(r"\[(\d+)\] emostream\.worker: Worker ready: (\d+) partition")


def assigned_by_process(*logs: str) -> dict[int, int]:
    """Each worker process's input partitions after its latest rebalance, by pid."""
    latest: dict[int, int] = {}
    for log in logs:
        for pid, n in READY.findall(log):
            latest[int(pid)] = int(n)
    return latest


def wait_for_group(workers, members: int, partitions: int, timeout: float = 90.0) -> dict[int, int]:
    """Until ``members`` processes each own input partitions and together own all ``partitions``."""
    deadline = time.monotonic() + timeout
    while True:
        counts = assigned_by_process(*(w.output() for w in workers))
        if len(counts) == members and all(counts.values()) and sum(counts.values()) == partitions:
            return counts
        assert time.monotonic() < deadline, f"group not settled: {counts}\n" + workers[0].output()[-3000:]
        assert all(w.proc.poll() is None for w in workers), workers[0].output()[-3000:]
        time.sleep(0.2)
