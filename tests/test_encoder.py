"""Pooling and batching of the encoder against numpy on a tiny ONNX model the test builds."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer

from emostream.models.encoder import Encoder, plan_streams, pool, split_sorted, spread
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
    lengths = [len(x) for x in enc.tokenize(texts)]
    bucketed = enc.embed(texts, max_tokens=100_000)
    assert bucketed.padded_tokens < max(lengths) * len(texts)  # what one padded batch would compute
    assert bucketed.padded_tokens == bucketed.tokens  # two runs of equal lengths: no padding at all
    one_at_a_time = np.concatenate([enc.embed([t]).embeddings for t in texts])
    np.testing.assert_allclose(bucketed.embeddings, one_at_a_time, rtol=1e-5, atol=1e-6)


def greedy_runs(lengths, budget):
    runs, i = [], 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and lengths[j] * (j - i + 1) <= budget:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def cost(lengths, runs, call_cost):
    return sum(lengths[j - 1] * (j - i) + call_cost for i, j in runs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 128), min_size=1, max_size=300), st.sampled_from([16, 64, 512, 4096]),
       st.sampled_from([0, 20, 200]))
def test_split_sorted_is_a_valid_cheapest_cut(lengths, budget, call_cost):
    lengths = sorted(lengths)
    runs = split_sorted(np.array(lengths), budget, call_cost)
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(runs, runs[1:] + [(runs[-1][1], None)]))
    for i, j in runs:  # within budget, or a single text that alone exceeds it
        assert lengths[j - 1] * (j - i) <= budget or j - i == 1
    mine = cost(lengths, runs, call_cost)
    assert mine <= cost(lengths, greedy_runs(lengths, budget), call_cost) + 1e-9
    assert mine <= cost(lengths, [(k, k + 1) for k in range(len(lengths))], call_cost) + 1e-9


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


def test_auto_provider_falls_back_to_cpu_with_a_log_line(caplog, monkeypatch):
    import onnxruntime as ort

    from emostream.models import encoder as encoder_mod

    monkeypatch.setattr(encoder_mod, "_said", set())
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level("INFO", logger="emostream.models.encoder"):
        assert encoder_mod.resolve_providers(["auto"]) == ["CPUExecutionProvider"]
    assert "execution provider: CPU" in caplog.text
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert encoder_mod.resolve_providers(["auto"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_missing_named_provider_is_dropped_with_a_warning(caplog, monkeypatch):
    import onnxruntime as ort

    from emostream.models import encoder as encoder_mod

    monkeypatch.setattr(encoder_mod, "_said", set())
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level("WARNING", logger="emostream.models.encoder"):
        assert encoder_mod.resolve_providers(["CUDAExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "not available" in caplog.text and "CUDAExecutionProvider" in caplog.text


def test_session_without_spinning_gives_the_same_embeddings(tmp_path):
    spec = load_manifest(write_manifest(tmp_path)).backbone
    a = Encoder(spec, threads=2, spinning=False).embed(TEXTS).embeddings
    b = Encoder(spec, threads=2, spinning=True).embed(TEXTS).embeddings
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# --- concurrent session calls (inference streams) ---------------------------------------------
def test_plan_streams_auto_is_one_single_threaded_call_per_core_on_cpu():
    assert plan_streams(0, 0, "CPUExecutionProvider", cores=2) == (2, 1)
    assert plan_streams(0, 0, "CPUExecutionProvider", cores=8) == (8, 1)
    assert plan_streams(0, 0, "CUDAExecutionProvider", cores=8) == (1, 0)  # a GPU: one stream
    assert plan_streams(2, 0, "CPUExecutionProvider", cores=8) == (2, 4)  # threads: the cores shared out
    assert plan_streams(1, 0, "CPUExecutionProvider", cores=8) == (1, 8)  # one call: all the cores, set by us
    assert plan_streams(0, 0, "CPUExecutionProvider", cores=1) == (1, 1)  # never ONNX Runtime's default
    assert plan_streams(3, 2, "CPUExecutionProvider", cores=2) == (3, 2)  # explicit values are kept


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 128), min_size=1, max_size=120), st.sampled_from([16, 64, 512]),
       st.integers(1, 6))
def test_spread_covers_every_text_once_and_feeds_every_stream(lengths, budget, streams):
    lengths = np.array(sorted(lengths))
    runs = spread(split_sorted(lengths, budget), lengths, streams)
    covered = sorted(i for a, b in runs for i in range(a, b))
    assert covered == list(range(len(lengths)))
    assert len(runs) >= min(streams, len(lengths))
    costs = [int(lengths[b - 1]) * (b - a) for a, b in runs]
    assert costs == sorted(costs, reverse=True)  # costliest first: the streams finish close together


@pytest.mark.parametrize("budget", [16, 64, 100_000])
def test_streams_give_the_same_rows_as_one_call_at_a_time(tmp_path, budget):
    spec = load_manifest(write_manifest(tmp_path)).backbone
    texts = TEXTS * 9
    one = Encoder(spec, streams=1, threads=1).embed(texts, max_tokens=budget)
    two = Encoder(spec, streams=2, threads=1).embed(texts, max_tokens=budget)
    np.testing.assert_allclose(two.embeddings, one.embeddings, rtol=1e-5, atol=1e-6)
    assert two.tokens == one.tokens


def test_a_small_batch_is_split_over_the_streams(tmp_path):
    """Even a batch that fits one call runs on every stream, each on its own thread."""
    import threading

    enc = Encoder(load_manifest(write_manifest(tmp_path)).backbone, streams=2, threads=1)
    assert (enc.streams, enc.threads) == (2, 1)
    seen: list[tuple[str, int]] = []
    run = enc._run

    def spy(ids):
        seen.append((threading.current_thread().name, len(ids)))
        return run(ids)

    enc._run = spy
    texts = ["same length"] * 6
    np.testing.assert_allclose(enc.embed(texts, max_tokens=100_000).embeddings,
                               np.concatenate([Encoder(enc.spec).embed([t]).embeddings for t in texts]),
                               rtol=1e-5, atol=1e-6)
    assert sorted(n for _, n in seen) == [3, 3]
    assert all(name.startswith("emostream-stream") for name, _ in seen)
    seen.clear()
    enc.embed(["alone"])  # one text: nothing to spread, no thread hop needed
    assert [n for _, n in seen] == [1]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to tell them apart")
def test_threads_stay_on_the_cores_the_process_is_given(tmp_path):
    """Under `taskset -c N` (or a cpuset) the encoder's threads stay on N: with its own default
    thread count ONNX Runtime would start a thread per physical core, each pinned to its core."""
    manifest = write_manifest(tmp_path)
    core = min(os.sched_getaffinity(0))
    code = (
        "import glob, sys\n"
        "from emostream.models.encoder import Encoder\n"
        "from emostream.models.manifest import load_manifest\n"
        "enc = Encoder(load_manifest(sys.argv[1]).backbone)\n"
        "enc.embed(['one text', 'and another one'])\n"
        "print(enc.streams, enc.threads)\n"
        "for f in glob.glob('/proc/self/task/*/status'):\n"
        "    print([l.split()[1] for l in open(f) if l.startswith('Cpus_allowed_list')][0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(manifest)], capture_output=True, text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {core})).stdout.split("\n")
    assert out[0] == "1 1"  # auto on one core: one single-threaded call
    assert set(filter(None, out[1:])) == {str(core)}
