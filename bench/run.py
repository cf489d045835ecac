"""One ``emostream bench`` run: the stages asked for, then ``bench.json``, ``bench.md`` and the
plots (:mod:`.report`). Targets are report lines, never assertions."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Sequence

import onnxruntime

from emostream.models.model import EmotionModel
from emostream.worker.runner import load_model
from emostream.worker.settings import Settings, env_name

from . import report
from .broker import open_broker
from .load import bench_worker
from .plan import (ALL_STAGES, BROKER_STAGES, BenchError, BenchOptions, Plan, default_data_path, load_texts,
                   make_plan)
from .progress import Progress
from .stages import (NAIVE_CMD, bench_cache, bench_end_to_end, bench_own_core, bench_pipeline, bench_raw,
                     bench_scaling)


def run_bench(options: BenchOptions) -> dict:
    """Run the stages asked for; write bench.json, bench.md and plots into ``options.out``."""
    unknown = set(options.stages) - set(ALL_STAGES)
    if unknown:
        raise BenchError(f"unknown stages {sorted(unknown)}; known: {', '.join(ALL_STAGES)}")
    if not options.engines or set(options.engines) - {"tansu", "kafka"}:
        raise BenchError(f"engines must be tansu and/or kafka, not {list(options.engines)}")
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
            "cache_size": 0, "fetch_max_wait_ms": settings.fetch_max_wait_ms}
        if "cache" in stages:
            results["cache"] = bench_cache(get_model(), settings, texts, plan, progress, options.seed)
        # A shorter session timeout only makes the group join faster on the embedded broker.
        # cache off: the bench repeats its texts across phases, and every record must be inferred
        wupdate = {"session_timeout_s": min(settings.session_timeout_s, 10.0), "cache_size": 0}
        wsettings = settings.model_copy(update=wupdate)
        if stages & set(BROKER_STAGES):
            # Each engine's broker stages; the first engine's also fill the top-level sections.
            results["engines"] = {}
            for engine in options.engines:
                mine = {name: section for name, section in skipped.items() if name in BROKER_STAGES}
                with open_broker(out / engine, engine) as broker:
                    if "end_to_end" in stages:
                        mine["end_to_end"] = bench_end_to_end(broker, wsettings, texts, plan, progress, out / engine,
                                                              get_model)
                    if "naive" in stages:
                        mine["naive"] = bench_worker(broker, wsettings, texts, plan, progress, out / engine,
                                                     name="naive", cmd=NAIVE_CMD)
                    if "scaling" in stages:
                        mine["scaling"] = bench_scaling(broker, wsettings, texts, plan, progress, out / engine,
                                                        results | mine)
                    if "own_core" in stages:
                        mine["own_core"] = bench_own_core(broker, wsettings, texts, plan, progress, out / engine)
                mine["targets"] = report.evaluate_targets(results | mine)
                results["engines"][engine] = mine
            results.update({k: v for k, v in results["engines"][options.engines[0]].items() if k != "targets"})
    results["meta"]["duration_s"] = round(time.time() - started, 1)
    try:
        results["meta"]["host"]["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    results["targets"] = report.evaluate_targets(results)
    report.write_all(results, out)
    return results


def _meta(settings: Settings, data: Path, texts: Sequence[str], plan: Plan, options: BenchOptions) -> dict:
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
        "engines": list(options.engines),
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

