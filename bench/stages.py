"""What each stage of ``emostream bench`` measures; every stage runs on the same texts and returns
a plain dict (:mod:`.report` renders them).

1. :func:`bench_raw` — tokenization + the ONNX backbone session alone, through the worker's own
   :meth:`~emostream.models.encoder.Encoder.embed` (length-sorted sub-batches cut by
   ``split_sorted`` within the padded-token budget, spread over the concurrent calls), at several
   batch sizes / budgets, intra-op threads × concurrent calls and spin-waiting on/off; the best
   is the model's own limit on this machine.
2. :func:`bench_pipeline` — :class:`~emostream.worker.pipeline.Enricher` on raw JSON records in
   arrival order, batches of ``batch_max`` (decode → validate → tokenize → embed → heads →
   encode), no Kafka, at several padded-token budgets; the best budget is what the later stages
   run with (unless ``EMOSTREAM_BATCH_MAX_TOKENS`` is set). :func:`bench_cache` runs it on a
   stream with ~20 % reposts, result cache off and on.
3. :func:`bench_end_to_end` — a broker and a real worker process (:func:`.load.bench_worker`):
   flat out, then open loop at half that rate; once more with the consumer fetch wait at faust's
   fixed 1500 ms, and with every publish delayed, publish overlap on and off.
4. the same with the naive per-message agent (:mod:`.naive_agent`), and :func:`bench_scaling`:
   one worker against two single-threaded workers in one consumer group, one 2-thread call at a
   time, and a process per core.
5. :func:`bench_own_core` — the worker (and the naive agent) pinned to one core while the broker
   and the bench run on the others, as separate machines would, against the raw model on that
   same core; and the open loop again at other batch windows, each against its own latency bound.

Raw and pipeline variants run ``Plan.rounds`` times, interleaved, keeping each one's best run:
the machine is shared and a burst of load elsewhere should not sink one variant.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from emostream.models.encoder import Encoder
from emostream.models.manifest import find_manifest
from emostream.models.model import EmotionModel
from emostream.worker.decode import RawMessage
from emostream.worker.pipeline import Enricher
from emostream.worker.settings import Settings, worker_command

from .broker import BenchBroker
from .load import bench_worker, pinned
from .plan import MULTI_THREADS, Plan, RawVariant, duplicate_stream, raw_messages, repeat_fraction
from .progress import Progress

WORKER_CMD = worker_command()
NAIVE_CMD = [sys.executable, "-m", "emostream.bench.naive_agent"]


# --------------------------------------------------------------------------------------------
# stage 1: the raw model
class _CountingEncoder(Encoder):
    """The worker's encoder, counting the session calls its sub-batching makes (the report's ``calls``)."""

    calls = 0

    def run_chunks(self, chunks):
        self.calls += len(chunks)
        return super().run_chunks(chunks)


def _raw_encoder(model_name: str, v: RawVariant) -> _CountingEncoder:
    manifest = find_manifest(model_name)
    fused = [h.output for h in manifest.heads if h.format == "fused"]  # the outputs EmotionModel asks for
    return _CountingEncoder(manifest.backbone, v.threads, spinning=v.spinning, extra_outputs=fused, streams=v.streams)


def _raw_pass(encoder: _CountingEncoder, batches: Sequence[Sequence[str]], v: RawVariant,
              on_batch: Callable[[int], None]) -> dict:
    """Each batch through ``Encoder.embed`` as the worker calls it: tokenized, sorted by length, cut
    into sub-batches of ≤ max_tokens padded tokens, run on the encoder's concurrent calls."""
    calls = encoder.calls
    texts = tokens = padded = 0
    t0 = time.perf_counter()
    for batch in batches:
        enc = encoder.embed(batch, max_tokens=v.max_tokens)
        texts += len(batch)
        tokens += enc.tokens
        padded += enc.padded_tokens
        on_batch(len(batch))
    seconds = time.perf_counter() - t0
    return {"threads": v.threads, "streams": v.streams, "batch_size": v.batch_size, "max_tokens": v.max_tokens,
            "order": v.order, "spinning": v.spinning, "label": v.label, "texts": texts, "seconds": round(seconds, 4),
            "texts_per_s": round(texts / seconds, 2), "calls": encoder.calls - calls, "tokens": tokens,
            "padded_tokens": padded}


