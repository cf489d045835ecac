"""Metrics (from a pipeline BatchResult) and the operations server's endpoints, liveness included."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emostream.worker.decode import RawMessage
from emostream.worker.metrics import Metrics
from emostream.worker.ops_server import Heartbeat, OpsServer
from emostream.worker.pipeline import BatchResult, Outgoing

MODEL_INFO = {"name": "minilm-go-emotions", "version": "1",
              "backbone": {"name": "all-MiniLM-L6-v2-int8", "version": "1.0.0"},
              "heads": {"go_emotions": "lr-1", "sentiment": "2"}}


def _out(offset: int, ts: float | None) -> Outgoing:
    msg = RawMessage(b"{}", None, "texts", 0, offset, ts)
    return Outgoing(None, b"{}", str(offset), msg)


def fake_result() -> BatchResult:
    return BatchResult(
        outputs=[_out(0, 100.0), _out(1, 99.0), _out(2, None)],
        dead_letters=[_out(3, 100.5)],
        dlq_reasons=Counter({"not_json": 1}),
        tokens=30, padded_tokens=48, inference_s=0.02, size=4,
    )


def test_observe_batch_updates_everything():
    m = Metrics()
    m.observe_batch(fake_result(), published_at=100.75)
    v = m.value
    assert v("emostream_records_in_total") == 4
    assert v("emostream_records_out_total") == 3
    assert v("emostream_dead_letters_total", {"reason": "not_json"}) == 1
    assert v("emostream_dead_letters_total", {"reason": "empty_text"}) == 0  # pre-created series
    assert v("emostream_batch_size_records_count") == 1 and v("emostream_batch_size_records_sum") == 4
    assert v("emostream_batch_tokens_sum", {"kind": "real"}) == 30
    assert v("emostream_batch_tokens_sum", {"kind": "padded"}) == 48
    assert v("emostream_inference_duration_seconds_sum") == pytest.approx(0.02)
    # three records carried a timestamp: 0.75 + 1.75 + 0.25
    assert v("emostream_end_to_end_latency_seconds_count") == 3
    assert v("emostream_end_to_end_latency_seconds_sum") == pytest.approx(2.75)
    assert v("emostream_end_to_end_latency_seconds_bucket", {"le": "0.5"}) == 1


def test_all_invalid_batch_skips_model_metrics_and_clamps_skew():
    m = Metrics()
    r = BatchResult(dead_letters=[_out(0, 200.0)], dlq_reasons=Counter({"empty_value": 1}), size=1)
    m.observe_batch(r, published_at=199.0)  # producer clock ahead of ours
    assert m.value("emostream_batch_tokens_count", {"kind": "real"}) == 0
    assert m.value("emostream_inference_duration_seconds_count") == 0
    assert m.value("emostream_end_to_end_latency_seconds_sum") == 0.0
    assert m.value("emostream_end_to_end_latency_seconds_count") == 1


def test_cache_counts_come_from_each_batch_and_alerts_and_failures_add_up():
    m = Metrics()
    r = fake_result()
    r.cache_hits, r.cache_misses = 2, 1
    m.observe_batch(r, published_at=101.0)
    r.cache_hits, r.cache_misses = 3, 0
    m.observe_batch(r, published_at=101.0)
    m.observe_alerts(["angry", "gross"])
    m.observe_alerts(["angry"])
    m.publish_failed()
    assert m.value("emostream_cache_hits_total") == 5
    assert m.value("emostream_cache_misses_total") == 1
    assert m.value("emostream_alerts_total", {"rule": "angry"}) == 2
    assert m.value("emostream_publish_failures_total") == 1


def test_cache_counts_of_a_real_pipeline_batch(tmp_path):
    """The Enricher's result carries the batch's own hits and misses (a repeat in the batch is a hit)."""
    import orjson

    from emostream.models.model import EmotionModel
    from emostream.worker.pipeline import Enricher
    from emostream.worker.settings import Settings
    from tiny_model import write_manifest

    enricher = Enricher(EmotionModel.load(str(write_manifest(tmp_path))), Settings.from_env(environ={}), cache_size=10)

    def batch(*texts):
        return [RawMessage(orjson.dumps({"text": t}), None, "texts", 0, i, 100.0) for i, t in enumerate(texts)]

    first = enricher(batch("a", "b", "a"))
    second = enricher(batch("b", "c"))
    assert (first.cache_hits, first.cache_misses) == (1, 2)
    assert (second.cache_hits, second.cache_misses) == (1, 1)
    m = Metrics()
    for r in (first, second):
        m.observe_batch(r, published_at=101.0)
    assert (m.value("emostream_cache_hits_total"), m.value("emostream_cache_misses_total")) == (2, 3)
    assert Enricher(enricher.model.model, Settings.from_env(environ={}))(batch("a", "a")).cache_hits == 0  # cache off


def test_model_info_is_replaced_on_reload():
    m = Metrics()
    m.set_model(MODEL_INFO)
    labels = {"name": "minilm-go-emotions", "version": "1", "backbone": "all-MiniLM-L6-v2-int8",
              "backbone_version": "1.0.0", "heads": "go_emotions=lr-1,sentiment=2"}
    assert m.value("emostream_model_info", labels) == 1
    m.set_model({**MODEL_INFO, "version": "2"})
    assert m.value("emostream_model_info", labels) is None
    assert m.value("emostream_model_info", {**labels, "version": "2"}) == 1
    text = m.render()[0].decode()
    assert text.count("emostream_model_info{") == 1


def test_instances_do_not_clash_and_every_metric_has_help():
    a, b = Metrics(), Metrics()
    a.records_out.inc(5)
    assert b.value("emostream_records_out_total") == 0
    families = list(text_string_to_metric_families(a.render()[0].decode()))
    assert families and all(f.name.startswith("emostream_") and f.documentation for f in families)


# -- health server -------------------------------------------------------------------------------
def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def server(clock):
    m = Metrics()
    with OpsServer(m, Heartbeat(30.0, clock=clock), "127.0.0.1", 0) as s:
        yield s


def test_metrics_endpoint_serves_the_registry(server):
    assert server.port > 0
    server.metrics.set_model(MODEL_INFO)
    server.metrics.observe_batch(fake_result(), published_at=101.0)
    code, ctype, body = get(server.url + "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    for name in ("emostream_records_in_total", "emostream_records_out_total", "emostream_dead_letters_total",
                 "emostream_batch_size_records_bucket", "emostream_batch_tokens_bucket",
                 "emostream_inference_duration_seconds_bucket", "emostream_end_to_end_latency_seconds_bucket",
                 "emostream_cache_hits_total", "emostream_cache_misses_total", "emostream_publish_failures_total",
                 "emostream_model_info", "emostream_ready", "emostream_assigned_partitions"):
        assert f"\n{name}" in body, name
    code, ctype, body = get(server.url + "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert code == 200 and ctype.startswith("application/openmetrics-text") and body.endswith("# EOF\n")


def test_healthz_follows_the_heartbeat(server, clock):
    code, _, body = get(server.url + "/healthz")
    assert code == 200 and json.loads(body) == {"status": "starting"}  # no beat yet: loading, connecting
    server.heartbeat.beat()
    clock.now += 29.5
    code, _, body = get(server.url + "/healthz")
    assert code == 200 and json.loads(body) == {"status": "ok", "last_beat_s": 29.5}
    clock.now += 1.0
    code, _, body = get(server.url + "/healthz")
    assert code == 503 and json.loads(body) == {"status": "stalled", "last_beat_s": 30.5, "timeout_s": 30.0}
    server.heartbeat.beat()
    assert get(server.url + "/healthz")[0] == 200
    assert get(server.url + "/nope")[0] == 404


def wait_for_health(url: str, status: str, timeout: float = 10.0) -> tuple[int, str]:
    """Poll /healthz until its status is ``status`` (or the deadline passes): (HTTP code, status) last seen."""
    deadline = time.monotonic() + timeout
    while True:
        code, _, body = get(url)
        seen = json.loads(body)["status"]
        if seen == status or time.monotonic() > deadline:
            return code, seen
        time.sleep(0.02)


def test_healthz_fails_while_the_event_loop_is_blocked_and_recovers():
    """The server thread keeps answering; what it answers is whether the loop still runs."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    heartbeat = Heartbeat(timeout_s=0.3)
    unblock = threading.Event()

    async def blocking_call():  # a coroutine that blocks the loop, as a stuck synchronous call would
        unblock.wait(30)

    with OpsServer(Metrics(), heartbeat, "127.0.0.1", 0) as server:
        beating = asyncio.run_coroutine_threadsafe(heartbeat.run(), loop)
        try:
            url = server.url + "/healthz"
            assert wait_for_health(url, "ok") == (200, "ok")
            blocked = asyncio.run_coroutine_threadsafe(blocking_call(), loop)
            assert wait_for_health(url, "stalled") == (503, "stalled")
            unblock.set()
            blocked.result(10)
            assert wait_for_health(url, "ok") == (200, "ok")
        finally:
            unblock.set()
            beating.cancel()
            loop.call_soon_threadsafe(loop.stop)
            runner.join(10)
            loop.close()


