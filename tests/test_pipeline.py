"""The pipeline without Kafka: one output per valid record, dead letters for the rest, failures isolated."""

import base64
import time

import numpy as np

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from emostream.models.model import EmotionModel
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


def test_swap_waits_for_batches_being_enriched_and_holds_new_ones_back(tiny, tmp_path):
    """Two batches may be enriched at once; a model swap never lands inside one."""
    import threading

    release = threading.Event()

    class Blocking:  # the tiny model, whose predict waits until released
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def predict(self, *args, **kwargs):
            release.wait(10)
            return self.model.predict(*args, **kwargs)

    other = EmotionModel.load(str(write_manifest(tmp_path, seed=5)))
    enricher = Enricher(Blocking(tiny), Settings.from_env(environ={}))
    results: dict = {}
    first = threading.Thread(target=lambda: results.setdefault("first", enricher(raw([orjson.dumps({"text": "a"})]))))
    first.start()
    swap = threading.Thread(target=enricher.swap_model, args=(other,))
    time.sleep(0.1)
    swap.start()
    time.sleep(0.1)
    later = threading.Thread(target=lambda: results.setdefault("later", enricher(raw([orjson.dumps({"text": "a"})]))))
    later.start()
    time.sleep(0.1)
    assert swap.is_alive() and "first" not in results and "later" not in results  # both wait for the first batch
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
