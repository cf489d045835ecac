"""Operating the worker: metrics and health over HTTP, moderation alerts, hot reload, JSON logs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from emostream.models.manifest import find_manifest, registered
from emostream.worker.settings import Settings
from emostream.worker.broker import free_port

from conftest import Topics

pytestmark = pytest.mark.broker


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def wait_status(url: str, status: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_get(url)[0] == status:
            return True
        time.sleep(0.3)
    return False


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_metrics_and_readiness(broker, start_worker):
    port = free_port()
    t = Topics(broker, partitions=2, metrics_port=port)
    w = start_worker(t)
    base = f"http://127.0.0.1:{port}"
    assert wait_status(base + "/healthz", 200, 60), w.output()[-2000:]
    assert wait_status(base + "/readyz", 200, 60), http_get(base + "/readyz")
    ready = json.loads(http_get(base + "/readyz")[1])
    assert ready["model_loaded"] and ready["partitions"] == 2
    assert json.loads(http_get(base + "/healthz")[1])["status"] == "ok"  # the event loop beats
    probe = subprocess.run([sys.executable, "-m", "emostream.worker.cli", "healthcheck"], capture_output=True,
                           env=t.env(), timeout=60)  # what the container's HEALTHCHECK runs
    assert probe.returncode == 0, probe.stderr
    values = [orjson.dumps({"text": f"metrics text {i}"}) for i in range(20)] + [b"not json", b'{"text": ""}']
    t.produce(values)
    t.outputs(20)
    t.dead_letters(2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        body = http_get(base + "/metrics")[1]
        if "emostream_records_in_total 22.0" in body:
            break
        time.sleep(0.3)
    assert metric(body, "emostream_records_in_total") == 22
    assert metric(body, "emostream_records_out_total") == 20
    assert 'emostream_dead_letters_total{reason="not_json"} 1.0' in body
    assert 'emostream_dead_letters_total{reason="empty_text"} 1.0' in body
    assert "emostream_batch_size_records_count" in body
    assert "emostream_inference_duration_seconds_bucket" in body
    assert "emostream_end_to_end_latency_seconds_count" in body
    default = find_manifest(Settings.from_env(environ={}).model)
    assert f'backbone="{default.backbone.name}"' in body
    assert ",".join(f"{h.name}={h.version}" for h in default.heads) in body
    assert w.stop() == 0


def test_alerts_topic_gets_matching_records(broker, start_worker):
    t = Topics(broker, partitions=1, alert_rules="angry: anger >= 0.3; thankful: labels has gratitude")
    start_worker(t)
    texts = {"a": "I am furious, this makes me so angry!!", "b": "Thank you so much, I really appreciate it",
             "c": "The meeting is at 3pm in room 4."}
    t.produce([orjson.dumps({"id": k, "text": v}) for k, v in texts.items()])
    outs = {o["id"]: o for o in t.outputs(3)}
    alerts = {a["id"]: a for a in (orjson.loads(r.value) for r in t.consume(t.settings.alerts_topic, 2, 30))}
    assert set(alerts) == {"a", "b"}
    assert alerts["a"]["alert"]["rules"] == ["angry"] and alerts["b"]["alert"]["rules"] == ["thankful"]
    assert alerts["a"]["emotions"] == outs["a"]["emotions"]  # the full enriched record, plus the alert
    assert t.consume(t.settings.alerts_topic, 3, 3)[2:] == []  # c matched nothing


def _copy_default_model(dst: Path) -> Path:
    """The default manifest with its head files copied next to it, so the test can edit them."""
    src = registered()["minilm-go-emotions"]
    heads = dst / "heads"
    shutil.copytree(src.parent.parent / "heads" / "go_emotions_lr", heads)
    text = src.read_text().replace("../heads/go_emotions_lr/", "heads/")
    (dst / "m.toml").write_text(text)
    return dst / "m.toml"


def _versions_by_batch(outs) -> dict[str, set]:
    by_batch = defaultdict(set)
    for o in outs:  # records of one batch share processed_at
        by_batch[o["processed_at"]].add(o["model"]["heads"]["go_emotions"])
    return by_batch


@pytest.mark.parametrize("trigger", ["file-change", "SIGHUP"])
def test_heads_and_thresholds_reload_without_restart(broker, start_worker, tmp_path, trigger):
    manifest = _copy_default_model(tmp_path)
    poll = 0.5 if trigger == "file-change" else 0
    t = Topics(broker, partitions=1, model=str(manifest), reload_poll_s=poll, batch_max=8)
    w = start_worker(t)
    t.produce([orjson.dumps({"id": f"a{i}", "text": "this is fine I guess"}) for i in range(20)])
    first = t.outputs(20)
    assert {o["model"]["heads"]["go_emotions"] for o in first} == {"lr-1"}
    # new version and thresholds of 0: every label is selected from now on
    manifest.write_text(manifest.read_text().replace('version = "lr-1"', 'version = "lr-2"'))
    thr = json.loads((tmp_path / "heads" / "thresholds.json").read_text())
    (tmp_path / "heads" / "thresholds.json").write_text(json.dumps({k: 0.0 for k in thr}))
    if trigger == "SIGHUP":
        w.proc.send_signal(signal.SIGHUP)
    assert w.wait_for_log("model reloaded", 30), w.output()[-3000:]
    t.produce([orjson.dumps({"id": f"b{i}", "text": "this is fine I guess"}) for i in range(20)])
    outs = t.outputs(40)
    second = [o for o in outs if o["id"].startswith("b")]
    assert {o["model"]["heads"]["go_emotions"] for o in second} == {"lr-2"}
    assert all(len(o["emotions"]["go_emotions"]["labels"]) == 28 for o in second)
    assert all(len(v) == 1 for v in _versions_by_batch(outs).values()), "a batch mixed model versions"
    assert w.proc.poll() is None  # no restart


def test_broken_reload_keeps_the_running_model(broker, start_worker, tmp_path):
    manifest = _copy_default_model(tmp_path)
    t = Topics(broker, partitions=1, model=str(manifest), reload_poll_s=0.5)
    w = start_worker(t)
    t.produce([orjson.dumps({"text": "before"})])
    t.outputs(1)
    (tmp_path / "heads" / "head.onnx").write_bytes(b"not an onnx file")
    assert w.wait_for_log("model reload requested (model files changed)", 30), w.output()[-3000:]
    assert w.wait_for_log("model reload (model files changed) failed, keeping", 30), w.output()[-3000:]
    t.produce([orjson.dumps({"text": "after"})])
    assert len(t.outputs(2)) == 2 and w.proc.poll() is None


def test_json_logs(broker, start_worker):
    t = Topics(broker, partitions=1, log_format="json", log_level="debug", sasl_password="hunter2")
    w = start_worker(t)
    t.produce([orjson.dumps({"text": "log me"})])
    t.outputs(1)
    assert w.stop() == 0
    lines = [ln for ln in w.output().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert any("emostream worker:" in r["msg"] and "settings" in r for r in records)
    batch = [r for r in records if r["msg"].startswith("batch of")]
    assert batch and batch[0]["batch_id"] == 1 and batch[0]["size"] == 1 and batch[0]["out"] == 1
    assert "hunter2" not in w.output()  # secrets are redacted in the banner and settings log
