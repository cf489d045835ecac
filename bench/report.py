"""What ``emostream bench`` writes: ``bench.json``, ``bench.md`` (with the targets) and PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import orjson

RSS_LIMIT_MB = 500.0
RAW_SHARE = 0.9
NAIVE_FACTOR = 2.0


def _get(d: dict, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def evaluate_targets(results: dict) -> list[dict]:
    """The four performance targets (docs/performance.md): each with what was measured and whether
    it was met (None: not measured) for the worker as configured, sharing the machine with the
    broker and the bench; under ``own_core`` the same for the worker on a core of its own against
    the raw model and the naive agent on that core, when that stage ran."""
    main = _targets_for(results.get("end_to_end") or {}, _get(results, "raw", "best", "texts_per_s"),
                        _get(results, "naive", "flat_out", "texts_per_s"))
    own = results.get("own_core") or {}
    if own.get("worker"):
        for t, d in zip(main, _targets_for(own["worker"], _get(own, "raw", "best", "texts_per_s"),
                                           _get(own, "naive", "flat_out", "texts_per_s"))):
            t["own_core"] = {"measured": d["measured"], "met": d["met"]}
    return main


def _targets_for(case: dict, raw: float | None, naive: float | None) -> list[dict]:
    e2e = _get(case, "flat_out", "texts_per_s")
    p99 = _get(case, "open_loop", "latency", "p99_ms")
    budget = _get(case, "latency_budget") or {}
    rss = _get(case, "max_peak_rss_mb")
    targets = []

    def add(tid: str, target: str, measured: str | None, met: bool | None) -> None:
        targets.append({"id": tid, "target": target, "measured": measured or "not measured", "met": met})

    target = f"end-to-end throughput ≥ {RAW_SHARE:.0%} of the raw model's best"
    if e2e is not None and raw:
        add("throughput_vs_raw", target, f"{e2e:.1f} vs {raw:.1f} texts/s = {e2e / raw:.0%}", e2e >= RAW_SHARE * raw)
    else:
        add("throughput_vs_raw", target, None, None)
    target = f"end-to-end throughput ≥ {NAIVE_FACTOR:g}× the per-message agent"
    if e2e is not None and naive:
        add("throughput_vs_naive", target, f"{e2e:.1f} vs {naive:.1f} texts/s = {e2e / naive:.2f}×",
            e2e >= NAIVE_FACTOR * naive)
    else:
        add("throughput_vs_naive", target, None, None)
    target = "p99 latency at half capacity ≤ batch window + 2 × one batch's inference time"
    if p99 is not None and budget:
        add("p99_latency", target,
            f"p99 {p99:.0f} ms vs {budget['batch_window_ms']:.0f} + 2 × {budget['batch_inference_ms']:.0f} "
            f"= {budget['p99_bound_ms']:.0f} ms (batches of ~{budget['batch_size_at_half_rate']})",
            p99 <= budget["p99_bound_ms"])
    else:
        add("p99_latency", target, None, None)
    target = f"worker peak RSS ≤ {RSS_LIMIT_MB:.0f} MB"
    if rss is not None:
        add("worker_rss", target, f"{rss:.0f} MB", rss <= RSS_LIMIT_MB)
    else:
        add("worker_rss", target, None, None)
    return targets


# --------------------------------------------------------------------------------------------
def write_all(results: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    paths["json"].write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                                           | orjson.OPT_NON_STR_KEYS))
    paths.update(write_plots(results, out))
    paths["markdown"].write_text(markdown(results, {k: v.name for k, v in paths.items() if k.endswith("_plot")}))
    return paths


def _yes(met) -> str:
    return "—" if met is None else ("**yes**" if met else "**no**")


def _skip_line(section: dict) -> str | None:
    return f"_skipped: {section['skipped']}_" if isinstance(section, dict) and "skipped" in section else None


def _runs(v: dict) -> str:
    runs = v.get("runs_texts_per_s") or []
    return f" ({' / '.join(f'{x:.0f}' for x in runs)})" if len(runs) > 1 else ""


def _load(load) -> str:
    return "—" if not load else ", ".join(f"{x:.1f}" for x in load)


def _cpu_ceiling(results: dict) -> str | None:
    """What the broker and the bench's own clients leave of the machine to the worker.

    The raw model uses every core; end to end, the broker and the load generator run on the same
    cores, so even a worker with no overhead of its own could reach only that share of raw."""
    cpu = _get(results, "end_to_end", "flat_out", "cpu_cores_used") or {}
    cores = _get(results, "meta", "host", "cpu_count")
    raw = _get(results, "raw", "best", "texts_per_s")
    if not cpu or not cores or not raw:
        return None
    others = cpu.get("broker", 0) + cpu.get("bench_client", 0) + cpu.get("other", 0)
    share = max(0.0, (cores - others) / cores)
    return (f"CPU ceiling: during the flat-out run the broker and the bench's producer/consumer used {others:.2f} of "
            f"{cores} cores, so a worker with zero overhead of its own could reach at most {share:.0%} of the raw "
            f"model here ({raw * share:.1f} texts/s). On a real deployment the broker and the producers run elsewhere.")


def _processes_line(results: dict) -> str | None:
    """The throughput target again for the same worker run as one process per core (not the default)."""
    per_core = _get(results, "scaling", "processes_per_core", "flat_out", "texts_per_s")
    raw = _get(results, "raw", "best", "texts_per_s")
    if not per_core or not raw:
        return None
    n = len(results["scaling"]["processes_per_core"]["peak_rss_mb"])
    return (f"The same worker as one process per core (`--processes 0`, {n} processes; section \"1 vs 2 worker "
            f"processes\"): {per_core:.1f} vs {raw:.1f} texts/s = {per_core / raw:.0%} of the raw model's best.")


def _cpu(phase: dict) -> str:
    cpu = phase.get("cpu_cores_used") or {}
    if not cpu:
        return "—"
    return (f"worker(s) {cpu.get('workers', 0):.2f}, broker {cpu.get('broker', 0):.2f}, bench "
            f"{cpu.get('bench_client', 0):.2f}, other processes {cpu.get('other', 0):.2f}")


def _lat(l: dict) -> str:
    if not l or not l.get("count"):
        return "—"
    return f"{l['p50_ms']:.0f} / {l['p95_ms']:.0f} / {l['p99_ms']:.0f} ms"


def _engines_section(results: dict) -> list[str]:
    """The broker stages' headline figures and the targets, one column per broker engine."""
    engines = results.get("engines") or {}
    if len(engines) < 2:
        return []
    names = list(engines)
    raw = _get(results, "raw", "best", "texts_per_s")
    lines = ["## Brokers side by side", "",
             f"The broker stages ran once on each engine, one after the other, with the same worker settings. "
             f"Sections 3-5 show the first (`{names[0]}`) in full; `bench.json` holds every engine's "
             "(`engines`). Tansu holds a fetch until its wait ends; Apache Kafka answers one as soon as data "
             "arrives.", "",
             "| measure | " + " | ".join(f"`{n}`" for n in names) + " |", "| --- |" + " --- |" * len(names)]

    def row(label: str, cell) -> None:
        cells = []
        for n in names:
            try:
                cells.append(cell(engines[n]))
            except (KeyError, TypeError):
                cells.append("—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def flat(e):
        x = e["end_to_end"]["flat_out"]["texts_per_s"]
        return f"{x:.1f}" + (f" ({x / raw:.0%} of raw)" if raw else "")

    def cpu(key):
        return lambda e: f"{e['end_to_end']['flat_out']['cpu_cores_used'][key]:.2f}"

    def own(e):
        w, r = e["own_core"]["worker"]["flat_out"]["texts_per_s"], e["own_core"]["raw"]["best"]["texts_per_s"]
        return f"{w:.1f} vs {r:.1f} = {w / r:.0%}"

    def own_p99(e):
        w = e["own_core"]["worker"]
        return f"{w['open_loop']['latency']['p99_ms']:.0f} vs {w['latency_budget']['p99_bound_ms']:.0f} ms"

    row("end to end, flat out (texts/s)", flat)
    row("naive per-message agent (texts/s)", lambda e: f"{e['naive']['flat_out']['texts_per_s']:.1f}")
    row("open loop at half capacity, p50 / p95 / p99", lambda e: _lat(e["end_to_end"]["open_loop"]["latency"]))
    row("p99 bound: window + 2 × one batch's inference",
        lambda e: f"{e['end_to_end']['latency_budget']['p99_bound_ms']:.0f} ms")
    row("CPU during flat out: broker (cores)", cpu("broker"))
    row("CPU during flat out: bench producer + consumer (cores)", cpu("bench_client"))
    row("CPU during flat out: worker (cores)", cpu("workers"))
    row("worker on a core of its own vs raw model on it", own)
    row("worker on a core of its own: p99 at half capacity vs bound", own_p99)
    row("worker peak RSS", lambda e: f"{e['end_to_end']['max_peak_rss_mb']:.0f} MB")
    lines += ["", "Targets per engine (measured; met):", "",
              "| target | " + " | ".join(f"`{n}`" for n in names) + " |", "| --- |" + " --- |" * len(names)]
    for i, t in enumerate(engines[names[0]].get("targets", [])):
        cells = []
        for n in names:
            d = engines[n]["targets"][i]
            mine = f"{d['measured']}; {_yes(d['met'])}"
            if "own_core" in d:
                mine += f" · own core: {d['own_core']['measured']}; {_yes(d['own_core']['met'])}"
            cells.append(mine)
        lines.append(f"| {t['target']} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(results: dict, plots: dict[str, str] | None = None) -> str:
    meta = results["meta"]
    host = meta["host"]
    s = meta["settings"]
    lines = [
        "# emostream bench",
        "",
        f"{meta['started_at']} · {host['cpu_count']} CPUs ({host['processor']}) · Python {host['python']} · "
        f"onnxruntime {host['onnxruntime']} · load average at start / end {_load(host.get('load_average_at_start'))} / "
        f"{_load(host.get('load_average_at_end'))}",
        f"model `{meta['model']}` · {meta['texts']} texts ({meta['distinct_texts']} distinct) from `{meta['data']}` · "
        f"{'quick' if meta['quick'] else 'full'} run, {meta.get('duration_s', 0):.0f} s · settings: batch_max "
        f"{s['batch_max']}, window {s['batch_window_ms']:g} ms, token budget {s['batch_max_tokens']}, "
        f"inference streams {s['inference_streams']} × threads {s['inference_threads']} (0 = auto), "
        f"{s['partitions']} partitions · broker: {', '.join(meta.get('engines', ['tansu']))}",
        "",
        "## Targets",
        "",
    ]
    targets = results.get("targets", [])
    own = results.get("own_core") or {}
    if any("own_core" in t for t in targets):
        lines += [f"| target | worker sharing the {host['cpu_count']} cores with the broker and the bench | met | "
                  f"worker on a core of its own (broker + bench on the other{'s' if host['cpu_count'] > 2 else ''}) "
                  f"vs raw model and naive agent on that core | met |",
                  "| --- | --- | --- | --- | --- |"]
        for t in targets:
            d = t["own_core"]
            lines.append(f"| {t['target']} | {t['measured']} | {_yes(t['met'])} | {d['measured']} | {_yes(d['met'])} |")
    else:
        lines += ["| target | measured | met |", "| --- | --- | --- |"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['measured']} | {_yes(t['met'])} |")
    lines += ["", "Targets are report lines, not test assertions. The machine is shared: numbers vary run to run."]
    if (ceiling := _cpu_ceiling(results)):
        lines.append(ceiling)
    if (per_core := _processes_line(results)):
        lines.append(per_core)
    if own.get("worker"):
        lines += ["The last columns (section 5) pin the worker to one core and the broker and the bench's producer "
                  "and consumer to the others, as separate machines would be, and compare with the raw model and "
                  "the naive agent on that same core: the worker's own overhead, without the load generator "
                  "taking the model's CPU."]
    lines.append("")
    lines += _engines_section(results)

    # 1. raw
    lines += ["## 1. Raw model (tokenization + ONNX backbone session)", ""]
    raw = results.get("raw", {})
    if (skip := _skip_line(raw)):
        lines += [skip, ""]
    else:
        lines += ["Batches of ≤ *batch size* texts, in arrival order or taken from the whole set sorted by token "
                  "length first (every batch as even as the texts allow), each through the worker's own "
                  "`Encoder.embed`: sorted by length, cut into sub-batches within the token budget, run on the "
                  "concurrent calls. *calls* counts the session calls that made.", "",
                  "| intra-op threads × concurrent calls | batch size | token budget | order / session | texts/s | calls | padded / real tokens |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        best = raw["best"]
        for v in raw["variants"]:
            mark = " **(best)**" if v is best or v == best else ""
            lines.append(f"| {v['threads']} × {v['streams']} | {v['batch_size']} | {v['max_tokens']} | "
                         f"{v['order']}{', spinning' if v.get('spinning') else ''} | "
                         f"{v['texts_per_s']:.1f}{mark}{_runs(v)} | {v['calls']} | "
                         f"{v['padded_tokens'] / max(1, v['tokens']):.2f} |")
        by_t = ", ".join(f"{_streams_label(t)}: {x:.1f}" for t, x in raw["best_by_threads"].items())
        rounds = raw.get("rounds", 1)
        lines += ["", f"Best: **{best['texts_per_s']:.1f} texts/s** ({best['label']}). Best by intra-op threads × "
                  f"concurrent session calls (texts/s): {by_t}. Concurrent calls share one session, each on its own "
                  "thread, as the worker's `--inference-streams` does." + (f" Each variant ran {rounds} times, interleaved; the table shows the best "
                                           "run and, in brackets, every run." if rounds > 1 else ""), ""]

    # 2. pipeline + cache
    lines += ["## 2. In-process pipeline (Enricher, no Kafka)", ""]
    pipe = results.get("pipeline", {})
    if (skip := _skip_line(pipe)):
        lines += [skip, ""]
    else:
        conf = pipe["configured"]
        lines += [f"{conf['texts']} JSON records in arrival order, batches of ≤ {conf['batch_max']} "
                  f"({pipe['streams']} concurrent session call(s) × {pipe['threads'] or 'default'} intra-op thread(s)). The Enricher sorts a batch by "
                  "token length and splits it into sub-batches within the padded-token budget:", "",
                  "| padded-token budget | texts/s | batch inference mean / max | padded / real tokens |",
                  "| --- | --- | --- | --- |"]
        for v in pipe["variants"]:
            tags = []
            if v is conf or v == conf:
                tags.append("configured")
            if v["batch_max_tokens"] == pipe["tuned_batch_max_tokens"]:
                tags.append("best")
            tag = f" ({', '.join(tags)})" if tags else ""
            bi = v["batch_inference_ms"]
            lines.append(f"| {v['batch_max_tokens']}{tag} | {v['texts_per_s']:.1f}{_runs(v)} | "
                         f"{bi['mean']:.0f} / {bi['max']:.0f} ms "
                         f"| {v['padded_tokens'] / max(1, v['tokens']):.2f} |")
        ws = results["meta"].get("worker_settings", {})
        lines += ["", f"Pipeline: **{pipe['texts_per_s']:.1f} texts/s** at budget {pipe['tuned_batch_max_tokens']}. "
                  f"The cache and broker stages run with `EMOSTREAM_BATCH_MAX_TOKENS={ws.get('batch_max_tokens')}`"
                  + (" (the best budget above)." if ws.get("batch_max_tokens") == pipe["tuned_batch_max_tokens"]
                     else " (set explicitly)."), ""]
    cache = results.get("cache", {})
    lines += ["### Lever: result cache of recent texts", ""]
    if (skip := _skip_line(cache)):
        lines += [skip, ""]
    else:
        lines += [
            f"Stream of {cache['texts']} records, {cache['repeat_fraction']:.0%} of them repeats of a recent text "
            f"(target ~{cache['duplicate_fraction_target']:.0%}); LRU of {cache['cache_size']} entries "
            f"keyed by BLAKE2b of the text.", "",
            "| cache | texts/s | hit rate | tokens computed |",
            "| --- | --- | --- | --- |",
            f"| off | {cache['off']['texts_per_s']:.1f}{_runs(cache['off'])} | — | {cache['off']['tokens']} |",
            f"| on | {cache['on']['texts_per_s']:.1f}{_runs(cache['on'])} | {cache['hit_rate']:.1%} | "
            f"{cache['on']['tokens']} |",
            "", f"Speed-up with the cache: **{cache['speedup']:.2f}×**.", ""]

    # 3. end to end
    lines += ["## 3. End to end (embedded broker + `emostream worker` process)", ""]
    e2e = results.get("end_to_end", {})
    if (skip := _skip_line(e2e)):
        lines += [skip, ""]
    else:
        diag = e2e.get("fetch_wait_comparison")
        ws = results["meta"].get("worker_settings", {})
        lines += ["| worker | run | records | texts/s | latency p50 / p95 / p99 | batches (mean size) | CPU cores busy: worker / broker / bench / other processes |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        ov = e2e.get("publish_overlap_comparison") or {}
        rtt = ov.get("publish_delay_ms")
        for label, case in ((f"fetch wait {ws.get('fetch_max_wait_ms')} ms", e2e),
                            (f"fetch wait {diag['fetch_max_wait_ms']} ms" if diag else "", diag),
                            (f"publish +{rtt} ms, overlap on (default)", ov.get("on")),
                            (f"publish +{rtt} ms, overlap off", ov.get("off"))):
            if not case:
                continue
            fo, ol = case["flat_out"], case["open_loop"]
            cpu = fo.get("cpu_cores_used", {})
            lines.append(f"| {label} | flat out | {fo['records']} | **{fo['texts_per_s']:.1f}**{_runs(fo)} | {_lat(fo['latency'])} | "
                         f"{fo['batches']['count']} ({fo['batches']['mean_size']:.1f}) | "
                         f"{cpu.get('workers', 0):.2f} / {cpu.get('broker', 0):.2f} / {cpu.get('bench_client', 0):.2f} / "
                         f"{cpu.get('other', 0):.2f} |")
            lines.append(f"| {label} | open loop at {ol['rate_per_s']:.1f}/s (half capacity) | {ol['records']} | "
                         f"{ol['texts_per_s']:.1f} | **{_lat(ol['latency'])}** | {ol['batches']['count']} "
                         f"({ol['batches']['mean_size']:.1f}) | |")
        fo, lb = e2e["flat_out"], e2e["latency_budget"]
        a, b = e2e["open_loop"].get("latency_to_processed"), e2e["open_loop"].get("latency_after_processed")
        if a and b:
            lines += ["", f"Where the open-loop latency goes (first rows): sent → `processed_at` (the input waiting "
                      f"in the broker's held fetch, the batch window, queueing, inference) p50 / p99 "
                      f"{a['p50_ms']:.0f} / {a['p99_ms']:.0f} ms; `processed_at` → seen by the bench's consumer "
                      f"(publish, the output fetch) {b['p50_ms']:.0f} / {b['p99_ms']:.0f} ms."]
        if ov.get("on") and ov.get("off"):
            a, b = ov["on"]["flat_out"]["texts_per_s"], ov["off"]["flat_out"]["texts_per_s"]
            lines += ["", f"Overlap lever: the last two rows delay every publish by {rtt} ms (a networked cluster's "
                      f"acks=all round-trip; the embedded broker acknowledges in well under a millisecond, where "
                      f"overlap changes nothing). Inferring the next batch while the previous one is published gives "
                      f"{a:.1f} vs {b:.1f} texts/s ({a / b:.2f}×) flat out."]
        lines += [
            "",
            f"Flat out: the best of {len(fo.get('runs_texts_per_s') or [1])} runs (all in brackets), as for the raw model. "
            f"texts/s is the steady state (outputs after the first 10 %, over the time since; from the first send: "
            f"{fo['texts_per_s_from_first_send']:.1f}). The worker runs with `EMOSTREAM_CACHE_SIZE=0` (the bench "
            f"sends its texts again in each phase; the cache is measured in section 2). Latency = the output seen by the bench's consumer − `sent_at` "
            f"in the input (open loop: the scheduled send time). Latency bound at half rate: window "
            f"{lb['batch_window_ms']:g} ms + 2 × {lb['batch_inference_ms']:.1f} ms (in-process Enricher time for a "
            f"batch of {lb['batch_size_at_half_rate']}, the mean batch the worker formed at that rate) = "
            f"{lb['p99_bound_ms']:.0f} ms. Worker peak RSS **{e2e['max_peak_rss_mb']:.0f} MB**; ready (start → "
            f"warm-up outputs seen) {e2e['ready_s']:.1f} s; duplicate outputs {e2e['duplicate_outputs']}, dead "
            f"letters {e2e['dead_letters']}.", ""]
        if diag:
            lines += [
                f"Fetch wait: faust fixes its consumer's `fetch_max_wait_ms` at {diag['fetch_max_wait_ms']} ms unless "
                f"`EMOSTREAM_FETCH_MAX_WAIT_MS` overrides it. Real Kafka answers a waiting fetch as soon as data "
                f"arrives; the embedded Tansu broker holds it, so records wait in the broker for up to that long "
                f"and the worker idles. The second rows are the same worker with only that value changed.", ""]
    # 4. naive
    lines += ["## 4. Naive per-message agent (`python -m emostream.bench.naive_agent`)", ""]
    naive = results.get("naive", {})
    if (skip := _skip_line(naive)):
        lines += [skip, ""]
    else:
        fo = naive["flat_out"]
        ratio = ""
        if e2e and "flat_out" in e2e:
            ratio = f" The batching worker is **{e2e['flat_out']['texts_per_s'] / fo['texts_per_s']:.2f}×** faster."
        lines += [f"One inference per record (Enricher with batches of one), same broker and texts: "
                  f"**{fo['texts_per_s']:.1f} texts/s** flat out, latency p50/p95/p99 {_lat(fo['latency'])}, "
                  f"peak RSS {naive['max_peak_rss_mb']:.0f} MB, CPU cores busy {_cpu(fo)}.{ratio}", ""]

    lines += _scaling_section(results)
    lines += _own_core_section(results)

    if plots:
        lines += ["## Plots", ""]
        for key, name in sorted(plots.items()):
            lines.append(f"![{key.replace('_plot', '')}]({name})")
        lines.append("")
    return "\n".join(lines)


def _scaling_section(results: dict) -> list[str]:
    """1 vs 2 worker processes, and a process per core."""
    lines = ["## 1 vs 2 worker processes (one consumer group, flat out)", ""]
    sc = results.get("scaling", {})
    if (skip := _skip_line(sc)):
        lines += [skip, ""]
    else:
        one, two = sc["one_worker"], sc["two_workers_one_thread"]
        call = sc.get("one_worker_one_call_two_threads")
        rows = [(f"1 worker, default ({_case_threads(one)})", one)]
        if call:
            rows.append((f"1 worker, {_case_threads(call)} (ONNX Runtime's own way)", call))
        rows.append((f"2 workers × ({_case_threads(two)})", two))
        per_core = sc.get("processes_per_core")
        if per_core:
            rows.append((f"1 worker, `--processes 0`: {len(per_core['peak_rss_mb'])} processes, each pinned to a core",
                         per_core))
        lines += ["| configuration | texts/s | peak RSS per worker | CPU cores busy |", "| --- | --- | --- | --- |"]
        for label, case in rows:
            lines.append(f"| {label} | {case['flat_out']['texts_per_s']:.1f} | "
                         f"{', '.join(f'{x:.0f}' for x in case['peak_rss_mb'])} MB | {_cpu(case['flat_out'])} |")
        lines += ["", f"2 workers / 1 worker: **{sc['ratio']:.2f}×**"
                  + (f" (1-worker figure reused from {one['reused']})" if one.get("reused") else "")
                  + ("" if two.get("all_workers_busy", True) else " — the rebalance to both workers was not "
                     "confirmed before measuring") + "."
                  + (f" One worker with a process per core (`--processes 0`) / the default single process: "
                     f"**{sc['processes_ratio']:.2f}×**." if per_core else ""), ""]
    return lines


def _own_core_section(results: dict) -> list[str]:
    own = results.get("own_core", {})
    lines = ["## 5. The worker on a core of its own", ""]
    if (skip := _skip_line(own)):
        return lines + [skip, ""]
    cores = own["cores"]
    raw, w, naive = own["raw"], own["worker"], own["naive"]
    lines += [f"Worker (and, in turn, the naive agent) pinned to core {cores['worker']}; the broker and this process "
              f"(producer, consumer) to {cores['broker_and_bench']}; then the raw model on core {cores['worker']}.",
              "", "| raw model on the worker's core | texts/s | padded / real tokens |", "| --- | --- | --- |"]
    for v in raw["variants"]:
        best = " **(best)**" if v == raw["best"] else ""
        lines.append(f"| {v['label']} | {v['texts_per_s']:.1f}{best}{_runs(v)} | "
                     f"{v['padded_tokens'] / max(1, v['tokens']):.2f} |")
    fo, ol, lb = w["flat_out"], w["open_loop"], w["latency_budget"]
    nfo = naive["flat_out"]
    lines += ["", "| on the core | run | texts/s | latency p50 / p95 / p99 | batches (mean size) | CPU cores busy |",
              "| --- | --- | --- | --- | --- | --- |",
              f"| worker | flat out | **{fo['texts_per_s']:.1f}**{_runs(fo)} | {_lat(fo['latency'])} | "
              f"{fo['batches']['count']} ({fo['batches']['mean_size']:.1f}) | {_cpu(fo)} |",
              f"| worker | open loop at {ol['rate_per_s']:.1f}/s (half capacity) | {ol['texts_per_s']:.1f} | "
              f"**{_lat(ol['latency'])}** | {ol['batches']['count']} ({ol['batches']['mean_size']:.1f}) | |",
              f"| naive agent | flat out | **{nfo['texts_per_s']:.1f}**{_runs(nfo)} | {_lat(nfo['latency'])} | "
              f"{nfo['batches']['count']} ({nfo['batches']['mean_size']:.1f}) | {_cpu(nfo)} |",
              "",
              f"Worker / raw model on the same core: **{fo['texts_per_s'] / raw['best']['texts_per_s']:.0%}**; "
              f"worker / naive agent: **{fo['texts_per_s'] / nfo['texts_per_s']:.2f}×**. Latency bound at half rate: "
              f"window {lb['batch_window_ms']:g} ms + 2 × {lb['batch_inference_ms']:.1f} ms (in-process, one core, "
              f"a batch of {lb['batch_size_at_half_rate']}) = {lb['p99_bound_ms']:.0f} ms. Peak RSS "
              f"{w['max_peak_rss_mb']:.0f} MB."]
    a, b = ol.get("latency_to_processed"), ol.get("latency_after_processed")
    if a and b:
        lines += [f"Open-loop latency: sent → `processed_at` p50 / p99 {a['p50_ms']:.0f} / {a['p99_ms']:.0f} ms; "
                  f"`processed_at` → seen {b['p50_ms']:.0f} / {b['p99_ms']:.0f} ms."]
    sweep = own.get("window_sweep") or []
    if len(sweep) > 1:
        lines += ["", f"The p99 bound by batch window (open loop at {ol['rate_per_s']:.1f}/s, worker on its core; "
                  "the bound's inference time is measured again for the batches each window gave):", "",
                  "| batch window | latency p50 / p95 / p99 | batches (mean size) | bound: window + 2 × inference | met |",
                  "| --- | --- | --- | --- | --- |"]
        for x in sweep:
            o, lb = x["open_loop"], x["latency_budget"]
            mark = " (as configured)" if x["batch_window_ms"] == w["latency_budget"]["batch_window_ms"] else ""
            lines.append(f"| {x['batch_window_ms']:g} ms{mark} | {_lat(o['latency'])} | {o['batches']['count']} "
                         f"({o['batches']['mean_size']:.1f}) | {lb['batch_window_ms']:g} + 2 × "
                         f"{lb['batch_inference_ms']:.1f} = {lb['p99_bound_ms']:.0f} ms | "
                         f"{_yes(o['latency']['p99_ms'] <= lb['p99_bound_ms'])} |")
        lines += ["", "What the bound leaves out is fixed: the time a record waits in the broker beyond the window, "
                  "publishing, and the bench's own output fetch. A small window forms small batches whose inference "
                  "time is smaller than that; a larger one pays it out of the batch's own inference term."]
    return lines + [""]


def _streams_label(key: str) -> str:
    """ "1x2" → "1 thread × 2 calls", "2x1" → "2 threads"."""
    t, _, k = key.partition("x")
    text = f"{t} thread{'s' if t != '1' else ''}"
    return text + (f" × {k} calls" if k != "1" else "")


def _case_threads(case: dict) -> str:
    k, t = case["inference_streams"], case["inference_threads"]
    if k == 0:
        return "streams auto: one 1-thread call per core"
    return f"{k} call{'s' if k != 1 else ''} at once × {t or 'default'} thread{'s' if t != 1 else ''}"


# --------------------------------------------------------------------------------------------
def write_plots(results: dict, out: Path) -> dict[str, Path]:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    bars: list[tuple[str, float, str]] = []
    raw = results.get("raw", {})
    for v in raw.get("variants", []):
        bars.append((f"raw: {v['label']}", v["texts_per_s"], "tab:blue"))
    if "texts_per_s" in results.get("pipeline", {}):
        bars.append(("pipeline (Enricher)", results["pipeline"]["texts_per_s"], "tab:green"))
    cache = results.get("cache", {})
    if "on" in cache:
        bars.append((f"pipeline, {cache['repeat_fraction']:.0%} dup, cache off", cache["off"]["texts_per_s"], "tab:olive"))
        bars.append((f"pipeline, {cache['repeat_fraction']:.0%} dup, cache on", cache["on"]["texts_per_s"], "tab:olive"))
    if _get(results, "end_to_end", "flat_out"):
        bars.append(("end to end, 1 worker", results["end_to_end"]["flat_out"]["texts_per_s"], "tab:red"))
    diag = _get(results, "end_to_end", "fetch_wait_comparison") or {}
    if _get(diag, "flat_out", "texts_per_s"):
        bars.append((f"end to end, 1 worker, fetch wait {diag['fetch_max_wait_ms']} ms",
                     diag["flat_out"]["texts_per_s"], "tab:pink"))
    sc = results.get("scaling", {})
    if "two_workers_one_thread" in sc:
        bars.append(("end to end, 2 workers × 1 thread", sc["two_workers_one_thread"]["flat_out"]["texts_per_s"],
                     "tab:red"))
    if "processes_per_core" in sc:
        bars.append(("end to end, 1 worker, a process per core", sc["processes_per_core"]["flat_out"]["texts_per_s"],
                     "tab:red"))
    if _get(results, "naive", "flat_out"):
        bars.append(("naive per-message agent", results["naive"]["flat_out"]["texts_per_s"], "tab:gray"))
    if bars:
        fig, ax = plt.subplots(figsize=(9, 0.38 * len(bars) + 1.4))
        labels, values, colors = zip(*bars)
        y = range(len(bars))
        ax.barh(list(y), values, color=colors)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:.0f}", va="center", fontsize=8)
        ax.set_xlabel("texts / s")
        ax.set_title("Throughput by batch settings and stage")
        fig.tight_layout()
        paths["throughput_plot"] = out / "throughput.png"
        fig.savefig(paths["throughput_plot"], dpi=110)
        plt.close(fig)

    ol = _get(results, "end_to_end", "open_loop")
    if ol and ol.get("latencies_ms"):
        fig, ax = plt.subplots(figsize=(8, 4))
        lat = ol["latencies_ms"]
        diag = _get(results, "end_to_end", "fetch_wait_comparison") or {}
        diag_lat = _get(diag, "open_loop", "latencies_ms")
        bins = 60
        if diag_lat:
            import numpy as np

            bins = np.linspace(0, max(max(lat), max(diag_lat)), 61)
            ax.hist(diag_lat, bins=bins, color="tab:gray", alpha=0.5,
                    label=f"consumer fetch wait {diag['fetch_max_wait_ms']} ms ("
                          f"{diag['open_loop']['rate_per_s']:.0f}/s)")
        ax.hist(lat, bins=bins, color="tab:blue", alpha=0.7, label=f"worker as configured ({ol['rate_per_s']:.0f}/s)")
        summary = ol["latency"]
        for key, color in (("p50_ms", "green"), ("p95_ms", "orange"), ("p99_ms", "red")):
            ax.axvline(summary[key], color=color, linestyle="--", label=f"{key[:3]} {summary[key]:.0f} ms")
        bound = _get(results, "end_to_end", "latency_budget", "p99_bound_ms")
        if bound:
            ax.axvline(bound, color="black", linestyle=":", label=f"p99 target {bound:.0f} ms")
        ax.set_xlabel("latency per record (ms)")
        ax.set_ylabel("records")
        ax.set_title("End-to-end latency per record, open loop at half capacity")
        ax.legend()
        fig.tight_layout()
        paths["latency_plot"] = out / "latency.png"
        fig.savefig(paths["latency_plot"], dpi=110)
        plt.close(fig)
    return paths
