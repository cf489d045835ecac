"""Through a real broker (embedded Tansu) and real worker processes."""

import re
import time

import orjson
import pytest
from jsonschema import Draft202012Validator

from emostream.schemas.records import load_schema

from conftest import Topics
from group import wait_for_group

pytestmark = pytest.mark.broker

LABELS = open(__import__("pathlib").Path(__file__).parent / "fixtures/go_emotions_small/labels.txt").read().split()


@pytest.mark.parametrize("overlap,extra", [(True, {}), (False, {}), (True, {"batches_in_flight": 4, "batch_max": 8})],
                         ids=["publish-overlap", "no-overlap", "four-batches-in-flight"])
def test_n_in_n_out_with_scores_ids_and_keys(topics, start_worker, overlap, extra):
    w = start_worker(topics, publish_overlap=overlap, **extra)
    n = 150
    values = [orjson.dumps({"id": f"id-{i}", "text": f"I am so happy about number {i}!", "seq": i}) for i in range(n)]
    topics.produce(values, keys=[f"key-{i}".encode() for i in range(n)])
    recs = topics.consume(topics.settings.output_topic, n, timeout=90)
    assert len(recs) == n, w.output()[-3000:]
    outs = [orjson.loads(r.value) for r in recs]
    assert sorted(o["id"] for o in outs) == sorted(f"id-{i}" for i in range(n))
    validator = Draft202012Validator(load_schema("output"), format_checker=Draft202012Validator.FORMAT_CHECKER)
    for rec, out in zip(recs, outs):
        validator.validate(out)
        assert rec.key == f"key-{out['seq']}".encode()  # keyed like the input
        scores = out["emotions"]["go_emotions"]["scores"]
        assert list(scores) == LABELS and len(scores) == 28
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert out["source"]["topic"] == topics.settings.input_topic
    # Order is kept: within an output partition, records of one input partition follow input offsets.
    seen: dict = {}
    for rec, out in zip(recs, outs):
        key = (rec.partition, out["source"]["partition"])
        assert out["source"]["offset"] > seen.get(key, -1)
        seen[key] = out["source"]["offset"]
    # nothing extra comes out
    assert topics.consume(topics.settings.output_topic, n + 1, timeout=3)[n:] == []
    assert w.stop() == 0


def test_bad_records_go_to_dlq_and_neighbours_come_out(topics, start_worker):
    start_worker(topics)
    good = [orjson.dumps({"id": f"g{i}", "text": "what a lovely morning"}) for i in range(6)]
    bad = [b"not json", b'{"id": "b1"}', b'{"id": "b2", "text": ""}', b'{"id": "b3", "text": 7}', b"\xff\xfe",
           b"[1,2]"]
    mixed = [v for pair in zip(good, bad) for v in pair]  # interleaved so they share batches
    topics.produce(mixed)
    outs = topics.outputs(len(good))
    dlq = topics.dead_letters(len(bad))
    assert sorted(o["id"] for o in outs) == [f"g{i}" for i in range(6)]
    codes = sorted(d["error"]["code"] for d in dlq)
    assert codes == sorted(["not_json", "missing_text", "empty_text", "text_not_string", "not_utf8", "not_object"])
    validator = Draft202012Validator(load_schema("dead_letter"), format_checker=Draft202012Validator.FORMAT_CHECKER)
    for d in dlq:
        validator.validate(d)
        assert d["error"]["message"]


def test_batches_close_by_count_and_by_window(broker, start_worker):
    t = Topics(broker, partitions=1, batch_max=4, batch_window_ms=200)
    w = start_worker(t, log_level="debug")
    t.produce([orjson.dumps({"text": f"text {i}"}) for i in range(3)])
    assert len(t.outputs(3)) == 3  # released by the window: 3 < batch_max
    t.produce([orjson.dumps({"text": f"more {i}"}) for i in range(40)])
    assert len(t.outputs(43)) == 43

    def logged_sizes() -> list[int]:  # a batch is logged just after its records were acknowledged
        return [int(x) for x in re.findall(r"batch of (\d+):", w.output())]

    deadline = time.monotonic() + 30
    while sum(logged_sizes()) < 43 and time.monotonic() < deadline:
        time.sleep(0.1)
    sizes = logged_sizes()
    assert sizes and max(sizes) <= 4
    assert sum(sizes) == 43
    assert sizes.count(4) >= 5  # the 40 arrived together: mostly full batches


def test_text_input_format(broker, start_worker):
    t = Topics(broker, input_format="text", include_text=True)
    start_worker(t)
    t.produce(["plain text, no JSON at all 😀".encode(), b"   "])
    out = t.outputs(1)[0]
    assert out["text"] == "plain text, no JSON at all 😀"
    assert out["id"].startswith(t.settings.input_topic + "-")
    assert t.dead_letters(1)[0]["error"]["code"] == "empty_text"


def test_two_workers_share_partitions(broker, start_worker):
    t = Topics(broker, partitions=4)
    w1, w2 = start_worker(t, log_level="debug"), start_worker(t, log_level="debug")
    wait_for_group([w1, w2], members=2, partitions=4)
    n = 400
    t.produce([orjson.dumps({"id": str(i), "text": f"shared work item {i}"}) for i in range(n)],
              keys=[str(i).encode() for i in range(n)])
    outs = t.outputs(n, timeout=120)
    assert sorted(int(o["id"]) for o in outs) == list(range(n))
    for w in (w1, w2):  # each worker really processed some batches
        assert re.search(r"batch of \d+:", w.output()), w.output()[-2000:]
    seen = set()
    for w in (w1, w2):
        for m in re.finditer(r"partitions \[([\d, ]*)\]", w.output()):
            seen |= {int(x) for x in m.group(1).split(",") if x.strip()}
    assert seen == {0, 1, 2, 3}
    assert w1.stop() == 0 and w2.stop() == 0
