"""Fine-tuning tooling (emostream.models.training).

The pure parts (label mappings, the sentiment rule, the bucketed batch sampler) need no torch
and always run. The rest needs torch (the ``train`` extra, which ``.ci/run`` installs): where it
is not installed, those tests skip (``pytest.importorskip("torch")``).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from emostream.models.linear_head import GO_EMOTIONS_LABELS
from emostream.models.training.data import (EKMAN_LABELS, EKMAN_MAPPING, SENTIMENT_LABELS, SENTIMENT_MAPPING,
                                            bucket_batches, ekman_targets, group_matrix, load_label_sets, pad_batch,
                                            sentiment_targets)

FIXTURES = Path(__file__).parent / "fixtures" / "go_emotions_small"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "go_emotions"
GO = list(GO_EMOTIONS_LABELS)


def _y(*rows):
    y = np.zeros((len(rows), 28), dtype=np.uint8)
    for i, names in enumerate(rows):
        y[i, [GO.index(n) for n in names]] = 1
    return y


# ------------------------------------------------------------------------------ torch-free


def test_every_label_in_exactly_one_group():
    for mapping, groups in ((EKMAN_MAPPING, EKMAN_LABELS), (SENTIMENT_MAPPING, SENTIMENT_LABELS)):
        M = group_matrix(GO, mapping, groups)
        assert (M.sum(axis=1) == 1).all()


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared GoEmotions data not here")
def test_builtin_mappings_match_the_dataset_files():
    assert json.loads((SHARED / "ekman_mapping.json").read_text()) == EKMAN_MAPPING
    assert json.loads((SHARED / "sentiment_mapping.json").read_text()) == SENTIMENT_MAPPING


def test_ekman_targets_any_member():
    _, ek, _ = load_label_sets(FIXTURES)
    t = ekman_targets(_y(["annoyance", "curiosity"], ["neutral"], ["grief", "remorse"]), ek)
    idx = {g: i for i, g in enumerate(EKMAN_LABELS)}
    assert t[0].tolist() == [1 if g in ("anger", "surprise") else 0 for g in EKMAN_LABELS]
    assert t[1, idx["neutral"]] == 1 and t[1].sum() == 1
    assert t[2, idx["sadness"]] == 1 and t[2].sum() == 1


@pytest.mark.parametrize("names, expected", [
    (["joy"], "positive"),
    (["anger"], "negative"),
    (["curiosity"], "ambiguous"),
    (["neutral"], "neutral"),
    (["joy", "love", "anger"], "positive"),          # majority
    (["joy", "anger"], "negative"),                   # tie: negative > positive
    (["joy", "surprise"], "positive"),                # tie: positive > ambiguous
    (["surprise", "neutral"], "ambiguous"),           # tie: ambiguous > neutral
    (["sadness", "curiosity", "neutral"], "negative"),
    ([], "neutral"),                                  # no label at all
])
def test_sentiment_rule(names, expected):
    _, _, se = load_label_sets(FIXTURES)
    assert SENTIMENT_LABELS[sentiment_targets(_y(names), se)[0]] == expected


def test_bucket_batches_cover_every_index_once_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=1003).tolist()
    batches = bucket_batches(lengths, 32, shuffle=True, seed=1, pool=10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1003))
    assert all(len(b) <= 32 for b in batches)
    # Bucketing: far less padding than random batches.
    pad = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    rand = [flat[i:i + 32] for i in range(0, 1003, 32)]
    rng.shuffle(flat)
    rand = [flat[i:i + 32] for i in range(0, 1003, 32)]
    assert pad < 0.8 * sum(max(lengths[i] for i in b) * len(b) for b in rand)
    assert bucket_batches(lengths, 32, seed=1, pool=10) == batches  # deterministic per seed
    assert bucket_batches(lengths, 32, seed=2, pool=10) != batches
    sorted_batches = bucket_batches(lengths, 32, shuffle=False)
    assert [lengths[i] for b in sorted_batches for i in b] == sorted(lengths)


def test_pad_batch():
    ids, mask = pad_batch([[101, 5, 102], [101, 102]])
    assert ids.tolist() == [[101, 5, 102], [101, 102, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


# ----------------------------------------------------------------------------- needs torch


def test_torch_bert_matches_the_shipped_onnx_backbone():
    torch = pytest.importorskip("torch")
    from emostream.models.model import EmotionModel
    from emostream.models.training.bert import Bert, mean_pool
    from emostream.models.training.finetune import tokenizer

    texts = ["I love this so much!", "This is awful and I am angry.", "ok"]
    tok = tokenizer(64)
    ids, mask = pad_batch([e.ids for e in tok.encode_batch(texts)])
    with torch.no_grad():
        m = Bert.from_pretrained().eval()
        e = mean_pool(m(torch.tensor(ids), torch.tensor(mask)), torch.tensor(mask)).numpy()
    ref = EmotionModel.load("minilm").encoder.embed(texts).embeddings
    assert ((e * ref).sum(1) > 0.98).all()  # the shipped backbone is INT8


def test_train_resume_and_export_heads(tmp_path):
    torch = pytest.importorskip("torch")
    from emostream.models.heads import Head
    from emostream.models.training.export import export_heads, load_checkpoint
    from emostream.models.training.finetune import train

    out = tmp_path / "run"
    kw = dict(data_dir=FIXTURES, batch_size=16, limit_train=48, limit_dev=32, progress=False, threads=1)
    r1 = train(out, epochs=1, **kw)
    assert (out / "epoch-1.pt").is_file() and len(r1["history"]) == 1
    assert set(r1["history"][0]["dev"]) == {"go_emotions", "ekman", "sentiment"}
    r2 = train(out, epochs=2, resume=True, **kw)  # continues at epoch 2
    assert [h["epoch"] for h in r2["history"]] == [1, 2]

    model, ck = load_checkpoint(out / "last.pt")
    specs = export_heads(model, GO, tmp_path / "heads", "t")
    x = torch.nn.functional.normalize(torch.randn(5, 384), dim=-1)
    with torch.no_grad():
        ref = {k: h(x * model.log_scale.exp()) for k, h in model.heads.items()}
    for name, spec in specs.items():
        got = Head(spec).probabilities(x.numpy())
        want = ref[name].softmax(-1) if name == "sentiment" else ref[name].sigmoid()
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def _calibration(n: int = 40) -> list[str]:
    from emostream.models.linear_head import read_goemotions

    return read_goemotions(FIXTURES / "dev.tsv")[0][:n]


def test_export_backbone_onnx_matches_torch_and_int8_ignores_the_batch(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import onnxruntime as ort

    from emostream.models.training.export import export_backbone
    from emostream.models.training.finetune import build

    model = build("cpu").eval()
    t = export_backbone(model, tmp_path / "fp32.onnx", tmp_path / "int8.onnx", _calibration())
    assert t["int8"]["int8_mb"] < t["fp32_mb"] / 2
    ids = np.array([[101, 2023, 2003, 2307, 999, 102], [101, 2307, 102, 0, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        ref = model.backbone(torch.tensor(ids), torch.tensor(mask)).numpy()

    def run(path, ids):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64),
                               "token_type_ids": np.zeros_like(ids)})[0]

    out = run(tmp_path / "fp32.onnx", ids)
    assert out.shape == (2, 6, 384)
    np.testing.assert_allclose(out[mask.astype(bool)], ref[mask.astype(bool)], atol=1e-3)
    q = run(tmp_path / "int8.onnx", ids)
    cos = (q * ref).sum(-1) / np.linalg.norm(q, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos[mask.astype(bool)].min() > 0.99
    # each row alone (no padding, no neighbour) gives the batch's result to the bit
    np.testing.assert_array_equal(run(tmp_path / "int8.onnx", ids[:1])[0], q[0])
    np.testing.assert_array_equal(run(tmp_path / "int8.onnx", ids[1:, :3])[0], q[1, :3])


def test_export_from_an_fp32_onnx_requantises_and_retunes(tmp_path, capsys):
    """``export --fp32-onnx``: heads already in --heads-dir, their training record kept; new INT8
    backbone, thresholds tuned over it, metrics for both backbones and the batch invariance."""
    pytest.importorskip("torch")
    from emostream.models.training.export import export_fp32, export_heads, main
    from emostream.models.training.finetune import build

    model = build("cpu").eval()
    export_fp32(model, tmp_path / "fp32.onnx")
    heads = tmp_path / "heads"
    export_heads(model, GO, heads, "t")
    (heads / "ft_go_emotions" / "metrics.json").write_text(json.dumps({"training": {"epochs": 4}}))
    assert main(["--fp32-onnx", str(tmp_path / "fp32.onnx"), "--backbone-out", str(tmp_path / "int8.onnx"),
                 "--heads-dir", str(heads), "--work", str(tmp_path / "work"), "--data-dir", str(FIXTURES),
                 "--limit-dev", "40", "--version", "t2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch_invariance_max_abs_diff"] <= 1e-6 and set(out["dev"]) == {"fp32", "int8"}
    assert (tmp_path / "int8.onnx").stat().st_size < (tmp_path / "fp32.onnx").stat().st_size / 2
    metrics = json.loads((heads / "ft_go_emotions" / "metrics.json").read_text())
    assert metrics["version"] == "t2" and metrics["training"] == {"epochs": 4}
    assert len(json.loads((heads / "ft_go_emotions" / "thresholds.json").read_text())) == 28
    with pytest.raises(SystemExit):  # a missing file is one clear line, not a traceback
        main(["--fp32-onnx", str(tmp_path / "nope.onnx"), "--backbone-out", "x", "--heads-dir", "h", "--work", "w"])
    assert "no such file" in capsys.readouterr().err


def test_fused_classifier_matches_backbone_plus_heads(tmp_path):
    """The end-to-end export (fp32 and INT8) gives the separate files' scores within 1e-4."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from emostream.models.encoder import Encoder
    from emostream.models.heads import Head
    from emostream.models.manifest import BackboneSpec
    from emostream.models.training.export import (HEAD_ORDER, export_backbone, export_fused, export_heads,
                                                  write_fused_manifest)
    from emostream.models.training.finetune import build
    from emostream.models.model import EmotionModel
    from tiny_model import tokenizer_path

    model = build("cpu").eval()
    export_backbone(model, tmp_path / "bb-fp32.onnx", tmp_path / "bb-int8.onnx", _calibration())
    specs = export_heads(model, GO, tmp_path / "heads", "t")
    info = export_fused(model, tmp_path / "fused-fp32.onnx", tmp_path / "fused-int8.onnx", _calibration())
    assert len(info["fused_fp32_heads"]) == 3  # the head MatMuls were kept out of quantisation
    texts = ["I am so happy for you!", "This is awful and I hate it", "ok", "why would anyone do that?? " * 6]
    for tag in ("fp32", "int8"):
        enc = Encoder(BackboneSpec("bb", "0", tmp_path / f"bb-{tag}.onnx", tokenizer_path(), max_length=128))
        emb = enc.embed(texts).embeddings
        fused = EmotionModel.load(str(write_fused_manifest(tmp_path / f"fused-{tag}.toml",
                                                          tmp_path / f"fused-{tag}.onnx", tmp_path / "heads", "t")))
        pred = fused.predict(texts)
        assert [h.name for h in fused.heads] == list(HEAD_ORDER)
        np.testing.assert_allclose(pred.embeddings, emb, atol=1e-4)
        for name in HEAD_ORDER:
            np.testing.assert_allclose(pred.heads[name].probs, Head(specs[name]).probabilities(emb), atol=1e-4)


