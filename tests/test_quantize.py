"""The batch-invariant INT8 route (emostream.models.training.quantize) on a small graph built here.

The graph has what the route treats differently in a BERT layer: an embedding Gather, a
LayerNorm output feeding two MatMuls (static scale, bias in the product), a GELU output
(per-row unsigned code) and a plain input (per-row symmetric code). Needs onnx and onnxruntime
only; the real encoder goes through the same code in tests/test_training.py (torch).
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from emostream.models.training.quantize import (MS_DOMAIN, QuantizeError, activation_maxima, dequantize,
                                                quantize_embeddings, quantize_int8)

VOCAB, DIM, HIDDEN = 200, 16, 48


def _graph(seed: int = 0) -> onnx.ModelProto:
    """ids → Gather → LayerNorm → (MatMul+b → GELU → MatMul+b) + (MatMul+b → Tanh → MatMul+b)."""
    rs = np.random.RandomState(seed)
    w = lambda *s: (rs.randn(*s) * 0.3).astype(np.float32)  # noqa: E731
    table = w(VOCAB, DIM)
    table[:, 3] *= 12  # an outlier channel, as LayerNorm outputs of BERT have
    inits = {"table": table, "gamma": 1 + w(DIM), "beta": w(DIM), "W1": w(DIM, HIDDEN), "b1": w(HIDDEN),
             "W2": w(HIDDEN, DIM), "b2": w(DIM), "W3": w(DIM, DIM), "b3": w(DIM), "W4": w(DIM, DIM), "b4": w(DIM),
             "sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32),
             "half": np.array(.5, np.float32)}
    inits["gamma"][3] = 8.0
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("LayerNormalization", ["emb", "gamma", "beta"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "W1"], ["h1"]), helper.make_node("Add", ["b1", "h1"], ["h1b"]),
        helper.make_node("Div", ["h1b", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h1b", "e1"], ["g0"]),
        helper.make_node("Mul", ["g0", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "W2"], ["h2"]), helper.make_node("Add", ["h2", "b2"], ["y1"]),
        helper.make_node("MatMul", ["ln", "W3"], ["h3"]), helper.make_node("Add", ["h3", "b3"], ["h3b"]),
        helper.make_node("Tanh", ["h3b"], ["t"]),
        helper.make_node("MatMul", ["t", "W4"], ["h4"]), helper.make_node("Add", ["h4", "b4"], ["y2"]),
        helper.make_node("Add", ["y1", "y2"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes, "small_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", DIM])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(n: int, seed: int = 1):
    rs = np.random.RandomState(seed)
    for _ in range(n):
        ids = rs.randint(1, VOCAB, size=(1, rs.randint(3, 12)))
        yield {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _run(model: onnx.ModelProto, ids: np.ndarray, optimise: bool = True) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)})[0]


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    """(fp32 model, INT8 model) — embeddings quantised first, then calibrated, as quantize_backbone does."""
    d = tmp_path_factory.mktemp("q")
    fp32 = _graph()
    onnx.save(fp32, str(d / "fp32.onnx"))
    quantize_embeddings(d / "fp32.onnx", d / "emb.onnx")
    emb = onnx.load(str(d / "emb.onnx"))
    return fp32, quantize_int8(emb, activation_maxima(emb, _feeds(200)))


def test_each_input_gets_its_kind_of_scale(int8):
    _, q = int8
    ops = [n for n in q.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(ops) == 4 and all(n.domain == MS_DOMAIN for n in ops)
    assert not any(n.op_type == "MatMul" for n in q.graph.node)  # every weight MatMul is INT8
    # the two LayerNorm-fed products carry their bias (constant A scale); the per-row ones do not
    assert sorted(len(n.input) for n in ops) == [6, 6, 7, 7]
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) == 3  # one quantiser per distinct input
    zero_points = {int(numpy_helper.to_array(i)) for i in q.graph.initializer if i.data_type == TensorProto.UINT8
                   and not i.dims}
    assert zero_points == {24, 128}  # GELU output: unsigned code with zero point 24; the others symmetric


def test_a_row_gives_the_same_result_whatever_shares_its_batch(int8):
    _, q = int8
    rs = np.random.RandomState(7)
    rows = [rs.randint(1, VOCAB, size=rs.randint(2, 15)) for _ in range(12)]
    alone = [_run(q, r[None, :])[0] for r in rows]
    for trial in range(6):
        pick = rs.choice(len(rows), size=rs.randint(2, len(rows)), replace=False)
        width = max(len(rows[i]) for i in pick) + rs.randint(0, 5)  # extra padding too
        ids = np.zeros((len(pick), width), np.int64)
        for j, i in enumerate(pick):
            ids[j, :len(rows[i])] = rows[i]
        out = _run(q, ids)
        for j, i in enumerate(pick):
            np.testing.assert_array_equal(out[j, :len(rows[i])], alone[i])  # bit for bit


def test_int8_is_as_close_to_fp32_as_quantize_dynamic(int8, tmp_path):
    """On the same graph, no worse than the per-tensor dynamic INT8 it replaces (by 10 %)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, q = int8
    onnx.save(fp32, str(tmp_path / "fp32.onnx"))
    quantize_dynamic(str(tmp_path / "fp32.onnx"), str(tmp_path / "dyn.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8)
    ids = np.random.RandomState(3).randint(1, VOCAB, size=(8, 10))
    ref = _run(fp32, ids)
    err = lambda m: np.linalg.norm(_run(m, ids) - ref) / np.linalg.norm(ref)  # noqa: E731
    assert err(q) < 1.1 * err(onnx.load(str(tmp_path / "dyn.onnx")))
    assert err(q) < 0.05


def test_onnxruntime_graph_optimisations_leave_the_results(int8):
    """Catches a fusion that changes the maths (ORT 1.32 folds a bias Add into MatMulIntegerToFloat
    and scales it by a per-row A scale when it builds the op itself; the route writes the op)."""
    _, q = int8
    ids = np.random.RandomState(4).randint(1, VOCAB, size=(5, 9))
    np.testing.assert_allclose(_run(q, ids), _run(q, ids, optimise=False), atol=2e-3)


def test_per_row_product_matches_numpy():
    """One MatMul + bias on a plain input: the per-row code as written down in quantize_int8's docstring."""
    rs = np.random.RandomState(0)
    W, bias = rs.randn(DIM, 8).astype(np.float32), rs.randn(8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("MatMul", ["t", "W"], ["m"]),
         helper.make_node("Add", ["m", "b"], ["y"])], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    q = quantize_int8(model, None, alpha=None, layernorm="per_row")
    x = rs.randn(3, 5, DIM).astype(np.float32) * rs.rand(3, 5, 1).astype(np.float32) * 4
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    t = np.tanh(x).reshape(-1, DIM)
    r = np.abs(t).max(1, keepdims=True) / 127
    ws = np.abs(W).max(0) / 127
    acc = np.clip(np.round(t / r), -128, 127) @ np.round(W / ws)
    np.testing.assert_allclose(got.reshape(-1, 8), acc * r * ws + bias, rtol=1e-5, atol=1e-5)


def test_static_scales_need_calibration():
    with pytest.raises(QuantizeError, match="calibration"):
        quantize_int8(_graph(), None)


def test_dequantize_inverts_quantize_dynamic(tmp_path):
    """dequantize(quantize_dynamic(f)) holds the INT8 weights in fp32: quantising it again gives
    the same weights back, and its outputs stay close to f's."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(_graph(), str(tmp_path / "fp32.onnx"))
    quantize_dynamic(str(tmp_path / "fp32.onnx"), str(tmp_path / "q.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8)
    q = onnx.load(str(tmp_path / "q.onnx"))
    deq = dequantize(q)
    left = {"MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear"}
    assert {n.op_type for n in deq.graph.node}.isdisjoint(left)
    onnx.save(deq, str(tmp_path / "deq.onnx"))
    quantize_dynamic(str(tmp_path / "deq.onnx"), str(tmp_path / "q2.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8)
    before = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("_quantized")}
    after = {i.name.replace("_dequantized", ""): numpy_helper.to_array(i)
             for i in onnx.load(str(tmp_path / "q2.onnx")).graph.initializer if i.name.endswith("_quantized")}
    assert before.keys() == after.keys() and len(before) == 5  # 4 weights + the embedding table
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    ids = np.random.RandomState(5).randint(1, VOCAB, size=(4, 7))
    ref = _run(_graph(), ids)
    assert np.linalg.norm(_run(deq, ids) - ref) / np.linalg.norm(ref) < 0.02  # weight rounding only


def test_dequantize_refuses_what_it_does_not_know():
    q = _graph()
    q.graph.node.append(helper.make_node("DynamicQuantizeLinear", ["emb"], ["a", "b", "c"]))
    q.graph.node.append(helper.make_node("MatMulInteger", ["a", "W1", "c"], ["z"]))
    q.graph.output.append(helper.make_tensor_value_info("z", TensorProto.INT32, None))
    with pytest.raises(QuantizeError):
        dequantize(q)
