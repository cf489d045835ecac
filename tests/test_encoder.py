"""Pooling and batching of the encoder against numpy on a tiny ONNX model the test builds."""

import numpy as np
import pytest
from tokenizers import Tokenizer

from emostream.models.encoder import Encoder, pool
from emostream.models.manifest import load_manifest

from tiny_model import encoder_table, reference_hidden, tokenizer_path, write_manifest

TEXTS = ["I love this so much", "no", "What on earth is going on here, honestly?", "ok then", "🙂 fine"]


def _reference(texts, pooling, normalize, max_length=32):
    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    table = encoder_table(0)
    rows = []
    for t in texts:
        h = reference_hidden(table, tok.encode(t).ids)
        v = h[0] if pooling == "cls" else h.mean(axis=0)
        if normalize:
            v = v / np.linalg.norm(v)
        rows.append(v)
    return np.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("normalize", [False, True])
def test_pooling_matches_numpy(tmp_path, pooling, normalize):
    enc = Encoder(load_manifest(write_manifest(tmp_path, pooling, normalize)).backbone)
    got = enc.embed(TEXTS).embeddings
    np.testing.assert_allclose(got, _reference(TEXTS, pooling, normalize), rtol=1e-5, atol=1e-5)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_cls_and_mean_differ(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mean = Encoder(load_manifest(write_manifest(tmp_path / "a", "mean")).backbone).embed(TEXTS).embeddings
    cls = Encoder(load_manifest(write_manifest(tmp_path / "b", "cls")).backbone).embed(TEXTS).embeddings
    assert not np.allclose(mean, cls)


@pytest.mark.parametrize("budget", [16, 64, 100_000])
def test_sub_batches_keep_input_order(tmp_path, budget):
    """Length-sorted sub-batches under a token budget give the same rows as one text at a time."""
    enc = Encoder(load_manifest(write_manifest(tmp_path)).backbone)
    texts = TEXTS * 7
    batched = enc.embed(texts, max_tokens=budget)
    single = np.concatenate([enc.embed([t]).embeddings for t in texts])
    np.testing.assert_allclose(batched.embeddings, single, rtol=1e-5, atol=1e-6)
    assert batched.tokens == sum(len(enc.tokenize([t])[0]) for t in texts)
    assert batched.padded_tokens >= batched.tokens


def test_padding_cost_shrinks_with_bucketing(tmp_path):
    enc = Encoder(load_manifest(write_manifest(tmp_path)).backbone)
    texts = ["hi"] * 20 + ["a much longer sentence that has quite a few more tokens in it than the others"] * 2
    one_batch = enc.embed(texts, max_tokens=100_000)
    bucketed = enc.embed(texts, max_tokens=64)
    assert bucketed.padded_tokens < one_batch.padded_tokens
    np.testing.assert_allclose(bucketed.embeddings, one_batch.embeddings, rtol=1e-5, atol=1e-6)


def test_truncation_at_max_length(tmp_path):
    enc = Encoder(load_manifest(write_manifest(tmp_path)).backbone)
    ids = enc.tokenize(["word " * 500])[0]
    assert len(ids) == 32  # manifest max_length, not the tokenizer file's fixed 128


def test_pool_ignores_padding():
    hidden = np.array([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(pool(hidden, mask, "mean", False), [[2.0, 2.0]])
    np.testing.assert_allclose(pool(hidden, mask, "cls", False), [[1.0, 1.0]])


def test_empty_input(tmp_path):
    enc = Encoder(load_manifest(write_manifest(tmp_path)).backbone)
    assert enc.embed([]).embeddings.shape[0] == 0