def test_pos_weights_lift_rare_labels_and_are_off_by_default():
    torch = pytest.importorskip("torch")
    from emostream.models.training.finetune import loss_fn, pos_weights

    y = np.zeros((1000, 3), dtype=np.float32)
    y[:500, 0] = 1  # common
    y[:10, 1] = 1  # rare: (990 / 10) ** 0.5 ≈ 9.95
    y[:1, 2] = 1  # rarer still: capped
    w = pos_weights(y, 0.5, 10.0)
    np.testing.assert_allclose(w, [1.0, (990 / 10) ** 0.5, 10.0], rtol=1e-6)
    assert pos_weights(y, 0.0, 10.0) is None
    out = {"go_emotions": torch.zeros(2, 3), "ekman": torch.zeros(2, 7), "sentiment": torch.zeros(2, 4)}
    target = {"go_emotions": torch.tensor([[0, 1, 0], [0, 0, 0.]]), "ekman": torch.zeros(2, 7),
              "sentiment": torch.tensor([0, 1])}
    plain, _ = loss_fn(out, target)
    weighted, _ = loss_fn(out, target, {"go_emotions": torch.as_tensor(w)})
    assert float(weighted) > float(plain)  # a missed rare positive costs more


def _tiny_mpnet(path: Path, torch) -> Path:
    """A randomly initialised MPNet folder in Hugging Face's layout (names as all-mpnet-base-v2's)."""
    from safetensors.torch import save_file

    h, inter, layers, heads, vocab = 32, 64, 2, 4, 50
    cfg = {"model_type": "mpnet", "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "vocab_size": vocab, "max_position_embeddings": 66, "pad_token_id": 1,
           "layer_norm_eps": 1e-5, "relative_attention_num_buckets": 32}
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"embeddings.word_embeddings.weight": r(vocab, h), "embeddings.position_embeddings.weight": r(66, h),
          "embeddings.LayerNorm.weight": torch.ones(h), "embeddings.LayerNorm.bias": torch.zeros(h),
          "encoder.relative_attention_bias.weight": r(32, heads)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in "qkvo":
            sd[p + f"attention.attn.{n}.weight"], sd[p + f"attention.attn.{n}.bias"] = r(h, h), r(h)
        sd[p + "attention.LayerNorm.weight"], sd[p + "attention.LayerNorm.bias"] = torch.ones(h), torch.zeros(h)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r(inter, h), r(inter)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r(h, inter), r(h)
        sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"] = torch.ones(h), torch.zeros(h)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(path / "model.safetensors"))
    return path


