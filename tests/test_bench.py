"""`emostream bench`, the result cache and the naive agent: behaviour only, never timings."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import orjson
import pytest

from emostream.bench.plan import (IN_PROCESS_STAGES, BenchError, BenchOptions, duplicate_stream, load_texts,
                                  repeat_fraction)
from emostream.bench.run import run_bench
from emostream.bench.stages import NAIVE_CMD
from emostream.models.model import EmotionModel
from emostream.worker.cache import CachedResult, HeadRow, ResultCache, text_key
from emostream.worker.decode import RawMessage
from emostream.worker.pipeline import Enricher
from emostream.worker.settings import Settings

from conftest import FIXTURES, ROOT, WorkerProcess
from tiny_model import write_manifest

DEV = FIXTURES / "go_emotions_small" / "dev.tsv"
TARGET_IDS = {"throughput_vs_raw", "throughput_vs_naive", "p99_latency", "worker_rss"}


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_manifest):
    return EmotionModel.load(str(tiny_manifest))


def raw(values, start=0):
    return [RawMessage(v, None, "texts", 0, start + i, 1_700_000_000.0) for i, v in enumerate(values)]


def records(texts, prefix="r"):
    return [orjson.dumps({"id": f"{prefix}{i}", "text": t}) for i, t in enumerate(texts)]


# --- the benchmark, in-process stages -------------------------------------------------------
def test_quick_in_process_bench_writes_json_markdown_and_plot(tmp_path, tiny_manifest):
    out = tmp_path / "out"
    results = run_bench(BenchOptions(data=DEV, out=out, quick=True, n=40, model=str(tiny_manifest),
                                     stages=IN_PROCESS_STAGES, progress=False, settings=Settings.from_env(environ={})))
    data = orjson.loads((out / "bench.json").read_bytes())
    assert set(data) >= {"meta", "raw", "pipeline", "cache", "end_to_end", "naive", "scaling", "targets"}
    assert data["meta"]["texts"] == 40 and data["meta"]["quick"] is True
    # 1. raw model: several variants, one best, both thread counts
    assert len(data["raw"]["variants"]) >= 3
    assert data["raw"]["best"]["texts_per_s"] == max(v["texts_per_s"] for v in data["raw"]["variants"])
    assert set(data["raw"]["best_by_threads"]) == {"1x1", "2x1", "1x2"}
    assert all(v["texts"] == 40 for v in data["raw"]["variants"])
    # 2. pipeline: every record came out, at each token budget
    for v in data["pipeline"]["variants"]:
        assert v["outputs"] == 40 and v["dead_letters"] == 0
    assert data["pipeline"]["texts_per_s"] > 0
    # cache lever: off vs on on a stream with repeats; the hit rate is what was repeated
    cache = data["cache"]
    assert cache["off"]["cache"]["enabled"] is False and cache["on"]["cache"]["enabled"] is True
    assert cache["hit_rate"] == pytest.approx(cache["repeat_fraction"], abs=1e-3)
    assert cache["on"]["tokens"] < cache["off"]["tokens"]
    # broker stages were not asked for
    for name in ("end_to_end", "naive", "scaling"):
        assert "skipped" in data[name]
    # targets: all four lines, the broker ones not measured
    assert {t["id"] for t in data["targets"]} == TARGET_IDS
    assert all(t["met"] is None for t in data["targets"])
    md = (out / "bench.md").read_text()
    assert "## Targets" in md
    for t in data["targets"]:
        assert t["target"] in md
    assert "90%" in md and "2×" in md and "500 MB" in md
    assert (out / "throughput.png").stat().st_size > 0
    assert results["raw"]["best"] == data["raw"]["best"]


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(BenchError, match="data file not found"):
        run_bench(BenchOptions(data=tmp_path / "nope.tsv", out=tmp_path, quick=True, progress=False,
                               stages=("raw",)))
    p = subprocess.run([sys.executable, "-m", "emostream.worker.cli", "bench", "--quick", "--data",
                        str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "o")],
                       capture_output=True, timeout=120, cwd=ROOT)
    assert p.returncode == 1
    assert b"data file not found" in p.stderr and b"nope.tsv" in p.stderr


def test_bench_without_its_extra_says_what_to_install(tmp_path):
    # A plain install (no bench extra): matplotlib cannot be imported.
    code = ("import sys; sys.modules['matplotlib'] = None; from emostream.worker.cli import main; "
            f"sys.argv = ['emostream', 'bench', '--quick', '--out', {str(tmp_path / 'o')!r}]; main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=ROOT)
    assert p.returncode == 1
    assert p.stderr.decode().splitlines() == [
        "emostream bench needs the bench extra (matplotlib is not installed): pip install 'emostream[bench]'"]
    assert not (tmp_path / "o").exists()


def test_the_worker_runs_without_the_bench():
    code = ("import importlib, pkgutil, sys; import emostream.worker as w\n"
            "for m in pkgutil.iter_modules(w.__path__): importlib.import_module('emostream.worker.' + m.name)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('psutil', 'matplotlib') "
            "or k.startswith('emostream.bench')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode().strip() == "[]"


def test_raw_stage_sub_batches_as_the_worker_does(tiny_manifest):
    from emostream.bench.plan import Plan, RawVariant
    from emostream.bench.progress import Progress
    from emostream.bench.stages import bench_raw
    from emostream.models.encoder import split_sorted

    texts = load_texts(DEV, 60)
    arrival, by_length = RawVariant(1, 16, 64, order="arrival"), RawVariant(1, 16, 64)
    with Progress(False) as progress:
        raw = bench_raw(str(tiny_manifest), texts, Plan(n=60, raw_variants=(arrival, by_length), rounds=1), progress)
    encoder = EmotionModel.load(str(tiny_manifest), threads=1).encoder
    lengths = [len(ids) for ids in encoder.tokenize(texts)]
    ordered = {"arrival": list(range(60)), "length-sorted": sorted(range(60), key=lengths.__getitem__)}
    for v in raw["variants"]:
        batches = [ordered[v["order"]][i:i + 16] for i in range(0, 60, 16)]
        # the encoder's own padding and cuts (split_sorted) for each batch of the stage
        assert v["padded_tokens"] == sum(encoder.embed([texts[i] for i in b], max_tokens=64).padded_tokens
                                         for b in batches)
        assert v["calls"] == sum(len(split_sorted(np.sort([lengths[i] for i in b]), 64)) for b in batches)
        assert v["tokens"] == sum(lengths) and v["texts"] == 60
    arrival_row, sorted_row = raw["variants"]
    assert sorted_row["padded_tokens"] <= arrival_row["padded_tokens"]


def test_load_texts_tsv_and_plain(tmp_path):
    assert load_texts(DEV, 3) == [line.split("\t")[0] for line in DEV.read_text().splitlines()[:3]]
    plain = tmp_path / "texts.txt"
    plain.write_text("first text\n\nsecond\tone with a tab\nthird\n")
    assert load_texts(plain) == ["first text", "second\tone with a tab", "third"]
    assert load_texts(plain, 5) == ["first text", "second\tone with a tab", "third", "first text",
                                    "second\tone with a tab"]


def test_duplicate_stream_has_about_the_fraction_asked():
    texts = [f"text {i}" for i in range(2000)]
    stream = duplicate_stream(texts, 0.2, seed=1)
    assert len(stream) == 2000
    assert 0.17 < repeat_fraction(stream) < 0.23


# --- the result cache -------------------------------------------------------------------------
def _entry(i: int) -> CachedResult:
    return CachedResult(np.full(4, i, np.float32), {"h": HeadRow(np.zeros(2, np.float32), np.zeros(2, bool), 0)})


def test_lru_is_bounded_and_evicts_least_recently_used():
    cache = ResultCache(3)
    for i in range(3):
        cache.put(text_key(f"t{i}"), _entry(i))
    assert cache.get(text_key("t0")) is not None  # t0 is now the most recent
    cache.put(text_key("t3"), _entry(3))
    cache.put(text_key("t4"), _entry(4))
    assert len(cache) == 3
    assert text_key("t1") not in cache and text_key("t2") not in cache
    assert all(text_key(t) in cache for t in ("t0", "t3", "t4"))
    assert cache.stats()["evictions"] == 2
    with pytest.raises(ValueError):
        ResultCache(0)


def test_cache_hits_give_identical_outputs(tiny):
    s = Settings.from_env(environ={}, score_decimals=9)
    texts = ["so happy today", "this is awful", "meh", "what a great idea", "I am so angry"]
    plain = Enricher(tiny, s, clock=lambda: 0.0)
    cached = Enricher(tiny, s, clock=lambda: 0.0, cache_size=100)
    first = cached(raw(records(texts)))  # all misses
    again = cached(raw(records(texts)))  # all hits
    reference = plain(raw(records(texts)))
    assert [o.value for o in first.outputs] == [o.value for o in reference.outputs]
    assert [o.value for o in again.outputs] == [o.value for o in first.outputs]
    assert again.tokens == 0  # nothing was computed
    # a mixed batch: hits carry exactly what their text got when it missed; misses match the model
    mixed = ["new one", texts[1], "another new", texts[3]]
    got = [orjson.loads(o.value)["emotions"] for o in cached(raw(records(mixed, "m"))).outputs]
    firsts = [orjson.loads(o.value)["emotions"] for o in first.outputs]
    assert got[1] == firsts[1] and got[3] == firsts[3]
    want = [orjson.loads(o.value)["emotions"] for o in plain(raw(records(mixed, "m"))).outputs]
    for g, w in zip(got, want):
        assert g["mood"]["scores"] == pytest.approx(w["mood"]["scores"], abs=1e-6)
    stats = cached.cache_stats()
    assert stats["hits"] == 5 + 2 and stats["misses"] == 5 + 2 and stats["entries"] == 7


def test_hit_rate_is_counted_and_repeats_skip_the_model(tiny):
    class Counting:
        def __init__(self, model):
            self.model, self.info, self.heads, self.seen = model, model.info, model.heads, []

        def predict(self, texts, max_tokens=4096):
            self.seen.extend(texts)
            return self.model.predict(texts, max_tokens=max_tokens)

    model = Counting(tiny)
    enricher = Enricher(model, Settings.from_env(environ={}), cache_size=10)
    stream = ["a", "b", "a", "c", "d", "b", "e", "a", "f", "g"]  # 3 repeats in 10
    for start in (0, 5):
        res = enricher(raw(records(stream[start:start + 5]), start))
        assert len(res.outputs) == 5
    assert sorted(model.seen) == ["a", "b", "c", "d", "e", "f", "g"]  # each text computed once
    stats = enricher.cache_stats()
    assert stats["hits"] == 3 and stats["misses"] == 7 and stats["hit_rate"] == pytest.approx(0.3)


def test_cache_is_off_by_default(tiny):
    enricher = Enricher(tiny, Settings.from_env(environ={}))
    enricher(raw(records(["x", "x"])))
    assert enricher.cache is None and enricher.cache_stats()["enabled"] is False


# --- through the broker ------------------------------------------------------------------------
@pytest.mark.broker
def test_naive_agent_one_output_per_record(topics, tmp_path):
    agent = WorkerProcess(topics.env(), tmp_path / "naive.log", cmd=NAIVE_CMD)
    try:
        n = 30
        values = [orjson.dumps({"id": f"n{i}", "text": f"I feel fine, number {i}", "seq": i}) for i in range(n)]
        topics.produce(values, keys=[f"k{i}".encode() for i in range(n)])
        recs = topics.consume(topics.settings.output_topic, n, timeout=120)
        assert len(recs) == n, agent.output()[-3000:]
        outs = [orjson.loads(r.value) for r in recs]
        assert sorted(o["id"] for o in outs) == sorted(f"n{i}" for i in range(n))
        assert all(r.key == f"k{o['seq']}".encode() for r, o in zip(recs, outs))
        assert all(len(o["emotions"]["go_emotions"]["scores"]) == 28 for o in outs)
        assert len(topics.consume(topics.settings.output_topic, n + 1, timeout=3)) == n  # nothing extra
    finally:
        agent.stop()


@pytest.mark.broker
def test_quick_end_to_end_stage_reports_throughput_latency_and_rss(engine, tmp_path, tiny_manifest):
    out = tmp_path / "out"
    data = run_bench(BenchOptions(data=DEV, out=out, quick=True, n=40, model=str(tiny_manifest),
                                  stages=("end_to_end",), progress=False, engines=(engine,),
                                  settings=Settings.from_env(environ={})))
    assert data["meta"]["engines"] == [engine] and list(data["engines"]) == [engine]
    e2e = data["end_to_end"]
    assert e2e is data["engines"][engine]["end_to_end"]
    assert "broker" in e2e["flat_out"]["cpu_cores_used"]  # the broker's processes are metered (Kafka: its JVM)
    assert e2e["flat_out"]["records"] == 40 and e2e["flat_out"]["texts_per_s"] > 0
    assert e2e["open_loop"]["records"] >= 40
    assert set(e2e["open_loop"]["latency"]) >= {"p50_ms", "p95_ms", "p99_ms"}
    assert e2e["max_peak_rss_mb"] > 0 and e2e["exit_codes"] == [0]
    assert e2e["duplicate_outputs"] == 0 and e2e["dead_letters"] == 0
    targets = {t["id"]: t for t in data["targets"]}
    assert targets["worker_rss"]["met"] is not None and targets["p99_latency"]["met"] is not None
    assert (out / "latency.png").exists()
    assert os.path.exists(out / "bench.md")
    # The overlap lever (full runs only) renders as two more rows and a speed-up line.
    from emostream.bench import report

    e2e["publish_overlap_comparison"] = {"publish_delay_ms": 60, "on": dict(e2e), "off": dict(e2e)}
    md = report.markdown(data)
    assert "publish +60 ms, overlap on (default)" in md and "publish +60 ms, overlap off" in md
    assert "(1.00×) flat out" in md


def test_engines_side_by_side_show_each_engines_figures_and_targets():
    from emostream.bench import report

    def case(tps, p99, broker_cpu):
        return {"flat_out": {"texts_per_s": tps, "cpu_cores_used": {"broker": broker_cpu, "bench_client": 0.1,
                                                                     "workers": 1.5, "other": 0.0}},
                "open_loop": {"latency": {"count": 100, "p50_ms": 40.0, "p95_ms": 60.0, "p99_ms": p99}},
                "latency_budget": {"batch_window_ms": 50.0, "batch_inference_ms": 20.0, "p99_bound_ms": 90.0,
                                   "batch_size_at_half_rate": 8}, "max_peak_rss_mb": 210.0}

    results = {"meta": {"host": {"cpu_count": 2}}, "raw": {"best": {"texts_per_s": 1000.0}}, "engines": {}}
    for name, tps, p99, cpu in (("tansu", 850.0, 150.0, 0.12), ("kafka", 900.0, 80.0, 0.31)):
        mine = {"end_to_end": case(tps, p99, cpu), "naive": {"flat_out": {"texts_per_s": 200.0}}}
        mine["targets"] = report.evaluate_targets(results | mine)
        results["engines"][name] = mine
    text = "\n".join(report._engines_section(results))
    assert "| measure | `tansu` | `kafka` |" in text
    assert "| end to end, flat out (texts/s) | 850.0 (85% of raw) | 900.0 (90% of raw) |" in text
    assert "| CPU during flat out: broker (cores) | 0.12 | 0.31 |" in text
    p99_row = next(line for line in text.splitlines() if line.startswith("| p99 latency"))
    assert "p99 150 ms vs 50 + 2 × 20 = 90 ms (batches of ~8); **no**" in p99_row
    assert "p99 80 ms vs 50 + 2 × 20 = 90 ms (batches of ~8); **yes**" in p99_row
    assert report._engines_section({"engines": {"tansu": {}}}) == []  # one engine: the sections say it all


def test_cpu_ceiling_is_what_broker_and_load_generator_leave():
    from emostream.bench.report import _cpu_ceiling

    results = {"meta": {"host": {"cpu_count": 2}}, "raw": {"best": {"texts_per_s": 400.0}},
               "end_to_end": {"flat_out": {"cpu_cores_used": {"workers": 1.5, "broker": 0.1, "bench_client": 0.1,
                                                               "other": 0.0}}}}
    line = _cpu_ceiling(results)
    assert "0.20 of 2 cores" in line and "90%" in line and "360.0 texts/s" in line
    assert _cpu_ceiling({"meta": {}}) is None


# --- stage 5: the worker on a core of its own -------------------------------------------------
TWO_CORES = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")


@TWO_CORES
def test_pinned_moves_every_thread_and_puts_it_back():
    import threading

    from emostream.bench.load import _threads_of, pinned

    before = os.sched_getaffinity(0)
    core = {min(before)}
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pinned([os.getpid()], core):
            assert {frozenset(os.sched_getaffinity(tid)) for tid in _threads_of(os.getpid())} == {frozenset(core)}
        assert {frozenset(os.sched_getaffinity(tid)) for tid in _threads_of(os.getpid())} == {frozenset(before)}
    finally:
        stop.set()
        t.join()


@TWO_CORES
def test_spawned_processes_run_on_the_cores_asked_for(tmp_path):
    from emostream.bench.load import spawn

    core = {max(os.sched_getaffinity(0))}
    cmd = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    with spawn(cmd, [dict(os.environ)], tmp_path, "aff", cpus=core) as procs:
        procs.procs[0].wait(30)
    assert (tmp_path / "aff-0.log").read_text().strip() == str(sorted(core))


def test_own_core_stage_is_skipped_in_quick_mode(tmp_path, tiny_manifest):
    data = run_bench(BenchOptions(data=DEV, out=tmp_path, quick=True, n=20, model=str(tiny_manifest),
                                  stages=("own_core",), progress=False, settings=Settings.from_env(environ={})))
    assert data["own_core"] == {"skipped": "--quick"}
    assert all("own_core" not in t for t in data["targets"])


@TWO_CORES
@pytest.mark.broker
def test_own_core_stage_compares_the_pinned_worker_with_the_raw_model_on_its_core(tmp_path, tiny_manifest):
    from emostream.bench import report
    from emostream.bench.broker import open_broker
    from emostream.bench.plan import Plan
    from emostream.bench.progress import Progress
    from emostream.bench.stages import bench_own_core

    texts = load_texts(DEV, 40)
    plan = Plan(n=40, raw_variants=(), rounds=1, flat_out_records=40, open_loop_s=1.0, open_loop_min=20, warmup=8,
                t_batch_repeats=2, window_sweep_ms=(0.0,))
    s = Settings.from_env(environ={}).model_copy(update={"model": str(tiny_manifest), "session_timeout_s": 10.0})
    with open_broker(tmp_path) as broker, Progress(False) as progress:
        own = bench_own_core(broker, s, texts, plan, progress, tmp_path)
    assert own["cores"]["worker"] == [min(os.sched_getaffinity(0))]
    assert set(own["cores"]["broker_and_bench"]) == os.sched_getaffinity(0) - set(own["cores"]["worker"])
    for case in (own["worker"], own["naive"]):
        assert case["flat_out"]["records"] == 40 and case["exit_codes"] == [0]
        assert case["dead_letters"] == 0 and case["duplicate_outputs"] == 0
    assert own["worker"]["open_loop"]["records"] >= 20 and own["worker"]["latency_budget"]["p99_bound_ms"] > 0
    assert {v["threads"] for v in own["raw"]["variants"]} == {1} and own["raw"]["best"]["texts_per_s"] > 0
    # The report: a targets column of its own and section 5, every ratio from these numbers.
    results = {"meta": {"host": {"cpu_count": 2}}, "own_core": own}
    targets = report.evaluate_targets(results)
    assert {t["id"] for t in targets} == TARGET_IDS and all(t["own_core"]["met"] is not None for t in targets)
    ratio = own["worker"]["flat_out"]["texts_per_s"] / own["raw"]["best"]["texts_per_s"]
    assert f"= {ratio:.0%}" in next(t for t in targets if t["id"] == "throughput_vs_raw")["own_core"]["measured"]
    section = "\n".join(report._own_core_section(results))
    assert f"Worker / raw model on the same core: **{ratio:.0%}**" in section
    # The window sweep: the configured window and the one asked for, each with its own bound.
    assert [x["batch_window_ms"] for x in own["window_sweep"]] == [0.0, s.batch_window_ms]
    zero = own["window_sweep"][0]
    assert zero["open_loop"]["records"] >= 20 and zero["latency_budget"]["batch_window_ms"] == 0.0
    assert f"| {s.batch_window_ms:g} ms (as configured) |" in section and "| 0 ms |" in section


@TWO_CORES
@pytest.mark.broker
def test_scaling_stage_measures_one_worker_against_a_process_per_core(tmp_path, tiny_manifest):
    from emostream.bench import report
    from emostream.bench.broker import open_broker
    from emostream.bench.plan import Plan
    from emostream.bench.progress import Progress
    from emostream.bench.stages import bench_scaling

    texts = load_texts(DEV, 40)
    # Enough records that the children's CPU time spans more than a few clock ticks (the tiny model
    # ran 40 in under one tick, and their CPU read 0.0 once in a full run).
    plan = Plan(n=40, raw_variants=(), rounds=1, flat_out_records=1000, warmup=8, t_batch_repeats=2)
    s = Settings.from_env(environ={}).model_copy(update={"model": str(tiny_manifest), "session_timeout_s": 10.0,
                                                        "metrics_port": 0})
    with open_broker(tmp_path) as broker, Progress(False) as progress:
        sc = bench_scaling(broker, s, texts, plan, progress, tmp_path, {})
    per_core = sc["processes_per_core"]
    cores = len(os.sched_getaffinity(0))
    # RSS and CPU are read from the command's children: one per core, each a worker of its own.
    assert per_core["processes"] == 0 and len(per_core["peak_rss_mb"]) == cores == per_core["cores"]
    assert all(mb > 50 for mb in per_core["peak_rss_mb"])
    assert per_core["flat_out"]["records"] == 1000 and per_core["flat_out"]["cpu_cores_used"]["workers"] > 0
    assert sc["processes_ratio"] == round(per_core["flat_out"]["texts_per_s"]
                                          / sc["one_worker"]["flat_out"]["texts_per_s"], 3)
    md = "\n".join(report._scaling_section({"scaling": sc}))
    assert f"`--processes 0`: {cores} processes, each pinned to a core" in md
    assert f"**{sc['processes_ratio']:.2f}×**" in md
    line = report._processes_line({"raw": {"best": {"texts_per_s": 1000.0}}, "scaling": sc})
    assert f"= {per_core['flat_out']['texts_per_s'] / 1000.0:.0%} of the raw model's best" in line
