"""``emostream bench``: throughput and latency from the raw model up to the worker behind a broker.

Every stage runs on the same texts (GoEmotions dev by default) and returns a plain dict:

1. :func:`bench_raw` — tokenization + the ONNX backbone session alone, length-sorted batches,
   several batch sizes / padded-token budgets, intra-op threads 1 vs 2 and spin-waiting on/off;
   the best is the model's own limit on this machine.
2. :func:`bench_pipeline` — :class:`~emostream.worker.pipeline.Enricher` on raw JSON records in
   arrival order, batches of ``batch_max`` (decode → validate → tokenize → embed → heads →
   encode), no Kafka, at several padded-token budgets; the best budget is what the later stages
   run with (unless ``EMOSTREAM_BATCH_MAX_TOKENS`` is set). :func:`bench_cache` runs it on a
   stream with ~20 % reposts, result cache off and on.
3. :func:`bench_worker` — the embedded broker and real worker processes: warm-up, then N records
   flat out (throughput), then open loop at half that rate (latency per record: the ``sent_at``
   carried in the record → the moment the bench's consumer sees the output), with the worker's
   peak RSS polled throughout. The worker runs with its result cache off (the bench repeats its
   own texts across phases; the cache is measured in-process) and, for comparison, once more
   with the consumer fetch wait at faust's fixed 1500 ms (``EMOSTREAM_FETCH_MAX_WAIT_MS``).
4. the same with the naive per-message agent (``emostream.worker.naive_agent``), and with two
   single-threaded workers in one consumer group against one worker with two threads.
5. :func:`bench_own_core` — the worker (and the naive agent) pinned to one core while the broker
   and the bench run on the others, as separate machines would, against the raw model on that
   same core: the worker's own overhead without the load generator taking the model's CPU; and
   the open loop again at other batch windows, each against its own latency bound.

Raw and pipeline variants run ``Plan.rounds`` times, interleaved, keeping each one's best run:
the machine is shared and a burst of load elsewhere should not sink one variant.
:func:`run_bench` runs the stages, then writes ``bench.json``, ``bench.md`` and the plots
(:mod:`.bench_report`). Targets are report lines, never assertions.
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import orjson

from emostream.models.model import EmotionModel

from .decode import RawMessage
from .pipeline import Enricher
from .processes import resolve
from .settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("../shared/data/go_emotions/dev.tsv")  # relative to the repository root
ALL_STAGES = ("raw", "pipeline", "cache", "end_to_end", "naive", "scaling", "own_core")
IN_PROCESS_STAGES = ("raw", "pipeline", "cache")
MULTI_THREADS = 2  # "intra-op threads 1 vs 2"


class BenchError(RuntimeError):
    """A benchmark that cannot run (missing data, a worker that died, outputs that never came)."""


# --------------------------------------------------------------------------------------------
# options and plan
@dataclass
class BenchOptions:
    data: Path | None = None  # None: ../shared/data/go_emotions/dev.tsv from the repository root
    out: Path = Path("bench-results")
    quick: bool = False
    n: int | None = None  # texts per stage (default 1000, quick 150)
    model: str | None = None  # manifest name or path (default: the settings' model)
    stages: Sequence[str] = ALL_STAGES
    progress: bool = True
    settings: Settings | None = None  # base settings (default: Settings.from_env())
    seed: int = 0


@dataclass(frozen=True)
class RawVariant:
    threads: int
    batch_size: int
    max_tokens: int
    order: str = "length-sorted"  # or "arrival"
    spinning: bool = False  # ONNX Runtime session.intra_op.allow_spinning (the worker's default: off)
    streams: int = 1  # session calls at once (each with `threads` intra-op threads)

    @property
    def label(self) -> str:
        extra = "" if self.order == "length-sorted" else ", arrival order"
        extra += ", spinning" if self.spinning else ""
        streams = f" × {self.streams} streams" if self.streams > 1 else ""
        return f"{self.threads} thr{streams}, batch {self.batch_size}, ≤{self.max_tokens} tok{extra}"


@dataclass(frozen=True)
class Plan:
    n: int
    raw_variants: tuple[RawVariant, ...]
    rounds: int = 2  # raw and pipeline variants run this many times, interleaved; each keeps its best
    duplicate_fraction: float = 0.2
    cache_size: int = 10_000
    open_loop_s: float = 15.0
    open_loop_min: int = 100
    flat_out_records: int = 3000  # records per flat-out run through the broker (the texts repeated)
    warmup: int = 64
    scaling: bool = True
    t_batch_repeats: int = 15
    token_budgets: tuple[int, ...] = (1024, 512, 256)  # pipeline sweep, besides the configured one
    fetch_wait_compare_ms: int | None = 1500  # an extra worker run at this consumer fetch wait (faust's own)
    publish_rtt_ms: int | None = 60  # the overlap lever: worker runs with publishes this much slower, overlap on/off
    window_sweep_ms: tuple[float, ...] = (100.0, 150.0)  # own-core stage: open loop again at these batch windows


def make_plan(quick: bool, n: int | None) -> Plan:
    T = MULTI_THREADS
    if quick:
        return Plan(
            n=n or 150,
            raw_variants=(RawVariant(T, 1, 4096), RawVariant(T, 64, 4096), RawVariant(1, 64, 4096),
                          RawVariant(1, 64, 512, streams=T)),
            rounds=1, cache_size=2_000, open_loop_s=4.0, open_loop_min=40, warmup=16, scaling=False, flat_out_records=0,
            t_batch_repeats=5, token_budgets=(512,), fetch_wait_compare_ms=None, publish_rtt_ms=None,
        )
    return Plan(
        n=n or 1000,
        raw_variants=(
            RawVariant(T, 1, 4096), RawVariant(T, 32, 4096), RawVariant(T, 64, 4096), RawVariant(T, 256, 16384),
            RawVariant(T, 64, 512), RawVariant(T, 64, 4096, "arrival"), RawVariant(T, 64, 4096, spinning=True),
            RawVariant(1, 64, 4096), RawVariant(1, 1, 4096),
            RawVariant(1, 32, 4096, streams=T), RawVariant(1, 64, 512, streams=T), RawVariant(1, 64, 4096, streams=T),
        ),
    )


# --------------------------------------------------------------------------------------------
# data
def default_data_path() -> Path:
    for base in (ROOT, Path.cwd()):
        path = (base / DEFAULT_DATA).resolve()
        if path.is_file():
            return path
    return (ROOT / DEFAULT_DATA).resolve()


def load_texts(path: Path, n: int | None = None) -> list[str]:
    """Texts of a GoEmotions TSV (``text<TAB>label ids<TAB>id``; first column) or of a plain file
    (one text per line). Blank lines are skipped; with ``n`` larger than the file, texts repeat."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"data file not found: {path} — pass --data FILE (a GoEmotions .tsv or one text per line)")
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if path.suffix == ".tsv" or (lines and all(line.count("\t") == 2 for line in lines[:50])):
        texts = [line.split("\t", 1)[0] for line in lines]
    else:
        texts = lines
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise BenchError(f"no texts in {path}")
    if n is not None:
        texts = (texts * (n // len(texts) + 1))[:n]
    return texts


def duplicate_stream(texts: Sequence[str], fraction: float, seed: int = 0, window: int = 500) -> list[str]:
    """``len(texts)`` texts where about ``fraction`` repeat one of the last ``window`` ones (reposts)."""
    rng = random.Random(seed)
    out: list[str] = []
    fresh = iter(texts)
    while len(out) < len(texts):
        if out and rng.random() < fraction:
            out.append(out[-1 - rng.randrange(min(window, len(out)))])
        else:
            out.append(next(fresh))
    return out


def repeat_fraction(texts: Sequence[str]) -> float:
    """Share of texts that already appeared earlier in the stream (what an unbounded cache could hit)."""
    seen: set[str] = set()
    repeats = 0
    for t in texts:
        repeats += t in seen
        seen.add(t)
    return repeats / len(texts) if texts else 0.0


def record(i: int, text: str, run: str, sent_at: float = 0.0) -> tuple[bytes, bytes]:
    rid = f"{run}-{i}"
    return rid.encode(), orjson.dumps({"id": rid, "text": text, "run": run, "sent_at": sent_at})


def raw_messages(texts: Sequence[str], run: str, partitions: int = 8) -> list[RawMessage]:
    now = time.time()
    msgs = []
    for i, t in enumerate(texts):
        key, value = record(i, t, run, now)
        msgs.append(RawMessage(value, key, "bench", i % partitions, i // partitions, now))
    return msgs


def latency_summary(latencies_s: Sequence[float]) -> dict:
    if not latencies_s:
        return {"count": 0}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"count": int(ms.size), "p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2),
            "p99_ms": round(float(p99), 2), "mean_ms": round(float(ms.mean()), 2),
            "min_ms": round(float(ms.min()), 2), "max_ms": round(float(ms.max()), 2)}


# --------------------------------------------------------------------------------------------
# progress
class Progress:
    """rich.progress bars, or nothing (tests)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._p = RichProgress(TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(),
                                   TimeElapsedColumn(), console=Console(stderr=True))
            self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
            self._p = None

    def task(self, description: str, total: float | None):
        return self._p.add_task(description, total=total) if self._p is not None else None

    def update(self, task, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None) -> None:
        if self._p is not None and task is not None:
            kw = {k: v for k, v in (("advance", advance), ("completed", completed), ("total", total)) if v is not None}
            self._p.update(task, **kw)

    def log(self, message: str) -> None:
        if self._p is not None:
            self._p.console.print(message)


# --------------------------------------------------------------------------------------------
# stage 1: the raw model
def _raw_pass(model: EmotionModel, texts: Sequence[str], v: RawVariant, on_batch: Callable[[int], None]) -> dict:
    """Tokenize everything, order by token length (or keep arrival order), run the backbone session
    on batches of ≤ batch_size texts and ≤ max_tokens padded tokens."""
    encoder = model.encoder
    t0 = time.perf_counter()
    ids = encoder.tokenize(texts)
    lengths = [len(x) for x in ids]
    order = sorted(range(len(ids)), key=lengths.__getitem__) if v.order == "length-sorted" else list(range(len(ids)))
    calls = padded = 0
    start = 0
    chunks = []
    while start < len(order):
        width = lengths[order[start]]
        end = start + 1
        while end < len(order) and end - start < v.batch_size:
            w = max(width, lengths[order[end]])
            if w * (end - start + 1) > v.max_tokens:
                break
            width, end = w, end + 1
        chunks.append([ids[i] for i in order[start:end]])
        calls += 1
        padded += width * (end - start)
        start = end
    for chunk, _ in zip(chunks, encoder.run_chunks(chunks)):
        on_batch(len(chunk))
    seconds = time.perf_counter() - t0
    return {"threads": v.threads, "streams": v.streams, "batch_size": v.batch_size, "max_tokens": v.max_tokens,
            "order": v.order, "spinning": v.spinning, "label": v.label, "texts": len(texts), "seconds": round(seconds, 4),
            "texts_per_s": round(len(texts) / seconds, 2), "calls": calls, "tokens": sum(lengths),
            "padded_tokens": padded}


def bench_raw(model_name: str, texts: Sequence[str], plan: Plan, progress: Progress,
              title: str = "1. raw model (tokenize + ONNX)") -> dict:
    models: dict[tuple[int, bool], EmotionModel] = {}

    def model_for(v: RawVariant) -> EmotionModel:
        key = (v.threads, v.spinning, v.streams)
        if key not in models:
            model = EmotionModel.load(model_name, threads=v.threads, spinning=v.spinning, streams=v.streams)
            model.encoder.embed(list(texts[:32]))  # warm-up: first runs allocate
            models[key] = model
        return models[key]

    variants = list(plan.raw_variants)
    task = progress.task(title, plan.rounds * len(variants) * len(texts))
    for v in variants:
        model_for(v)
    runs: dict[RawVariant, list[dict]] = {v: [] for v in variants}
    for _ in range(plan.rounds):  # interleaved, so a burst of load elsewhere does not sink one variant
        for v in variants:
            runs[v].append(_raw_pass(model_for(v), texts, v, lambda k: progress.update(task, advance=k)))
    results = []
    for v in variants:
        best_run = max(runs[v], key=lambda r: r["texts_per_s"])
        results.append(dict(best_run, runs_texts_per_s=[r["texts_per_s"] for r in runs[v]]))
    best = max(results, key=lambda r: r["texts_per_s"])
    threads = {}  # "threads x streams" → best length-sorted run
    for t, k in sorted({(r["threads"], r["streams"]) for r in results}):
        threads[f"{t}x{k}"] = max(r["texts_per_s"] for r in results if r["threads"] == t and r["streams"] == k
                                  and r["order"] == "length-sorted" and not r["spinning"])
    return {"variants": results, "best": best, "best_by_threads": threads, "rounds": plan.rounds}


# --------------------------------------------------------------------------------------------
# stage 2: the in-process pipeline (and the cache lever)
def _pipeline_pass(model: EmotionModel, settings: Settings, msgs: Sequence[RawMessage], cache_size: int,
                   on_batch: Callable[[int], None]) -> tuple[dict, Enricher]:
    enricher = Enricher(model, settings, cache_size=cache_size)
    size = settings.batch_max
    inference = []
    outputs = dead = tokens = padded = 0
    t0 = time.perf_counter()
    for start in range(0, len(msgs), size):
        res = enricher(msgs[start:start + size])
        outputs += len(res.outputs)
        dead += len(res.dead_letters)
        tokens += res.tokens
        padded += res.padded_tokens
        inference.append(res.inference_s)
        on_batch(res.size)
    seconds = time.perf_counter() - t0
    return {"texts": len(msgs), "seconds": round(seconds, 4), "texts_per_s": round(len(msgs) / seconds, 2),
            "batch_max": size, "batch_max_tokens": settings.batch_max_tokens, "batches": len(inference),
            "batch_inference_ms": {"mean": round(1000 * statistics.fmean(inference), 2),
                                   "p50": round(1000 * statistics.median(inference), 2),
                                   "max": round(1000 * max(inference), 2)},
            "outputs": outputs, "dead_letters": dead, "tokens": tokens, "padded_tokens": padded,
            "cache": enricher.cache_stats()}, enricher


def bench_pipeline(model: EmotionModel, settings: Settings, texts: Sequence[str], plan: Plan,
                   progress: Progress) -> dict:
    """The Enricher at the configured padded-token budget and at the plan's other budgets; the best
    budget is what the broker stages then run with (``tuned_batch_max_tokens``)."""
    msgs = raw_messages(texts, "pipe")
    Enricher(model, settings)(msgs[: settings.batch_max])  # warm-up
    budgets = [settings.batch_max_tokens] + [b for b in plan.token_budgets if b != settings.batch_max_tokens]
    task = progress.task("2. pipeline (Enricher, no Kafka)", plan.rounds * len(budgets) * len(msgs))
    runs: dict[int, list[dict]] = {b: [] for b in budgets}
    for _ in range(plan.rounds):
        for budget in budgets:
            s = settings.model_copy(update={"batch_max_tokens": budget})
            result, _ = _pipeline_pass(model, s, msgs, 0, lambda k: progress.update(task, advance=k))
            runs[budget].append(result)
    variants = [dict(max(runs[b], key=lambda r: r["texts_per_s"]), runs_texts_per_s=[r["texts_per_s"] for r in runs[b]])
                for b in budgets]
    best = max(variants, key=lambda r: r["texts_per_s"])
    return {"texts_per_s": best["texts_per_s"], "configured": variants[0], "best": best, "variants": variants,
            "tuned_batch_max_tokens": best["batch_max_tokens"], "inference_threads": settings.inference_threads,
            "streams": model.encoder.streams, "threads": model.encoder.threads,
            "rounds": plan.rounds}


def bench_cache(model: EmotionModel, settings: Settings, texts: Sequence[str], plan: Plan, progress: Progress,
                seed: int = 0) -> dict:
    stream = duplicate_stream(texts, plan.duplicate_fraction, seed)
    msgs = raw_messages(stream, "dup")
    task = progress.task(f"2b. pipeline, ~{plan.duplicate_fraction:.0%} duplicates, cache off/on",
                         2 * plan.rounds * len(msgs))
    runs: dict[str, list[tuple[dict, Enricher]]] = {"off": [], "on": []}
    for _ in range(plan.rounds):  # off, on, off, on: each keeps its best run
        for name, size in (("off", 0), ("on", plan.cache_size)):
            runs[name].append(_pipeline_pass(model, settings, msgs, size, lambda k: progress.update(task, advance=k)))
    best = {name: max(r, key=lambda x: x[0]["texts_per_s"]) for name, r in runs.items()}
    off = dict(best["off"][0], runs_texts_per_s=[r["texts_per_s"] for r, _ in runs["off"]])
    on = dict(best["on"][0], runs_texts_per_s=[r["texts_per_s"] for r, _ in runs["on"]])
    stats = best["on"][1].cache_stats()
    return {"texts": len(msgs), "duplicate_fraction_target": plan.duplicate_fraction,
            "repeat_fraction": round(repeat_fraction(stream), 4), "cache_size": plan.cache_size,
            "off": off, "on": on, "hit_rate": round(stats["hit_rate"], 4), "stats": stats,
            "speedup": round(on["texts_per_s"] / off["texts_per_s"], 3), "rounds": plan.rounds}


def batch_inference_time(model: EmotionModel, settings: Settings, texts: Sequence[str], size: int,
                         repeats: int) -> float:
    """Median seconds the Enricher takes for one batch of ``size`` records (different texts each time)."""
    msgs = raw_messages(texts, "tb")
    size = max(1, min(size, len(msgs)))
    enricher = Enricher(model, settings)
    enricher(msgs[:size])
    times = []
    for r in range(repeats):
        start = (r * size) % max(1, len(msgs) - size + 1)
        t0 = time.perf_counter()
        enricher(msgs[start:start + size])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# stages 3 and 4: through the broker
WORKER_CMD = [sys.executable, "-m", "emostream.worker.cli", "worker"]
NAIVE_CMD = [sys.executable, "-m", "emostream.worker.naive_agent"]


def worker_env(settings: Settings, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOSTREAM_")}
    for name, value in settings.model_dump().items():
        env[env_name(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    for name, value in extra.items():
        env[env_name(name)] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _env_for_one(settings: Settings) -> dict[str, str]:
    """Each process its own free port for whatever port settings exist (metrics/health server)."""
    from .broker import free_port

    ports = {name: free_port() for name in type(settings).model_fields
             if name.endswith("_port") and getattr(settings, name)}
    return worker_env(settings.model_copy(update=ports))


class RssMonitor(threading.Thread):
    """Polls the resident set size of some processes; keeps each one's peak."""

    def __init__(self, pids: Sequence[int], interval: float = 0.1):
        super().__init__(daemon=True, name="bench-rss")
        import psutil

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

    def __init__(self, worker_pids: Sequence[int], broker_pid: int | None):
        import psutil

        self._groups = {"workers": [psutil.Process(p) for p in worker_pids], "bench_client": [psutil.Process()]}
        if broker_pid:
            self._groups["broker"] = [psutil.Process(broker_pid)]
        self._t0 = time.monotonic()
        self._c0 = self._sample()

    def _sample(self) -> dict[str, float]:
        import psutil

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
        import shutil

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
        from aiokafka import AIOKafkaConsumer

        from .kafka_io import client_kwargs

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
                       open_loop_rate: float | None = None, broker_pid: int | None = None,
                       cpus: set[int] | None = None, processes: int | None = None) -> dict:
    """Start ``workers`` processes of ``cmd`` (each with ``--processes``, when given) on fresh topics,
    warm up, then run flat out (throughput) and/or open loop at half the flat-out rate or at
    ``open_loop_rate`` (latency)."""
    from aiokafka import AIOKafkaProducer

    from .kafka_io import client_kwargs, ensure_topics

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
                        cpu = CpuMeter(pids, broker_pid)
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
    import psutil

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


def bench_worker(broker, settings: Settings, texts: Sequence[str], plan: Plan, progress: Progress,
                 out_dir: Path, **kw) -> dict:
    """One worker case against a running :class:`~emostream.worker.broker.EmbeddedBroker`."""
    pid = broker.proc.pid if getattr(broker, "proc", None) is not None else None
    return asyncio.run(_worker_case(broker.url, settings, texts, plan, progress, out_dir, broker_pid=pid, **kw))


# --------------------------------------------------------------------------------------------
# the whole run
def run_bench(options: BenchOptions) -> dict:
    """Run the stages asked for; write bench.json, bench.md and plots into ``options.out``."""
    from . import bench_report

    unknown = set(options.stages) - set(ALL_STAGES)
    if unknown:
        raise BenchError(f"unknown stages {sorted(unknown)}; known: {', '.join(ALL_STAGES)}")
    settings = options.settings or Settings.from_env()
    if options.model:
        settings = settings.model_copy(update={"model": options.model})
    plan = make_plan(options.quick, options.n)
    data = Path(options.data) if options.data else default_data_path()
    texts = load_texts(data, plan.n)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict = {"meta": _meta(settings, data, texts, plan, options)}
    skipped = {name: {"skipped": "not requested"} for name in ALL_STAGES}
    results.update(skipped)
    stages = set(options.stages)
    model: EmotionModel | None = None

    def get_model() -> EmotionModel:
        nonlocal model
        if model is None:
            from .runner import load_model

            model = load_model(settings)
        return model

    with Progress(options.progress) as progress:
        if "raw" in stages:
            results["raw"] = bench_raw(settings.model, texts, plan, progress)
        if "pipeline" in stages:
            results["pipeline"] = bench_pipeline(get_model(), settings, texts, plan, progress)
            # Lever kept: the broker stages run with the best padded-token budget, unless it was set.
            if env_name("batch_max_tokens") not in os.environ:
                settings = settings.model_copy(update={"batch_max_tokens": results["pipeline"]["tuned_batch_max_tokens"]})
        results["meta"]["worker_settings"] = {
            "batch_max_tokens": settings.batch_max_tokens, "session_timeout_s": min(settings.session_timeout_s, 10.0),
            "cache_size": 0, "fetch_max_wait_ms": getattr(settings, "fetch_max_wait_ms", None)}
        if "cache" in stages:
            results["cache"] = bench_cache(get_model(), settings, texts, plan, progress, options.seed)
        # A shorter session timeout only makes the group join faster on the embedded broker.
        wupdate = {"session_timeout_s": min(settings.session_timeout_s, 10.0)}
        if "cache_size" in type(settings).model_fields:
            wupdate["cache_size"] = 0  # the bench repeats its texts across phases: every record must be inferred
        wsettings = settings.model_copy(update=wupdate)
        if stages & {"end_to_end", "naive", "scaling", "own_core"}:
            from .broker import EmbeddedBroker

            with EmbeddedBroker(log_path=out / "tansu.log") as broker:
                if "end_to_end" in stages:
                    results["end_to_end"] = _end_to_end(broker, wsettings, texts, plan, progress, out, get_model)
                if "naive" in stages:
                    results["naive"] = bench_worker(broker, wsettings, texts, plan, progress, out,
                                                    name="naive", cmd=NAIVE_CMD)
                if "scaling" in stages:
                    results["scaling"] = _scaling(broker, wsettings, texts, plan, progress, out, results)
                if "own_core" in stages:
                    results["own_core"] = bench_own_core(broker, wsettings, texts, plan, progress, out)
    results["meta"]["duration_s"] = round(time.time() - started, 1)
    try:
        results["meta"]["host"]["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    results["targets"] = bench_report.evaluate_targets(results)
    bench_report.write_all(results, out)
    return results


def _end_to_end(broker, settings: Settings, texts, plan: Plan, progress: Progress, out: Path,
                get_model: Callable[[], EmotionModel]) -> dict:
    e2e = bench_worker(broker, settings, texts, plan, progress, out, name="e2e", cmd=WORKER_CMD, open_loop=True)
    _latency_budget(e2e, settings, texts, plan, get_model)
    ms = plan.fetch_wait_compare_ms
    if ms and "fetch_max_wait_ms" in type(settings).model_fields and settings.fetch_max_wait_ms != ms:
        # The same worker with the consumer fetch wait faust would use (Tansu holds a waiting fetch).
        alt = settings.model_copy(update={"fetch_max_wait_ms": ms})
        case = bench_worker(broker, alt, texts, plan, progress, out, name=f"e2e-fetch-wait-{ms}ms",
                            cmd=WORKER_CMD, open_loop=True)
        _latency_budget(case, alt, texts, plan, get_model)
        e2e["fetch_wait_comparison"] = {"fetch_max_wait_ms": ms, **case}
    rtt = plan.publish_rtt_ms
    if rtt and "publish_overlap" in type(settings).model_fields:
        # A networked cluster's acks=all round-trip, simulated by delaying each batch's publish:
        # with overlap the next batch is inferred meanwhile; without, inference waits for it.
        e2e["publish_overlap_comparison"] = {"publish_delay_ms": rtt, **{
            ("on" if on else "off"): bench_worker(
                broker, settings.model_copy(update={"fault_publish_delay_ms": rtt, "publish_overlap": on}), texts,
                plan, progress, out, name=f"e2e-publish-{rtt}ms-overlap-{'on' if on else 'off'}", cmd=WORKER_CMD,
                open_loop=True)
            for on in (True, False)}}
    return e2e


def _latency_budget(case: dict, settings: Settings, texts, plan: Plan, get_model) -> None:
    """p99 bound at half rate: batch window + 2 × in-process time of the batch the worker formed then."""
    size = max(1, round(case["open_loop"]["batches"]["mean_size"]))
    t_batch = batch_inference_time(get_model(), settings, texts, size, plan.t_batch_repeats)
    window = settings.batch_window_ms
    case["latency_budget"] = {
        "batch_size_at_half_rate": size, "batch_inference_ms": round(1000 * t_batch, 2),
        "batch_window_ms": window, "p99_bound_ms": round(window + 2000 * t_batch, 2),
    }


def _scaling(broker, settings: Settings, texts, plan: Plan, progress: Progress, out: Path,
             results: dict) -> dict:
    """1 worker (the configured streams × threads) vs 2 single-threaded workers in one group, the 1
    worker with one 2-thread call at a time (the ONNX Runtime default), and 1 worker as a process
    per core (``--processes 0``)."""
    if not plan.scaling:
        return {"skipped": "--quick"}
    e2e = results.get("end_to_end", {})
    if e2e.get("flat_out"):
        one = dict(e2e, reused="the end-to-end flat-out run (same configuration)")
    else:
        one = bench_worker(broker, settings, texts, plan, progress, out, name="one-worker", cmd=WORKER_CMD)
    one_call = bench_worker(broker, settings, texts, plan, progress, out, name="one-worker-1-call-2-threads",
                            cmd=WORKER_CMD, threads=MULTI_THREADS, streams=1)
    two = bench_worker(broker, settings, texts, plan, progress, out, name="two-workers-1-thread",
                       cmd=WORKER_CMD, workers=2, threads=1, streams=1)
    cores = len(os.sched_getaffinity(0))
    per_core = bench_worker(broker, settings, texts, plan, progress, out, name="processes-per-core",
                            cmd=WORKER_CMD, processes=0) if cores > 1 else None
    cases = {"one_worker": one, "one_worker_one_call_two_threads": one_call, "two_workers_one_thread": two}
    if per_core is not None:
        cases["processes_per_core"] = dict(per_core, cores=cores)
    keep = ("workers", "processes", "cores", "inference_threads", "inference_streams", "flat_out", "peak_rss_mb",
            "max_peak_rss_mb", "ready_s", "reused", "all_workers_busy")
    result: dict = {}
    for key, case in cases.items():
        result[key] = {k: v for k, v in case.items() if k in keep}
        result[key]["flat_out"] = {k: v for k, v in case["flat_out"].items() if k != "latencies_ms"}
    base = result["one_worker"]["flat_out"]["texts_per_s"]
    result["ratio"] = round(result["two_workers_one_thread"]["flat_out"]["texts_per_s"] / base, 3)
    if per_core is not None:
        result["processes_ratio"] = round(result["processes_per_core"]["flat_out"]["texts_per_s"] / base, 3)
    return result



# --------------------------------------------------------------------------------------------
# stage 5: the worker on a core of its own
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


OWN_CORE_RAW = (RawVariant(1, 32, 4096), RawVariant(1, 64, 512), RawVariant(1, 64, 4096), RawVariant(1, 128, 1024))


def bench_own_core(broker, settings: Settings, texts: Sequence[str], plan: Plan, progress: Progress,
                   out: Path) -> dict:
    """The worker and the naive agent pinned to one core, the broker and this process (producer,
    consumer) to the others — what separate machines give — then the raw model on that core.

    On a small machine the load generator and the broker otherwise take their CPU from the model:
    this separates the worker's own overhead from theirs. The worker's automatic settings see one
    core and run one single-threaded session call.
    """
    cores = sorted(os.sched_getaffinity(0))
    if not plan.scaling:
        return {"skipped": "--quick"}
    if len(cores) < 2:
        return {"skipped": f"needs 2 cores, this process may use {len(cores)}"}
    mine, others = {cores[0]}, set(cores[1:])
    broker_pid = broker.proc.pid if getattr(broker, "proc", None) is not None else None
    with pinned([os.getpid()] + ([broker_pid] if broker_pid else []), others):
        worker = bench_worker(broker, settings, texts, plan, progress, out, name="own-core", cmd=WORKER_CMD,
                              open_loop=True, cpus=mine)
        naive = bench_worker(broker, settings, texts, plan, progress, out, name="own-core-naive", cmd=NAIVE_CMD,
                             cpus=mine)
        # The p99 bound against the batch window: the same open loop at other windows.
        sweep = []
        for w in plan.window_sweep_ms:
            if w != settings.batch_window_ms and worker.get("open_loop"):
                sw = settings.model_copy(update={"batch_window_ms": w})
                sweep.append((sw, bench_worker(broker, sw, texts, plan, progress, out, name=f"own-core-window-{w:g}ms",
                                               cmd=WORKER_CMD, flat=False, open_loop=True, cpus=mine,
                                               open_loop_rate=worker["open_loop"]["rate_per_s"])))
    with pinned([os.getpid()], mine):
        raw = bench_raw(settings.model, texts, Plan(n=plan.n, raw_variants=OWN_CORE_RAW, rounds=plan.rounds),
                        progress, title="5. raw model on the worker's core")
        model = EmotionModel.load(settings.model, threads=1, streams=1)
        _latency_budget(worker, settings, texts, plan, lambda: model)
        for sw, case in sweep:
            _latency_budget(case, sw, texts, plan, lambda: model)
    for case in (worker, naive, *(c for _, c in sweep)):
        for phase in ("flat_out", "open_loop"):
            case.get(phase, {}).pop("latencies_ms", None)
    windows = [{"batch_window_ms": settings.batch_window_ms, "open_loop": worker.get("open_loop"),
                "latency_budget": worker.get("latency_budget")}]
    windows += [{"batch_window_ms": sw.batch_window_ms, "open_loop": c["open_loop"], "latency_budget": c["latency_budget"]}
                for sw, c in sweep]
    return {"cores": {"worker": sorted(mine), "broker_and_bench": sorted(others)}, "raw": raw, "worker": worker,
            "naive": naive, "window_sweep": sorted(windows, key=lambda x: x["batch_window_ms"])}


def _meta(settings: Settings, data: Path, texts: Sequence[str], plan: Plan, options: BenchOptions) -> dict:
    import onnxruntime

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                 "cpu_count": os.cpu_count(), "python": platform.python_version(),
                 "onnxruntime": onnxruntime.__version__, "load_average_at_start": load},
        "data": str(data), "texts": len(texts), "distinct_texts": len(set(texts)), "quick": options.quick,
        "stages": [s for s in ALL_STAGES if s in set(options.stages)],
        "model": settings.model,
        "settings": {k: getattr(settings, k) for k in ("batch_max", "batch_window_ms", "batch_max_tokens",
                                                        "inference_threads", "inference_streams", "partitions",
                                                        "providers")},
        "plan": {"raw_variants": [v.label for v in plan.raw_variants], "rounds": plan.rounds,
                 "token_budgets": list(plan.token_budgets), "open_loop_s": plan.open_loop_s,
                 "cache_size": plan.cache_size, "duplicate_fraction": plan.duplicate_fraction,
                 "flat_out_records": plan.flat_out_records, "window_sweep_ms": list(plan.window_sweep_ms),
                 "warmup": plan.warmup},
    }