def test_mpnet_backbone_loads_and_padding_never_moves_a_text(tmp_path):
    torch = pytest.importorskip("torch")
    from emostream.models.training.bert import Bert

    model = Bert.from_pretrained(_tiny_mpnet(tmp_path / "mpnet", torch)).eval()
    assert model.mpnet and model.token_type is None
    ids = torch.tensor([[0, 7, 8, 9, 2, 1, 1], [0, 11, 2, 1, 1, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        batch = model(ids, mask)
        alone = model(ids[1:, :3], mask[1:, :3])
        other_pad = model(torch.where(mask.bool(), ids, torch.zeros_like(ids)), mask)  # pad id 0 instead of 1
    torch.testing.assert_close(batch[1, :3], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[mask.bool()], other_pad[mask.bool()], atol=1e-6, rtol=0)


def test_relative_position_buckets_are_mpnets():
    torch = pytest.importorskip("torch")
    from emostream.models.training.bert import relative_position_bucket

    # key − query distances → buckets, as Hugging Face's MPNet computes them (checked against
    # transformers 5.24 on all-mpnet-base-v2, where the outputs matched exactly).
    rel = torch.tensor([0, 1, -1, 7, -7, 8, -8, 20, -20, 127, 200, -200])
    assert relative_position_bucket(rel).tolist() == [0, 17, 1, 23, 7, 24, 8, 26, 10, 31, 31, 15]


def test_distillation_mixes_teacher_and_gold_and_checks_the_teacher_file(tmp_path):
    pytest.importorskip("torch")
    from emostream.models.training.finetune import Split, load_teacher, tokenizer, train, write_teacher

    kw = dict(data_dir=FIXTURES, batch_size=16, limit_train=48, limit_dev=32, progress=False, threads=1)
    train(tmp_path / "teacher", epochs=1, **kw)
    res = write_teacher(tmp_path / "teacher" / "last.pt", tmp_path / "t.npz", FIXTURES, "train", device="cpu",
                        threads=1)
    rows = sum(1 for line in (FIXTURES / "train.tsv").read_text().splitlines() if line.strip())
    assert res["rows"] == rows
    teacher = load_teacher(tmp_path / "t.npz", FIXTURES / "train.tsv")
    assert teacher["go_emotions"].shape == (rows, 28) and teacher["sentiment"].shape == (rows, 4)
    np.testing.assert_allclose(teacher["sentiment"].sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="different dev.tsv"):
        load_teacher(tmp_path / "t.npz", FIXTURES / "dev.tsv")

    labels, ek, se = load_label_sets(FIXTURES)
    split = Split(FIXTURES / "train.tsv", tokenizer(64), labels, ek, se)
    split.distill(teacher, 0.25)
    _, _, target = split.batch([0, 1], "cpu")
    np.testing.assert_allclose(target["go_emotions"].numpy(), 0.75 * split.go[[0, 1]] + 0.25 * teacher["go_emotions"][[0, 1]],
                               atol=1e-6)
    assert target["sentiment"].shape == (2, 4)  # a distribution now, not a class index
    r = train(tmp_path / "student", epochs=1, teacher=tmp_path / "t.npz", distill_weight=0.5, **kw)
    assert r["hparams"]["distill_weight"] == 0.5 and r["hparams"]["teacher"].endswith("t.npz")
