"""The same text gets the same scores, whatever arrives with it (issue 19).

Every registered model is checked on 40 texts alone, batched and sub-batched. The default
model's texts are scored alone, inside batches of several sizes and compositions,
cut into sub-batches at several token budgets, on one or two concurrent streams and with one or
two threads per call: every score must match the text's score alone within 1e-4 (measured 0 on
onnxruntime 1.32.0). A model quantised with ``quantize_dynamic`` (per-batch activation scales)
fails this: up to 0.17 on GoEmotions dev. And ``emostream eval`` and the worker's pipeline give
every text the same labels.
"""

from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from emostream.models.evaluate import head_output
from emostream.models.linear_head import read_goemotions
from emostream.models.manifest import registered
from emostream.models.model import EmotionModel
from emostream.worker.decode import RawMessage
from emostream.worker.pipeline import Enricher
from emostream.worker.settings import Settings

DEV = Path(__file__).parent / "fixtures" / "go_emotions_small" / "dev.tsv"  # 150 GoEmotions dev rows
BOUND = 1e-4
DEFAULT = Settings.model_fields["model"].default  # the model the worker runs unless told otherwise
TEXTS = read_goemotions(DEV)[0]
# (streams, threads per call): the worker's default on 2 cores is 2 × 1
RUNTIMES = [(1, 1), (2, 1), (1, 2)]


@pytest.fixture(scope="module")
def models():
    return {rt: EmotionModel.load(DEFAULT, streams=rt[0], threads=rt[1]) for rt in RUNTIMES}


@pytest.fixture(scope="module")
def alone(models):
    """Every text's scores when it is the only text of its call."""
    model = models[RUNTIMES[0]]
    rows = [model.predict([t]).heads for t in TEXTS]
    return {name: np.concatenate([r[name].probs for r in rows]) for name in rows[0]}


def test_the_default_model_is_the_one_tested():
    assert DEFAULT == Settings.model_fields["model"].default == "minilm-ft-emotions"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_scores_do_not_depend_on_the_batch(models, alone, data):
    size = data.draw(st.sampled_from([2, 5, 16, 48, 150]), label="batch size")
    rows = data.draw(st.lists(st.integers(0, len(TEXTS) - 1), min_size=size, max_size=size), label="rows")
    max_tokens = data.draw(st.sampled_from([16, 96, 512, 4096, 10**6]), label="sub-batch token budget")
    runtime = data.draw(st.sampled_from(RUNTIMES), label="(streams, threads)")
    pred = models[runtime].predict([TEXTS[i] for i in rows], max_tokens=max_tokens)
    for name, out in pred.heads.items():
        assert np.abs(out.probs - alone[name][rows]).max() <= BOUND, name


@pytest.mark.parametrize("name", sorted(registered()))
def test_every_shipped_manifest_is_batch_invariant(name):
    """Each registered model: 40 texts alone, in one batch and in sub-batches of ≤ 48 tokens."""
    model = EmotionModel.load(name, threads=1)
    texts = TEXTS[:40]
    alone = [model.predict([t]) for t in texts]
    for max_tokens in (48, 10**6):
        pred = model.predict(texts, max_tokens=max_tokens)
        assert np.abs(pred.embeddings - np.concatenate([a.embeddings for a in alone])).max() <= BOUND
        for name, out in pred.heads.items():
            assert np.abs(out.probs - np.concatenate([a.heads[name].probs for a in alone])).max() <= BOUND, name


def _worker_labels(model, texts, batch_sizes, seed=0):
    """Labels per head from the worker's pipeline, texts arriving shuffled in batches of varied size."""
    order = np.random.default_rng(seed).permutation(len(texts))
    msgs = [RawMessage(orjson.dumps({"id": str(i), "text": texts[i]}), None, "texts", 0, k, 1.7e9)
            for k, i in enumerate(order)]
    enricher = Enricher(model, Settings.from_env(environ={}))
    got, start, k = {}, 0, 0
    while start < len(msgs):
        size = batch_sizes[k % len(batch_sizes)]
        for out in enricher(msgs[start:start + size]).outputs:
            record = orjson.loads(out.value)
            got[int(record["id"])] = {h: v["labels"] for h, v in record["emotions"].items()}
        start, k = start + size, k + 1
    return [got[i] for i in range(len(texts))]


def test_eval_and_the_worker_label_every_text_alike(models):
    model = models[(2, 1)]
    worker = _worker_labels(model, TEXTS, [1, 7, 64, 3, 32])
    for head in model.heads:
        out = head_output(model, head.name, TEXTS)  # the path `emostream eval` scores
        evaluated = [[head.labels[j] for j in np.flatnonzero(row)] for row in out.selected]
        assert evaluated == [w[head.name] for w in worker], head.name
    assert worker == _worker_labels(model, TEXTS, [150], seed=1)  # and a re-run in other batches agrees
