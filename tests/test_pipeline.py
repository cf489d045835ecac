"""The pipeline without Kafka: one output per valid record, dead letters for the rest, failures isolated."""

import base64
import threading
import time

import numpy as np

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from emostream.models.model import EmotionModel
from emostream.worker.alerts import parse_rule
from emostream.worker.decode import RawMessage
from emostream.worker.pipeline import Enricher
from emostream.worker.settings import Settings

from strategies import POISON
from tiny_model import LABELS, write_manifest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_manifest(tmp_path_factory.mktemp("tiny"), thresholds={"calm": 0.2, "happy": 0.5, "angry": 0.9})
    return EmotionModel.load(str(path))


def raw(values, keys=None):
    keys = keys or [None] * len(values)
    return [RawMessage(v, k, "texts", 0, i, 1_700_000_000.0 + i) for i, (v, k) in enumerate(zip(values, keys))]


def test_one_output_per_valid_and_dlq_for_bad(tiny):
    s = Settings.from_env(environ={})
    values = [orjson.dumps({"id": f"r{i}", "text": f"text number {i}", "lang": "en"}) for i in range(10)]
    values[3] = b"garbage"
    values[7] = b'{"id": "r7", "text": ""}'
    res = Enricher(tiny, s)(raw(values, keys=[f"k{i}".encode() for i in range(10)]))
    assert len(res.outputs) == 8 and len(res.dead_letters) == 2
    assert dict(res.dlq_reasons) == {"not_json": 1, "empty_text": 1}
    outs = [orjson.loads(o.value) for o in res.outputs]
    assert [o["id"] for o in outs] == [f"r{i}" for i in range(10) if i not in (3, 7)]
    assert [o.key for o in res.outputs] == [f"k{i}".encode() for i in range(10) if i not in (3, 7)]
    for o in outs:
        assert o["lang"] == "en" and "text" not in o
        assert set(o["emotions"]["mood"]["scores"]) == set(LABELS)
        assert o["model"]["heads"] == {"mood": "h1"}
        assert o["source"]["topic"] == "texts"
    dl = [orjson.loads(d.value) for d in res.dead_letters]
    assert base64.b64decode(dl[0]["original"]) == b"garbage"
    assert dl[0]["key"] == base64.b64encode(b"k3").decode()
    assert dl[1]["id"] == "r7"


def test_labels_follow_thresholds_and_top_is_argmax(tiny):
    s = Settings.from_env(environ={})
    res = Enricher(tiny, s)(raw([orjson.dumps({"text": t}) for t in ["a", "b c d", "what a day", "no way!!"]]))
    thr = {"calm": 0.2, "happy": 0.5, "angry": 0.9}
    for out in res.outputs:
        head = orjson.loads(out.value)["emotions"]["mood"]
        assert head["labels"] == [l for l in LABELS if head["scores"][l] >= thr[l]]
        assert head["top"] == max(head["scores"], key=head["scores"].get)


def test_scores_match_the_model(tiny):
    s = Settings.from_env(environ={}, score_decimals=9)
    texts = ["first text", "second, longer text here"]
    res = Enricher(tiny, s)(raw([orjson.dumps({"text": t}) for t in texts]))
    probs = tiny.predict(texts).heads["mood"].probs
    got = np.array([[orjson.loads(o.value)["emotions"]["mood"]["scores"][l] for l in LABELS] for o in res.outputs])
    np.testing.assert_allclose(got, probs, atol=1e-6)


def test_include_text_and_reserved_fields(tiny):
    s = Settings.from_env(environ={}, include_text=True)
    res = Enricher(tiny, s)(raw([orjson.dumps({"text": "hi there", "emotions": "spoofed", "source": 1})]))
    out = orjson.loads(res.outputs[0].value)
    assert out["text"] == "hi there"
    assert isinstance(out["emotions"], dict) and isinstance(out["source"], dict)


class FlakyModel:
    """Wraps a model; any batch containing a poisoned text raises, like a runtime failure would."""

    def __init__(self, model, poison):
        self.model, self.poison, self.calls = model, poison, 0
        self.info, self.heads = model.info, model.heads

    def predict(self, texts, max_tokens=4096):
        self.calls += 1
        if any(self.poison in t for t in texts):
            raise RuntimeError("injected inference failure")
        return self.model.predict(texts, max_tokens=max_tokens)


def test_inference_failure_is_isolated(tiny):
    flaky = FlakyModel(tiny, "POISON")
    texts = [f"fine text {i}" for i in range(16)]
    texts[5] = "this one is POISON"
    res = Enricher(flaky, Settings.from_env(environ={}))(raw([orjson.dumps({"id": str(i), "text": t})
                                                             for i, t in enumerate(texts)]))
    assert sorted(int(orjson.loads(o.value)["id"]) for o in res.outputs) == [i for i in range(16) if i != 5]
    assert len(res.dead_letters) == 1
    dl = orjson.loads(res.dead_letters[0].value)
    assert dl["id"] == "5" and dl["error"]["code"] == "inference_failed"
    assert flaky.calls <= 1 + 2 * 4  # bisection, not one call per record


