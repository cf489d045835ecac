"""Load generation and meters: worker processes, a producer that sends flat out or at a fixed
rate, a consumer that times each output, and the workers' memory and CPU.

:func:`bench_worker` runs one case: start the processes on fresh topics, warm up, then flat out
(throughput) and/or open loop (latency per record: the ``sent_at`` carried in the input → the
moment the bench's consumer sees the output), with peak RSS and CPU read throughout.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import orjson
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from emostream.worker.broker import free_port
from emostream.worker.kafka_io import client_kwargs, ensure_topics
from emostream.worker.processes import resolve
from emostream.worker.settings import Settings, child_env

from .broker import BenchBroker
from .plan import BenchError, Plan, record
from .progress import Progress


def latency_summary(latencies_s: Sequence[float]) -> dict:
    """Percentiles, mean, min and max in milliseconds."""
    if not latencies_s:
        return {"count": 0}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"count": int(ms.size), "p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2),
            "p99_ms": round(float(p99), 2), "mean_ms": round(float(ms.mean()), 2),
            "min_ms": round(float(ms.min()), 2), "max_ms": round(float(ms.max()), 2)}


# --------------------------------------------------------------------------------------------
# worker processes and meters

def _env_for_one(settings: Settings) -> dict[str, str]:
    """Each process its own free port for whatever port settings exist (metrics/health server)."""
    ports = {name: free_port() for name in type(settings).model_fields
             if name.endswith("_port") and getattr(settings, name)}
    return child_env(settings.model_copy(update=ports))


class RssMonitor(threading.Thread):
    """Polls the resident set size of some processes; keeps each one's peak."""

    def __init__(self, pids: Sequence[int], interval: float = 0.1):
        super().__init__(daemon=True, name="bench-rss")
        self._procs = {pid: psutil.Process(pid) for pid in pids}
        self.peak = {pid: 0 for pid in pids}
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            self.sample()
            if self._stop_event.wait(self.interval):
                return

    def sample(self) -> None:
        for pid, proc in self._procs.items():
            try:
                self.peak[pid] = max(self.peak[pid], proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process has gone
                pass

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)
        self.sample()

    def cpu_seconds(self) -> dict[int, float]:
        out = {}
        for pid, proc in self._procs.items():
            try:
                t = proc.cpu_times()
                out[pid] = t.user + t.system
            except Exception:  # noqa: BLE001
                out[pid] = 0.0
        return out


@dataclass
class Procs:
    procs: list[subprocess.Popen]
    logs: list[Path]
    workdir: str

    def check(self) -> None:
        for p, log in zip(self.procs, self.logs):
            if p.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise BenchError(f"worker process {p.pid} exited with code {p.returncode}; log {log}:\n{tail}")

    def stop(self) -> list[int | None]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(30))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes


class CpuMeter:
    """CPU time of the workers, the broker and this process over a phase, as cores busy on average."""

    def __init__(self, worker_pids: Sequence[int], broker_pids: Sequence[int] = ()):
        self._groups = {"workers": [psutil.Process(p) for p in worker_pids], "bench_client": [psutil.Process()]}
        if broker_pids:
            self._groups["broker"] = [psutil.Process(p) for p in broker_pids]
        self._t0 = time.monotonic()
        self._c0 = self._sample()

    def _sample(self) -> dict[str, float]:
        t = psutil.cpu_times()
        out = {"machine": t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0)
               + getattr(t, "softirq", 0.0)}
        for name, group in self._groups.items():
            total = 0.0
            for proc in group:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system
                except Exception:  # noqa: BLE001 - gone
                    pass
            out[name] = total
        return out

    def cores(self) -> dict[str, float]:
        """Cores busy on average: per group, ``other`` (every other process on the machine) and ``wall_s``."""
        wall = time.monotonic() - self._t0
        now = self._sample()
        used = {name: (now[name] - self._c0[name]) / wall for name in now}
        machine = used.pop("machine")
        used["other"] = max(0.0, machine - sum(used.values()))
        return {name: round(v, 2) for name, v in used.items()} | {"wall_s": round(wall, 2)}


