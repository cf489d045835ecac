"""Nothing lost under crashes, rebalances, broker outages and poison input — with real processes.

Every test here kills or starves something for real: worker processes get SIGKILL/SIGTERM, the
broker process is killed. Accounting is by Kafka key: every input record carries a unique key,
which both the enriched record and the dead-letter record keep.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import orjson
import psutil
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from emostream.schemas.records import ErrorCode
from emostream.worker.broker import free_port
from emostream.worker.kafka_io import ensure_topics
from emostream.worker.settings import Settings

from accounting import (committed_offsets, end_offsets_total, produce_records, read_all, records,
                        wait_all_accounted, wait_for_outputs)
from conftest import Topics, WorkerProcess
from strategies import POISON

pytestmark = [pytest.mark.broker, pytest.mark.fault]

CODES = {c.value for c in ErrorCode}


# -- 1. kill -9 three times ------------------------------------------------------------------
def test_kill9_three_times_loses_nothing(broker, start_worker):
    seed = int(os.environ.get("FAULT_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    t = Topics(broker, partitions=4)
    n = 20_000
    keys = produce_records(t, n)
    w = start_worker(t)
    in_flight = []
    for k in range(3):
        assert w.wait_for_log("Worker ready", 90), w.output()[-3000:]
        # a random moment while records are flowing: after a random number more outputs, not a
        # random time (a fast machine finished all 20,000 within three 2-6 s waits)
        before = end_offsets_total(t, t.settings.output_topic)
        target = before + rng.randint(300, 3000)
        deadline = time.monotonic() + 120
        while end_offsets_total(t, t.settings.output_topic) < target and time.monotonic() < deadline:
            time.sleep(0.1)
        w.stop(signal.SIGKILL)
        committed = committed_offsets(t)
        outs = read_all(t, t.settings.output_topic, 1.5)
        # Published but not committed at the kill: exactly what may be published again.
        published_uncommitted = sum(
            1 for r in outs if orjson.loads(r.value)["source"]["offset"] >= committed[orjson.loads(r.value)["source"]["partition"]]
        )
        in_flight.append(published_uncommitted)
        assert before < len(outs) < n, f"kill {k} was not mid-stream: {before} → {len(outs)} (seed {seed})"
        w = start_worker(t)
    outs, dlq = wait_all_accounted(t, set(keys), timeout=300, workers=[w])
    missing = set(keys) - set(outs) - set(dlq)
    assert not missing, f"{len(missing)} records lost (seed {seed})"
    assert not dlq, f"unexpected dead letters: {list(dlq.items())[:5]}"
    duplicates = len(outs) - len(set(outs))
    print(f"seed {seed}: duplicates {duplicates}, published-but-uncommitted at each kill {in_flight}")
    assert duplicates <= sum(in_flight), (duplicates, in_flight, seed)
    assert w.stop() == 0


# -- 2. graceful stop of one of two workers -------------------------------------------------
def test_sigterm_one_of_two_workers_hands_over(broker, start_worker):
    t = Topics(broker, partitions=4)
    n = 5_000
    keys, values = records(n)
    w1, w2 = start_worker(t), start_worker(t)
    assert w1.wait_for_log("Worker ready", 90) and w2.wait_for_log("Worker ready", 90)
    t.produce(values, keys)
    assert wait_for_outputs(t, 500, timeout=120) < n, "the stop must land mid-stream"
    assert w1.stop(signal.SIGTERM) == 0, w1.output()[-3000:]
    outs, dlq = wait_all_accounted(t, set(keys), timeout=240, workers=[w2])
    assert set(keys) <= set(outs)
    # everything processed is committed in the end, by the survivor
    end = {}
    for r in read_all(t, t.settings.input_topic, 1.0):
        end[r.partition] = max(end.get(r.partition, 0), r.offset + 1)
    deadline = time.monotonic() + 20
    while committed_offsets(t) != end and time.monotonic() < deadline:
        time.sleep(1)
    assert committed_offsets(t) == end
    assert w2.stop() == 0


# -- 3. broker outages -----------------------------------------------------------------------
def _env_for(b, **over) -> tuple[Topics, dict]:
    class Lazy(Topics):  # topics are created later, by the worker itself
        def __init__(self):
            tag = os.urandom(4).hex()
            self.settings = Settings.from_env(
                environ={}, broker=b.url, input_topic=f"in-{tag}", output_topic=f"out-{tag}",
                dlq_topic=f"dlq-{tag}", group_id=f"g-{tag}", partitions=2, session_timeout_s=10,
                commit_interval_s=0.5, metrics_port=0, **over)

    t = Lazy()
    return t, t.env()


def test_broker_unavailable_at_start_then_up(new_broker, tmp_path):
    b = new_broker(port=free_port())
    t, env = _env_for(b)
    w = WorkerProcess(env, tmp_path / "w.log")
    try:
        assert w.wait_for_log("waiting for broker", 60), w.output()
        time.sleep(2)
        assert w.proc.poll() is None
        b.start()
        assert w.wait_for_log("Worker ready", 90), w.output()[-3000:]
        produce_records(t, 50)
        assert len(t.outputs(50)) == 50
    finally:
        w.stop()
        b.stop()


def test_broker_killed_mid_run_exit_policy(new_broker, tmp_path):
    b = new_broker(port=free_port()).start()
    t, env = _env_for(b, on_broker_loss="exit", broker_loss_exit_s=4)
    w = WorkerProcess(env, tmp_path / "w.log")
    try:
        assert w.wait_for_log("Worker ready", 90), w.output()[-3000:]
        produce_records(t, 30)
        assert len(t.outputs(30)) == 30
        b.stop(kill=True)
        code = w.proc.wait(60)
        assert code == 3, w.output()[-3000:]
        assert "unreachable" in w.output()
    finally:
        w.stop()
        b.stop()


def test_broker_killed_mid_run_retry_policy(new_broker, tmp_path):
    port = free_port()
    b = new_broker(port=port).start()
    t, env = _env_for(b, on_broker_loss="retry")
    w = WorkerProcess(env, tmp_path / "w.log")
    try:
        assert w.wait_for_log("Worker ready", 90), w.output()[-3000:]
        b.stop(kill=True)
        assert w.wait_for_log("unreachable", 30), w.output()[-3000:]
        time.sleep(8)
        assert w.proc.poll() is None, "retry policy must keep the worker alive"
        b = new_broker(port=port).start()
        assert w.wait_for_log("reachable again", 30), w.output()[-3000:]
        assert w.proc.poll() is None
    finally:
        w.stop()
        b.stop()


# -- 4. poison input -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poison_worker(broker, tmp_path_factory):
    t = Topics(broker, partitions=2)
    w = WorkerProcess(t.env(), tmp_path_factory.mktemp("poison") / "w.log")
    assert w.wait_for_log("Worker ready", 90), w.output()
    yield t, w
    assert w.stop() == 0, "the worker crashed on poison input"


@hsettings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(POISON, min_size=1, max_size=40))
def test_poison_records_are_processed_or_dead_lettered(poison_worker, batch):
    t, w = poison_worker
    tag = os.urandom(4).hex()
    good_keys = [f"good-{tag}-{i}".encode() for i in range(len(batch))]
    bad_keys = [f"poison-{tag}-{i}".encode() for i in range(len(batch))]
    values, keys = [], []
    for i, v in enumerate(batch):  # good neighbours interleaved, so they share batches
        values += [v, orjson.dumps({"text": f"a perfectly fine neighbour {i}"})]
        keys += [bad_keys[i], good_keys[i]]
    t.produce(values, keys)
    outs, dlq = wait_all_accounted(t, set(keys), timeout=90, workers=[w])
    assert set(good_keys) <= set(outs), "good neighbours must come out"
    for k in bad_keys:
        assert k in outs or k in dlq, f"poison record {k} lost"
        if k in dlq:
            assert dlq[k] in CODES
    assert w.proc.poll() is None


def test_ten_megabyte_value_is_dead_lettered(broker, start_worker):
    t = Topics(broker, partitions=1, create=False)
    # Kafka refuses records over 1 MB unless the topic allows more (Tansu takes anything).
    asyncio.run(ensure_topics(t.settings, [t.settings.input_topic], configs={"max.message.bytes": str(16 << 20)}))
    asyncio.run(ensure_topics(t.settings, [t.settings.output_topic, t.settings.dlq_topic]))
    w = start_worker(t)
    big = orjson.dumps({"id": "big", "text": "a" * (10 * 1024 * 1024)})
    keys = [b"before", b"big", b"after"]
    t.produce([orjson.dumps({"text": "before"}), big, orjson.dumps({"text": "after"})], keys)
    outs, dlq = wait_all_accounted(t, set(keys), timeout=90, workers=[w])
    assert {b"before", b"after"} <= set(outs)
    assert dlq.get(b"big") == "too_large"
    d = orjson.loads(read_all(t, t.settings.dlq_topic, 1.0)[0].value)
    assert d["original_truncated"] and d["original_size"] == len(big)


# -- 5. inference failure ---------------------------------------------------------------------
def test_inference_failure_isolated_end_to_end(broker, start_worker):
    t = Topics(broker, partitions=1, batch_max=32, batch_window_ms=300)
    w = start_worker(t, fault_fail_text="<<BOOM>>")
    keys, values = records(30)
    values[7] = orjson.dumps({"id": "r7", "text": "this one goes <<BOOM>>"})
    values[21] = orjson.dumps({"id": "r21", "text": "and <<BOOM>> again"})
    t.produce(values, keys)
    outs, dlq = wait_all_accounted(t, set(keys), timeout=90, workers=[w])
    assert dlq == {b"r7": "inference_failed", b"r21": "inference_failed"}
    assert set(outs) == set(keys) - {b"r7", b"r21"} and len(outs) == 28  # no crash loop, no re-runs
    assert "splitting" in w.output()
    assert w.proc.poll() is None


# -- 6. backpressure ---------------------------------------------------------------------------
def test_slow_publishing_pauses_consumption_and_memory_stays_bounded(broker, start_worker):
    # Batches of 64 published one per 400 ms: ~160 records/s get out, far fewer than are waiting.
    t = Topics(broker, partitions=2, buffer_max=256, batch_max=64)
    w = start_worker(t, fault_publish_delay_ms=400)
    assert w.wait_for_log("Worker ready", 90)
    proc = psutil.Process(w.proc.pid)
    t.produce([orjson.dumps({"text": "warm up"})])
    t.outputs(1)
    base = proc.memory_info().rss
    n, text = 12_000, "x" * 8_000  # ~100 MB of input waiting in the topic
    produce_records(t, n, text=text)
    peak = base
    for _ in range(40):
        time.sleep(0.5)
        peak = max(peak, proc.memory_info().rss)
    done = end_offsets_total(t, t.settings.output_topic)
    growth_mb = (peak - base) / 2**20
    print(f"RSS base {base / 2**20:.0f} MB, peak {peak / 2**20:.0f} MB, {done} of {n} published")
    assert done < n / 2, "publishing was throttled, so most input must still wait in Kafka"
    assert growth_mb < 120, f"worker buffered without bound: +{growth_mb:.0f} MB"
    assert w.proc.poll() is None