def test_too_large_original_is_truncated(tiny):
    s = Settings.from_env(environ={}, max_record_bytes=100, dlq_max_original_bytes=10)
    res = Enricher(tiny, s)(raw([b'{"text": "' + b"z" * 200 + b'"}']))
    dl = orjson.loads(res.dead_letters[0].value)
    assert dl["error"]["code"] == "too_large"
    assert dl["original_truncated"] is True and dl["original_size"] == 212
    assert len(base64.b64decode(dl["original"])) == 10


def test_empty_batch(tiny):
    res = Enricher(tiny, Settings.from_env(environ={}))([])
    assert res.outputs == [] and res.dead_letters == []


@pytest.mark.parametrize("mode", ["float32", "float16"])
def test_embedding_in_output(tiny, mode):
    s = Settings.from_env(environ={}, embedding_output=mode)
    texts = ["one text", "another, longer text"]
    res = Enricher(tiny, s)(raw([orjson.dumps({"text": t}) for t in texts]))
    want = tiny.predict(texts).embeddings
    for out, row in zip(res.outputs, want):
        emb = orjson.loads(out.value)["embedding"]
        if mode == "float32":
            np.testing.assert_allclose(np.array(emb, dtype=np.float32), row, rtol=1e-6)
        else:
            assert emb["dtype"] == "float16" and emb["dim"] == row.shape[0]
            got = np.frombuffer(base64.b64decode(emb["data"]), dtype="<f2").astype(np.float32)
            np.testing.assert_allclose(got, row, rtol=2e-3, atol=2e-3)


def test_embedding_off_by_default(tiny):
    res = Enricher(tiny, Settings.from_env(environ={}))(raw([orjson.dumps({"text": "x"})]))
    assert "embedding" not in orjson.loads(res.outputs[0].value)


def test_swap_model_changes_versions_from_the_next_batch(tiny, tmp_path):
    other = EmotionModel.load(str(write_manifest(tmp_path, seed=5)))
    enricher = Enricher(tiny, Settings.from_env(environ={}), cache_size=10)
    first = orjson.loads(enricher(raw([orjson.dumps({"text": "same"})])).outputs[0].value)
    enricher.swap_model(other)
    second = orjson.loads(enricher(raw([orjson.dumps({"text": "same"})])).outputs[0].value)
    assert first["emotions"] != second["emotions"]  # not served from the old model's cache


class WatchedCondition(threading.Condition):
    """A Condition that tells how many threads are waiting on it (to wait for that, not for time)."""

    def __init__(self):
        super().__init__()
        self.waiting = 0

    def wait(self, timeout=None):
        self.waiting += 1  # called with the lock held
        try:
            return super().wait(timeout)
        finally:
            self.waiting -= 1


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_swap_waits_for_batches_being_enriched_and_holds_new_ones_back(tiny, tmp_path):
    """Two batches may be enriched at once; a model swap never lands inside one."""
    entered = threading.Event()
    release = threading.Event()

    class Blocking:  # the tiny model, whose predict waits until released
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def predict(self, *args, **kwargs):
            entered.set()
            release.wait(10)
            return self.model.predict(*args, **kwargs)

    other = EmotionModel.load(str(write_manifest(tmp_path, seed=5)))
    enricher = Enricher(Blocking(tiny), Settings.from_env(environ={}))
    gate = enricher._gate = WatchedCondition()  # the Enricher's swap gate, made observable
    results: dict = {}
    first = threading.Thread(target=lambda: results.setdefault("first", enricher(raw([orjson.dumps({"text": "a"})]))))
    first.start()
    assert entered.wait(10)  # the first batch is inside the model
    swap = threading.Thread(target=enricher.swap_model, args=(other,))
    swap.start()
    wait_until(lambda: gate.waiting == 1)  # the swap waits for the first batch
    later = threading.Thread(target=lambda: results.setdefault("later", enricher(raw([orjson.dumps({"text": "a"})]))))
    later.start()
    wait_until(lambda: gate.waiting == 2)  # the later batch waits for the swap
    assert swap.is_alive() and "first" not in results and "later" not in results
    release.set()
    for t in (first, swap, later):
        t.join(10)
    first_out, later_out = (orjson.loads(results[k].outputs[0].value) for k in ("first", "later"))
    assert first_out["emotions"] == orjson.loads(Enricher(tiny, Settings.from_env(environ={}))(
        raw([orjson.dumps({"text": "a"})])).outputs[0].value)["emotions"]  # all old model
    assert later_out["emotions"] != first_out["emotions"]  # all new model