@contextmanager
def spawn(cmd: list[str], envs: list[dict[str, str]], log_dir: Path, name: str,
          cpus: set[int] | None = None) -> Iterator[Procs]:
    """Start one process per env (cwd: a temp dir, so faust's data dirs stay out of the repo),
    on ``cpus`` only when given (their CPU affinity, like ``taskset``)."""
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    workdir = tempfile.mkdtemp(prefix="emostream-bench-")
    procs, logs = [], []
    try:
        for i, env in enumerate(envs):
            log = log_dir / f"{name}-{i}.log"
            with open(log, "wb") as fh:
                procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir,
                                              preexec_fn=pin))
            logs.append(log)
        yield Procs(procs, logs, workdir)
    finally:
        Procs(procs, logs, workdir).stop()
        shutil.rmtree(workdir, ignore_errors=True)


class Collector:
    """One consumer on the output and dead-letter topics, from the beginning; for each run tag,
    the first time each output id is seen, with its ``sent_at`` and ``processed_at``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.seen: dict[str, dict[str, tuple[float, float, str | None]]] = defaultdict(dict)
        self.dead_letters = 0
        self.duplicates = 0
        self._consumer = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.settings
        self._consumer = AIOKafkaConsumer(s.output_topic, s.dlq_topic, group_id=None, auto_offset_reset="earliest",
                                          enable_auto_commit=False, fetch_max_wait_ms=20, **client_kwargs(s))
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        dlq = self.settings.dlq_topic
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            now = time.time()
            for records in batch.values():
                for rec in records:
                    if rec.topic == dlq:
                        self.dead_letters += 1
                        continue
                    obj = orjson.loads(rec.value)
                    seen = self.seen[obj.get("run")]
                    if obj["id"] in seen:
                        self.duplicates += 1
                    else:
                        seen[obj["id"]] = (now, obj.get("sent_at", now), obj.get("processed_at"))

    async def wait_for(self, run: str, n: int, timeout: float, procs: Procs, progress: Progress, task) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen[run]) < n:
            procs.check()
            if self._task is not None and self._task.done():
                self._task.result()
            if time.monotonic() > deadline:
                raise BenchError(f"only {len(self.seen[run])} of {n} outputs of run {run!r} within {timeout:.0f} s "
                                 f"({self.dead_letters} dead letters); logs: {', '.join(map(str, procs.logs))}")
            progress.update(task, completed=len(self.seen[run]))
            await asyncio.sleep(0.05)
        progress.update(task, completed=n)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._consumer is not None:
            await self._consumer.stop()


async def _send_flat(producer, topic: str, texts: Sequence[str], run: str) -> float:
    """Send every record as fast as the producer takes them; ``sent_at`` is stamped at send."""
    first = time.time()
    pending = []
    for i, text in enumerate(texts):
        key, value = record(i, text, run, time.time())
        pending.append(await producer.send(topic, value=value, key=key))
        if len(pending) >= 1000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return first


async def _send_open_loop(producer, topic: str, texts: Sequence[str], run: str, rate: float) -> float:
    """Send at a fixed rate whatever happens downstream; ``sent_at`` is the scheduled time (so a
    lagging producer cannot hide latency)."""
    start = time.time() + 0.1
    pending = []
    for i, text in enumerate(texts):
        target = start + i / rate
        delay = target - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        key, value = record(i, text, run, target)
        pending.append(await producer.send(topic, value=value, key=key))
    await asyncio.gather(*pending)
    return start


def _phase_result(collector: Collector, run: str, first_sent: float) -> dict:
    seen = collector.seen[run]
    last_seen = max(t for t, _, _ in seen.values())
    latencies = [t - sent for t, sent, _ in seen.values()]
    batches = defaultdict(int)
    for _, _, processed_at in seen.values():
        batches[processed_at] += 1
    sizes = sorted(batches.values())
    seconds = last_seen - first_sent
    # Steady state: outputs seen after the first 10 % came out, over the time since then. Leaves out
    # the start (the first fetch, the first batch's wait), which would otherwise weigh on small runs.
    times = sorted(t for t, _, _ in seen.values())
    t_k = times[len(times) // 10]
    after = sum(1 for t in times if t > t_k)
    steady = after / (last_seen - t_k) if after >= 0.5 * len(times) and last_seen > t_k else len(seen) / seconds
    # Where the latency went: sent → processed_at (broker hold of the input fetch, batch window,
    # queueing, inference) and processed_at → seen (publish, the output fetch of the bench's consumer).
    split = [(datetime.fromisoformat(p).timestamp(), sent, t) for t, sent, p in seen.values() if p]
    return {
        "records": len(seen), "seconds": round(seconds, 3), "texts_per_s": round(steady, 2),
        "texts_per_s_from_first_send": round(len(seen) / seconds, 2),
        "latency": latency_summary(latencies),
        "latency_to_processed": latency_summary([p - sent for p, sent, _ in split]) if split else None,
        "latency_after_processed": latency_summary([t - p for p, _, t in split]) if split else None,
        "latencies_ms": [round(x * 1000, 2) for x in latencies],
        "batches": {"count": len(sizes), "mean_size": round(statistics.fmean(sizes), 2),
                    "p50_size": statistics.median(sizes), "max_size": sizes[-1]},
    }


async def _worker_case(broker_url: str, base: Settings, texts: Sequence[str], plan: Plan, progress: Progress,
                       out_dir: Path, *, name: str, cmd: list[str], workers: int = 1,
                       threads: int | None = None, streams: int | None = None, flat: bool = True, open_loop: bool = False,
                       open_loop_rate: float | None = None, broker_pids: Sequence[int] = (),
                       cpus: set[int] | None = None, processes: int | None = None) -> dict:
    """Start ``workers`` processes of ``cmd`` (each with ``--processes``, when given) on fresh topics,
    warm up, then run flat out (throughput) and/or open loop at half the flat-out rate or at
    ``open_loop_rate`` (latency)."""
    tag = uuid.uuid4().hex[:8]
    update = {"broker": broker_url, "input_topic": f"bench-in-{tag}", "output_topic": f"bench-out-{tag}",
              "dlq_topic": f"bench-dlq-{tag}", "group_id": f"bench-{name}-{tag}"}
    if threads is not None:
        update["inference_threads"] = threads
    if streams is not None:
        update["inference_streams"] = streams
    if processes is not None:
        update["processes"] = processes
    s = base.model_copy(update=update)
    await ensure_topics(s, [s.input_topic, s.output_topic, s.dlq_topic])
    collector = Collector(s)
    await collector.start()
    producer = AIOKafkaProducer(acks="all", linger_ms=0, **client_kwargs(s))
    await producer.start()
    result: dict = {"workers": workers, "processes": s.processes, "inference_threads": s.inference_threads,
                    "inference_streams": s.inference_streams, "command": " ".join(cmd[1:]),
                    "partitions": s.partitions, "batch_max": s.batch_max, "batch_window_ms": s.batch_window_ms}
    try:
        with spawn(cmd, [_env_for_one(s) for _ in range(workers)], out_dir, f"{name}-worker", cpus) as procs:
            pids = worker_pids(procs, resolve(s.processes, len(cpus or os.sched_getaffinity(0))))
            rss = RssMonitor(pids)
            rss.start()
            try:
                t_spawn = time.time()
                warm = texts[: plan.warmup]
                task = progress.task(f"   {name}: start + warm-up", len(warm))
                await _send_flat(producer, s.input_topic, warm, "warm")
                await collector.wait_for("warm", len(warm), 240, procs, progress, task)
                result["ready_s"] = round(time.time() - t_spawn, 2)
                if len(pids) > 1:
                    result["all_workers_busy"] = await _settle(collector, producer, s, texts, plan, procs, rss,
                                                               progress, name)
                if flat:
                    # The texts again as often as needed: a few seconds of flat-out are too few
                    # batches to measure (the worker's cache is off, repeats cost full inference).
                    k = max(len(texts), plan.flat_out_records)
                    flat_texts = (list(texts) * (k // len(texts) + 1))[:k]
                    runs = []
                    for r in range(plan.rounds):  # like the raw model's variants: the best of the rounds
                        tag = "flat" if r == 0 else f"flat{r + 1}"
                        task = progress.task(f"   {name}: {k} records flat out (round {r + 1})", k)
                        cpu = CpuMeter(pids, broker_pids)
                        first = await _send_flat(producer, s.input_topic, flat_texts, tag)
                        await collector.wait_for(tag, k, max(120.0, k / 5), procs, progress, task)
                        runs.append(dict(_phase_result(collector, tag, first), cpu_cores_used=cpu.cores()))
                    result["flat_out"] = dict(max(runs, key=lambda x: x["texts_per_s"]),
                                              runs_texts_per_s=[x["texts_per_s"] for x in runs])
                if open_loop:
                    rate = open_loop_rate or 0.5 * result["flat_out"]["texts_per_s"]
                    m = max(plan.open_loop_min, min(len(texts), int(rate * plan.open_loop_s)))
                    ol_texts = (list(texts) * (m // len(texts) + 1))[:m]
                    task = progress.task(f"   {name}: open loop at {rate:.0f}/s", m)
                    first = await _send_open_loop(producer, s.input_topic, ol_texts, "open", rate)
                    await collector.wait_for("open", m, max(120.0, 4 * m / rate), procs, progress, task)
                    result["open_loop"] = {"rate_per_s": round(rate, 2), **_phase_result(collector, "open", first)}
            finally:
                rss.stop()
                codes = procs.stop()
            peaks = [rss.peak[p] for p in pids]
            result["peak_rss_mb"] = [round(b / 2**20, 1) for b in peaks]
            result["max_peak_rss_mb"] = round(max(peaks) / 2**20, 1)
            result["exit_codes"] = codes
            result["dead_letters"] = collector.dead_letters
            result["duplicate_outputs"] = collector.duplicates
    finally:
        await producer.stop()
        await collector.stop()
    return result


def worker_pids(procs: Procs, processes: int, timeout: float = 60.0) -> list[int]:
    """The processes doing the work: each command's own, or its children under ``--processes``."""
    if processes <= 1:
        return [p.pid for p in procs.procs]
    deadline = time.monotonic() + timeout
    while True:
        kids = [[c.pid for c in psutil.Process(p.pid).children()] for p in procs.procs]
        if all(len(k) >= processes for k in kids) or time.monotonic() > deadline:
            return [pid for k in kids for pid in k] or [p.pid for p in procs.procs]
        time.sleep(0.2)