def test_readyz_flips_when_model_loaded_and_partitions_assigned(server):
    code, ctype, body = get(server.url + "/readyz")
    assert code == 503 and ctype == "application/json"
    assert json.loads(body) == {"ready": False, "model_loaded": False, "partitions": 0,
                                "missing": ["model", "partitions"]}
    server.set_model_loaded(True)
    code, _, body = get(server.url + "/readyz")
    assert code == 503 and json.loads(body)["missing"] == ["partitions"]
    assert server.metrics.value("emostream_ready") == 0
    server.set_partitions(3)
    code, _, body = get(server.url + "/readyz")
    assert code == 200 and json.loads(body) == {"ready": True, "model_loaded": True, "partitions": 3, "missing": []}
    assert server.metrics.value("emostream_ready") == 1
    assert server.metrics.value("emostream_assigned_partitions") == 3
    server.set_partitions(0)  # revoked on rebalance
    assert get(server.url + "/readyz")[0] == 503
    assert server.metrics.value("emostream_ready") == 0


def test_stop_releases_the_port_and_is_idempotent():
    s = OpsServer(Metrics(), Heartbeat(30.0), "127.0.0.1", 0).start()
    url = s.url
    assert get(url + "/healthz")[0] == 200
    s.stop()
    s.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/healthz", timeout=2)
