"""``emostream demo``: embedded broker + a real worker process + sample traffic, then a summary."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from importlib import resources

import orjson
from rich.console import Console
from rich.table import Table

from .broker import EmbeddedBroker
from .kafka_io import consume, ensure_topics, produce
from .settings import Settings, child_env, worker_command

# A few records the worker must reject, to show the dead-letter topic at work.
BAD_RECORDS = [b"this is not json", b'{"id": "no-text"}', b'{"text": "   "}', b"\xff\xfe broken utf-8"]


def sample_texts(count: int) -> list[str]:
    lines = resources.files("emostream.worker").joinpath("data/sample_texts.txt").read_text().splitlines()
    lines = [x for x in lines if x.strip()]
    return (lines * (count // len(lines) + 1))[:count]


def run_demo(settings: Settings, count: int = 300, show: int = 8) -> int:
    console = Console(stderr=False)
    with EmbeddedBroker() as broker:
        settings = settings.model_copy(update={"broker": broker.url, "group_id": "emostream-demo",
                                                "include_text": True, "partitions": 4})
        console.print(f"[bold]emostream demo[/] — embedded broker on {broker.address}")
        asyncio.run(ensure_topics(settings, [settings.input_topic, settings.output_topic, settings.dlq_topic]))
        env = child_env(settings, log_level="warning")  # keep the output readable
        worker = subprocess.Popen(worker_command(), env=env)
        try:
            return _traffic(console, settings, worker, count, show)
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
            console.print(f"worker stopped (exit code {worker.wait()}); broker stopping")


def _traffic(console: Console, settings: Settings, worker: subprocess.Popen, count: int, show: int) -> int:
    texts = sample_texts(count)
    good = [(f"demo-{i}".encode(), orjson.dumps({"id": f"demo-{i}", "text": t, "lang": "en"}))
            for i, t in enumerate(texts)]
    bad = [(f"bad-{i}".encode(), v) for i, v in enumerate(BAD_RECORDS)]
    t0 = time.time()
    asyncio.run(produce(settings, settings.input_topic, good + bad))
    console.print(f"sent {len(good)} sample texts and {len(bad)} malformed records to '{settings.input_topic}'")

    async def collect():
        outs, dlq = [], []
        want = len(good) + len(bad)
        async for rec in consume(settings, [settings.output_topic, settings.dlq_topic], want, timeout_s=90):
            (outs if rec.topic == settings.output_topic else dlq).append(orjson.loads(rec.value))
            if worker.poll() is not None:
                break
        return outs, dlq

    outs, dlq = asyncio.run(collect())
    elapsed = time.time() - t0

    table = Table(title=f"first {min(show, len(outs))} enriched records")
    table.add_column("id")
    table.add_column("text", overflow="fold", max_width=56)
    table.add_column("labels (score)")
    for rec in outs[:show]:
        res = next(iter(rec["emotions"].values()))
        shown = res["labels"] or [res["top"]]
        table.add_row(rec["id"], rec.get("text", ""), ", ".join(f"{l} {res['scores'][l]:.2f}" for l in shown))
    console.print(table)
    if dlq:
        console.print("dead-lettered: " + ", ".join(f"{d['id']} ({d['error']['code']})" for d in dlq))
    tops = Counter(next(iter(r["emotions"].values()))["top"] for r in outs)
    console.print("most frequent top labels: " + ", ".join(f"{k} {v}" for k, v in tops.most_common(8)))
    ok = len(outs) == len(good) and len(dlq) == len(bad)
    style = "green" if ok else "red"
    console.print(f"[{style}]{len(outs)}/{len(good)} enriched, {len(dlq)}/{len(bad)} dead-lettered "
                  f"in {elapsed:.1f} s (worker start and group join included)[/]")
    return 0 if ok else 1