def test_passthrough_too_deep_to_encode_is_dead_lettered(tiny):
    """orjson reads 1024 levels but writes only 254: such a record must not take its batch down."""
    deep = b'{"id": "deep", "text": "x", "junk": ' + b"[" * 600 + b"]" * 600 + b"}"
    res = Enricher(tiny, Settings.from_env(environ={}))(raw([orjson.dumps({"id": "ok", "text": "fine"}), deep]))
    assert [orjson.loads(o.value)["id"] for o in res.outputs] == ["ok"]
    dl = orjson.loads(res.dead_letters[0].value)
    assert dl["id"] == "deep" and dl["error"]["code"] == "unprocessable"


def test_unexpected_decode_error_is_dead_lettered(tiny, monkeypatch):
    import emostream.worker.pipeline as pipeline

    real = pipeline.decode

    def boom(msg, settings):
        if msg.value == b"boom":
            raise RuntimeError("decoder bug")
        return real(msg, settings)

    monkeypatch.setattr(pipeline, "decode", boom)
    res = Enricher(tiny, Settings.from_env(environ={}))(raw([b"boom", orjson.dumps({"text": "fine"})]))
    assert len(res.outputs) == 1 and orjson.loads(res.dead_letters[0].value)["error"]["code"] == "unprocessable"


@settings(max_examples=150, deadline=None)
@given(values=st.lists(POISON, min_size=1, max_size=12))
def test_any_input_gives_exactly_one_result_per_record(tiny, values):
    res = Enricher(tiny, Settings.from_env(environ={}))(raw(values, keys=[str(i).encode() for i in range(len(values))]))
    keys = [o.key for o in res.outputs] + [d.key for d in res.dead_letters]
    assert sorted(keys) == sorted(str(i).encode() for i in range(len(values)))
    for d in res.dead_letters:
        assert orjson.loads(d.value)["error"]["code"]


def test_inference_time_counts_the_model_calls_only(tiny, monkeypatch):
    """On a fake clock the model takes 0.25 s a call and each record's alert rules 1 s: only the model counts."""
    import emostream.worker.pipeline as pipeline

    clock = {"now": 0.0}
    real_evaluate = pipeline.evaluate

    def slow_evaluate(rules, emotions):
        clock["now"] += 1.0
        return real_evaluate(rules, emotions)

    class Slow:
        info, heads = tiny.info, tiny.heads

        def predict(self, texts, max_tokens=4096):
            clock["now"] += 0.25
            return tiny.predict(texts, max_tokens=max_tokens)

    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(pipeline, "evaluate", slow_evaluate)
    rules = [parse_rule("any", "calm >= 0")]
    res = Enricher(Slow(), Settings.from_env(environ={}), rules=rules)(
        raw([orjson.dumps({"text": t}) for t in ("one", "two", "three")]))
    assert len(res.outputs) == 3 and len(res.alerts) == 3
    assert res.inference_s == 0.25


def test_each_record_is_encoded_once_and_alerts_carry_the_output(tiny, monkeypatch):
    import emostream.worker.pipeline as pipeline

    calls = []

    class CountingOrjson:
        OPT_SERIALIZE_NUMPY = orjson.OPT_SERIALIZE_NUMPY
        JSONEncodeError = orjson.JSONEncodeError

        @staticmethod
        def dumps(obj, **kw):
            calls.append(obj)
            return orjson.dumps(obj, **kw)

    monkeypatch.setattr(pipeline, "orjson", CountingOrjson)
    rules = [parse_rule("calm", "calm >= 0"), parse_rule("never", "calm > 1")]
    enricher = Enricher(tiny, Settings.from_env(environ={}), clock=lambda: 1_700_000_000.0, rules=rules)
    res = enricher(raw([orjson.dumps({"id": "a", "text": "fine"}), orjson.dumps({"id": "b", "text": "also fine"})]))
    assert len(calls) == 2  # one encoding per enriched record, none more for its alert
    for out, alert in zip(res.outputs, res.alerts):
        record = orjson.loads(out.value)
        assert orjson.loads(alert.value) == {**record, "alert": {"rules": ["calm"],
                                                                 "at": "2023-11-14T22:13:20.000+00:00"}}
    assert dict(res.alerts_fired) == {"calm": 2}


def test_a_passthrough_alert_field_is_replaced_in_the_alert_record(tiny):
    enricher = Enricher(tiny, Settings.from_env(environ={}), clock=lambda: 0.0, rules=[parse_rule("calm", "calm >= 0")])
    res = enricher(raw([orjson.dumps({"text": "fine", "alert": "from the producer"})]))
    assert orjson.loads(res.outputs[0].value)["alert"] == "from the producer"
    alert = orjson.loads(res.alerts[0].value)
    assert alert["alert"] == {"rules": ["calm"], "at": "1970-01-01T00:00:00.000+00:00"}