async def _settle(collector: Collector, producer, s: Settings, texts, plan: Plan, procs: Procs, rss: RssMonitor,
                  progress: Progress, name: str, rounds: int = 6) -> bool:
    """With several workers: send probe rounds until every worker did inference work (the group
    has rebalanced and each owns partitions)."""
    size = min(len(texts), 2 * s.batch_max * len(rss.peak))
    for r in range(rounds):
        before = rss.cpu_seconds()
        task = progress.task(f"   {name}: rebalance probe {r + 1}", size)
        await _send_flat(producer, s.input_topic, texts[:size], f"probe{r}")
        await collector.wait_for(f"probe{r}", size, 120, procs, progress, task)
        after = rss.cpu_seconds()
        busy = [after[p] - before[p] for p in before]
        if min(busy) > 0.15 * max(busy) and min(busy) > 0.05:
            return True
        await asyncio.sleep(1.0)
    return False


def bench_worker(broker: BenchBroker, settings: Settings, texts: Sequence[str], plan: Plan, progress: Progress,
                 out_dir: Path, **kw) -> dict:
    """One worker case (:func:`_worker_case`) against a running broker."""
    return asyncio.run(_worker_case(broker.url, settings, texts, plan, progress, out_dir, broker_pids=broker.pids, **kw))



# --------------------------------------------------------------------------------------------
# pinning: the worker on a core of its own, the broker and the load generator on the others
def _threads_of(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


@contextmanager
def pinned(pids: Sequence[int], cpus: set[int]) -> Iterator[None]:
    """Every thread of these processes on ``cpus`` for the block (``taskset -a``), as before after."""
    before: dict[int, set[int]] = {}
    for pid in pids:
        for tid in _threads_of(pid):
            try:
                before[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, cpus)
            except OSError:  # the thread ended meanwhile
                pass
    try:
        yield
    finally:
        for tid, old in before.items():
            try:
                os.sched_setaffinity(tid, old)
            except OSError:
                pass