def bench_raw(model_name: str, texts: Sequence[str], plan: Plan, progress: Progress,
              title: str = "1. raw model (tokenize + ONNX)") -> dict:
    """Batches of ``batch_size`` texts in arrival order (``order="arrival"``: what a worker is
    handed) or from the whole set sorted by token length first (``"length-sorted"``: every batch
    as even as the texts allow, the model's best case)."""
    encoders: dict[tuple[int, bool, int], _CountingEncoder] = {}

    def encoder_for(v: RawVariant) -> _CountingEncoder:
        key = (v.threads, v.spinning, v.streams)
        if key not in encoders:
            encoder = _raw_encoder(model_name, v)
            encoder.embed(list(texts[:32]))  # warm-up: first runs allocate
            encoders[key] = encoder
        return encoders[key]

    variants = list(plan.raw_variants)
    task = progress.task(title, plan.rounds * len(variants) * len(texts))
    for v in variants:
        encoder_for(v)
    by_length = texts
    if encoders:
        lengths = [len(ids) for ids in next(iter(encoders.values())).tokenize(texts)]
        by_length = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]

    def batches(v: RawVariant) -> list[Sequence[str]]:
        source = by_length if v.order == "length-sorted" else texts
        return [source[i:i + v.batch_size] for i in range(0, len(source), v.batch_size)]

    runs: dict[RawVariant, list[dict]] = {v: [] for v in variants}
    for _ in range(plan.rounds):  # interleaved, so a burst of load elsewhere does not sink one variant
        for v in variants:
            runs[v].append(_raw_pass(encoder_for(v), batches(v), v, lambda k: progress.update(task, advance=k)))
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
    """The Enricher on a stream where ~``duplicate_fraction`` of the texts repeat a recent one,
    result cache off and on."""
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
def bench_end_to_end(broker: BenchBroker, settings: Settings, texts, plan: Plan, progress: Progress, out: Path,
                     get_model: Callable[[], EmotionModel]) -> dict:
    """The worker as configured, then (full runs) the levers measured through the broker."""
    e2e = bench_worker(broker, settings, texts, plan, progress, out, name="e2e", cmd=WORKER_CMD, open_loop=True)
    latency_budget(e2e, settings, texts, plan, get_model)
    ms = plan.fetch_wait_compare_ms
    if ms and settings.fetch_max_wait_ms != ms:
        # The same worker with the consumer fetch wait faust would use (Tansu holds a waiting fetch).
        alt = settings.model_copy(update={"fetch_max_wait_ms": ms})
        case = bench_worker(broker, alt, texts, plan, progress, out, name=f"e2e-fetch-wait-{ms}ms",
                            cmd=WORKER_CMD, open_loop=True)
        latency_budget(case, alt, texts, plan, get_model)
        e2e["fetch_wait_comparison"] = {"fetch_max_wait_ms": ms, **case}
    rtt = plan.publish_rtt_ms
    if rtt:
        # A networked cluster's acks=all round-trip, simulated by delaying each batch's publish:
        # with overlap the next batch is inferred meanwhile; without, inference waits for it.
        e2e["publish_overlap_comparison"] = {"publish_delay_ms": rtt, **{
            ("on" if on else "off"): bench_worker(
                broker, settings.model_copy(update={"fault_publish_delay_ms": rtt, "publish_overlap": on}), texts,
                plan, progress, out, name=f"e2e-publish-{rtt}ms-overlap-{'on' if on else 'off'}", cmd=WORKER_CMD,
                open_loop=True)
            for on in (True, False)}}
    return e2e


def latency_budget(case: dict, settings: Settings, texts, plan: Plan, get_model) -> None:
    """p99 bound at half rate: batch window + 2 × in-process time of the batch the worker formed then."""
    size = max(1, round(case["open_loop"]["batches"]["mean_size"]))
    t_batch = batch_inference_time(get_model(), settings, texts, size, plan.t_batch_repeats)
    window = settings.batch_window_ms
    case["latency_budget"] = {
        "batch_size_at_half_rate": size, "batch_inference_ms": round(1000 * t_batch, 2),
        "batch_window_ms": window, "p99_bound_ms": round(window + 2000 * t_batch, 2),
    }


def bench_scaling(broker: BenchBroker, settings: Settings, texts, plan: Plan, progress: Progress, out: Path,
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
OWN_CORE_RAW = (RawVariant(1, 32, 4096), RawVariant(1, 64, 512), RawVariant(1, 64, 4096), RawVariant(1, 128, 1024))


def bench_own_core(broker: BenchBroker, settings: Settings, texts: Sequence[str], plan: Plan, progress: Progress,
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
    with pinned([os.getpid(), *broker.pids], others):
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
        latency_budget(worker, settings, texts, plan, lambda: model)
        for sw, case in sweep:
            latency_budget(case, sw, texts, plan, lambda: model)
    for case in (worker, naive, *(c for _, c in sweep)):
        for phase in ("flat_out", "open_loop"):
            case.get(phase, {}).pop("latencies_ms", None)
    windows = [{"batch_window_ms": settings.batch_window_ms, "open_loop": worker.get("open_loop"),
                "latency_budget": worker.get("latency_budget")}]
    windows += [{"batch_window_ms": sw.batch_window_ms, "open_loop": c["open_loop"], "latency_budget": c["latency_budget"]}
                for sw, c in sweep]
    return {"cores": {"worker": sorted(mine), "broker_and_bench": sorted(others)}, "raw": raw, "worker": worker,
            "naive": naive, "window_sweep": sorted(windows, key=lambda x: x["batch_window_ms"])}

