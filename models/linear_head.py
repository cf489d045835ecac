"""Train a linear (logistic-regression) emotion head over a frozen backbone and export it.

Training tooling only: the worker never imports this module. scikit-learn and onnx are the
``train`` extra and are imported inside the functions that need them.

The exported head keeps the seed card's layout (see :mod:`emostream.models.heads`): one float32
input ``logits`` [n, dim], one output per label named after it, each [n, 2] = [1 - p, p] with
p = sigmoid(x·W + b). Next to it go ``labels.json``, ``thresholds.json`` (per-label thresholds
tuned for F1 on the dev split) and ``metrics.json``.

    python -m emostream.models.linear_head --train train.tsv --dev dev.tsv --out models/heads/go_emotions_lr
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

#: GoEmotions label names in id order (the dataset's labels.txt), used when no labels.txt is
#: found beside the training file.
GO_EMOTIONS_LABELS: tuple[str, ...] = (
    "admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion",
    "curiosity", "desire", "disappointment", "disapproval", "disgust", "embarrassment",
    "excitement", "fear", "gratitude", "grief", "joy", "love", "nervousness", "optimism",
    "pride", "realization", "relief", "remorse", "sadness", "surprise", "neutral",
)  # fmt: skip

DEFAULT_BACKBONE = "minilm"
DEFAULT_GRID = np.round(np.arange(0.02, 0.96, 0.01), 4)
DEFAULT_CACHE_DIR = Path(os.environ.get("EMOSTREAM_EMBED_CACHE", "/tmp/emostream-embeddings"))


# --------------------------------------------------------------------------------------- data


def read_goemotions(path: str | Path, n_labels: int = 28) -> tuple[list[str], np.ndarray]:
    """GoEmotions TSV (``text<TAB>ids,comma,separated<TAB>comment id``) → texts and a 0/1 matrix."""
    texts: list[str] = []
    rows: list[list[int]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise ValueError(f"{path}:{lineno}: expected text<TAB>labels[<TAB>id], got {line[:80]!r}")
            ids = [int(x) for x in parts[1].split(",") if x.strip()]
            bad = [i for i in ids if not 0 <= i < n_labels]
            if bad:
                raise ValueError(f"{path}:{lineno}: label ids {bad} outside 0..{n_labels - 1}")
            texts.append(parts[0])
            rows.append(ids)
    y = np.zeros((len(texts), n_labels), dtype=np.uint8)
    for i, ids in enumerate(rows):
        y[i, ids] = 1
    return texts, y


def read_labels(train_tsv: str | Path, n_labels: int = 28) -> list[str]:
    """``labels.txt`` beside the training file, else the GoEmotions names."""
    path = Path(train_tsv).with_name("labels.txt")
    if path.is_file():
        labels = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    else:
        labels = list(GO_EMOTIONS_LABELS)
    if len(labels) != n_labels:
        raise ValueError(f"{len(labels)} label names for {n_labels} labels")
    return labels


# ------------------------------------------------------------------------------------ metrics


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros(np.shape(denom), dtype=np.float64), where=denom > 0)


def tune_thresholds(
    probs: np.ndarray, y: np.ndarray, grid: np.ndarray = DEFAULT_GRID
) -> np.ndarray:
    """Per label, the grid threshold (predict ``p >= t``) with the highest F1 on (probs, y).

    Ties go to the lowest such threshold; a label with no positives gets 0.5.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    grid = np.asarray(grid, dtype=np.float64)
    if probs.shape != y.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and y {y.shape} must be the same [n, L] shape")
    out = np.full(probs.shape[1], 0.5)
    for j in range(probs.shape[1]):  # vectorised over rows × grid; one label at a time bounds memory
        pos = y[:, j]
        n_pos = int(pos.sum())
        if n_pos == 0:
            continue
        pred = probs[:, j, None] >= grid[None, :]  # [n, G]
        tp = (pred & pos[:, None]).sum(axis=0)
        n_pred = pred.sum(axis=0)
        f1 = _f1(tp, n_pred - tp, n_pos - tp)
        out[j] = grid[int(np.argmax(f1))]
    return out


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    return precision, recall, _f1(tp, fp, fn)


def f1_report(
    probs: np.ndarray,
    y: np.ndarray,
    thresholds: np.ndarray | float,
    labels: Sequence[str] | None = None,
) -> dict:
    """Per-label precision/recall/F1/support of ``probs >= thresholds``, with macro, weighted
    (by support) and micro averages. Undefined ratios count as 0, as scikit-learn's
    ``zero_division=0``; macro F1 is the mean of per-label F1s."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(probs) >= np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (y.shape[1],))[None, :]
    tp = (pred & y).sum(axis=0)
    fp = (pred & ~y).sum(axis=0)
    fn = (~pred & y).sum(axis=0)
    support = y.sum(axis=0)
    p, r, f = _prf(tp, fp, fn)
    names = list(labels) if labels is not None else [str(j) for j in range(y.shape[1])]
    total = support.sum()
    w = support / total if total else np.zeros(len(support))
    mp, mr, mf = _prf(tp.sum(), fp.sum(), fn.sum())
    return {
        "per_label": {
            names[j]: {
                "precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]), "support": int(support[j]),
            }
            for j in range(y.shape[1])
        },
        "macro": {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f.mean())},
        "weighted": {"precision": float(w @ p), "recall": float(w @ r), "f1": float(w @ f)},
        "micro": {"precision": float(mp), "recall": float(mr), "f1": float(mf)},
        "support": int(total),
    }


# ------------------------------------------------------------------------------------- export


def export_per_label_onnx(
    W: np.ndarray, b: np.ndarray, labels: Sequence[str], path: str | Path, opset: int = 17
) -> Path:
    """Write ``sigmoid(logits · W + b)`` as an ONNX head in the seed layout.

    Input ``logits`` float32 ['n', dim]; one output per label, named after it, float32 ['n', 2]
    = [1 - p, p]. Graph: MatMul → Add → Sigmoid → p; Sub(1, p) → q; both unsqueezed and concatenated
    to [n, L, 2]; one Gather per label on axis 1.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    W = np.asarray(W, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32).reshape(-1)
    labels = [str(x) for x in labels]
    if W.ndim != 2 or W.shape[1] != len(labels) or b.shape != (len(labels),):
        raise ValueError(f"W {W.shape}, b {b.shape} and {len(labels)} labels do not agree")
    if len(set(labels)) != len(labels):
        raise ValueError(f"label names must be unique: {labels}")
    internal = {"logits", "_W", "_b", "_one", "_axes2", "_z", "_zb", "_p", "_q", "_p3", "_q3", "_qp"}
    internal |= {f"_idx{j}" for j in range(len(labels))}
    clash = internal.intersection(labels)
    if clash:
        raise ValueError(f"label names clash with graph tensor names: {sorted(clash)}")

    inits = [
        numpy_helper.from_array(W, "_W"),
        numpy_helper.from_array(b, "_b"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "_one"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "_axes2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["logits", "_W"], ["_z"], name="matmul"),
        helper.make_node("Add", ["_z", "_b"], ["_zb"], name="bias"),
        helper.make_node("Sigmoid", ["_zb"], ["_p"], name="sigmoid"),
        helper.make_node("Sub", ["_one", "_p"], ["_q"], name="complement"),
        helper.make_node("Unsqueeze", ["_q", "_axes2"], ["_q3"], name="unsqueeze_q"),
        helper.make_node("Unsqueeze", ["_p", "_axes2"], ["_p3"], name="unsqueeze_p"),
        helper.make_node("Concat", ["_q3", "_p3"], ["_qp"], axis=2, name="pairs"),  # [n, L, 2]
    ]
    outputs = []
    for j, label in enumerate(labels):
        inits.append(numpy_helper.from_array(np.array(j, dtype=np.int64), f"_idx{j}"))
        nodes.append(helper.make_node("Gather", ["_qp", f"_idx{j}"], [label], axis=1, name=f"label_{j}"))
        outputs.append(helper.make_tensor_value_info(label, TensorProto.FLOAT, ["n", 2]))
    graph = helper.make_graph(
        nodes,
        "linear_per_label_head",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", W.shape[0]])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="emostream.models.linear_head",
    )
    model.ir_version = 8  # what opset 17 was released with; read by every onnxruntime >= 1.13
    helper.set_model_props(model, {"labels": json.dumps(labels)})
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------------------- training


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embedding_cache_path(spec, n_texts: int, source: str | Path, cache_dir: str | Path) -> Path:
    """Where :func:`embed_cached` keeps the embeddings of ``source``: keyed by the file's content
    and the backbone (name, version, weights file, pooling, normalisation, max length)."""
    source = Path(source)
    key = hashlib.sha256(
        json.dumps(
            [
                _sha256(source), n_texts, spec.name, spec.version, str(spec.onnx),
                spec.onnx.stat().st_size, spec.pooling, spec.normalize, spec.max_length, spec.output,
            ]
        ).encode()
    ).hexdigest()[:20]
    return Path(cache_dir) / f"{source.stem}-{spec.name}-{key}.npy"


def embed_cached(
    encoder, texts: Sequence[str], source: str | Path, cache_dir: str | Path | None = DEFAULT_CACHE_DIR
) -> np.ndarray:
    """``encoder.embed(texts)``, kept in ``cache_dir`` as .npy (see :func:`embedding_cache_path`)."""
    if cache_dir is None:
        return encoder.embed(list(texts)).embeddings
    path = embedding_cache_path(encoder.spec, len(texts), source, cache_dir)
    if path.is_file():
        emb = np.load(path)
        if emb.shape[0] == len(texts):
            log.info("embeddings for %s from cache %s", source, path)
            return emb
    t0 = time.perf_counter()
    emb = encoder.embed(list(texts)).embeddings
    log.info("embedded %d texts from %s in %.1fs", len(texts), source, time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, path)
    return emb


def fit_logistic(
    X: np.ndarray, y: np.ndarray, C: float, class_weight: str | None = None, max_iter: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest L2 logistic regression on standardised features, folded back so that
    ``sigmoid(X @ W + b)`` applies to the raw embeddings. Returns W [dim, L] float32, b [L]."""
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(X, dtype=np.float64)
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd[sd < 1e-8] = 1.0
    Xs = (X - mu) / sd
    W = np.zeros((X.shape[1], y.shape[1]))
    b = np.zeros(y.shape[1])
    for j in range(y.shape[1]):
        col = np.asarray(y[:, j]).astype(np.int64)
        n_pos = int(col.sum())
        if n_pos in (0, len(col)):  # one class only: a constant at the (smoothed) base rate
            rate = (n_pos + 0.5) / (len(col) + 1.0)
            b[j] = np.log(rate / (1 - rate))
            continue
        clf = LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter, solver="lbfgs")
        clf.fit(Xs, col)
        w = clf.coef_[0] / sd
        W[:, j] = w
        b[j] = clf.intercept_[0] - mu @ w
    return W.astype(np.float32), b.astype(np.float32)


def predict_proba(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    z = np.asarray(X, dtype=np.float64) @ W.astype(np.float64) + b.astype(np.float64)
    return 1.0 / (1.0 + np.exp(-z))


def shared_threshold(probs: np.ndarray, y: np.ndarray, grid: np.ndarray = DEFAULT_GRID) -> float:
    """The one grid threshold that maximises macro F1 over the labels that have positives."""
    y = np.asarray(y).astype(bool)
    has = y.any(axis=0)
    pred = np.asarray(probs, dtype=np.float64)[:, has, None] >= np.asarray(grid)[None, None, :]  # [n, L, G]
    pos = y[:, has, None]
    tp = (pred & pos).sum(axis=0)
    f1 = _f1(tp, pred.sum(axis=0) - tp, pos.sum(axis=0) - tp)  # [L, G]
    return float(grid[int(np.argmax(f1.mean(axis=0)))])


def transferable_thresholds(probs: np.ndarray, y: np.ndarray, grid: np.ndarray = DEFAULT_GRID, bags: int = 20,
                            shrink: float = 10.0, seed: int = 0) -> np.ndarray:
    """Per-label thresholds meant for unseen data rather than for the rows they were tuned on.

    A label's F1-best threshold on a few thousand rows is jagged (a rare label has a dozen
    positives), so it is averaged over ``bags`` bootstrap resamples, then pulled towards the one
    shared threshold in proportion to how few positives the label has (weight n / (n + shrink)).
    On the default model's dev probabilities, cross-fitted macro F1 (30 random halvings): 0.520
    with plain per-label thresholds, 0.525 bagged, 0.525 shrunk, 0.529 both.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y).astype(bool)
    rng = np.random.default_rng(seed)
    bagged = np.mean([tune_thresholds(probs[i], y[i], grid)
                      for i in (rng.integers(0, len(y), len(y)) for _ in range(max(1, bags)))], axis=0)
    shared = shared_threshold(probs, y, grid)
    n = y.sum(axis=0).astype(np.float64)
    w = n / (n + shrink) if shrink > 0 else np.ones_like(n)
    return np.where(n > 0, w * bagged + (1 - w) * shared, shared)


def crossfit_macro_f1(probs: np.ndarray, y: np.ndarray, grid: np.ndarray = DEFAULT_GRID, seed: int = 0,
                      splits: int = 1, tuner=tune_thresholds) -> float:
    """Macro F1 with thresholds tuned (``tuner``) on one half of dev and scored on the other
    (both ways, pooled): a less optimistic figure than tuning and scoring on the same rows. With
    ``splits`` > 1, the mean over that many random halvings (seeds ``seed``, ``seed + 1``, …):
    one halving swings by ±0.006 on GoEmotions dev."""
    y = np.asarray(y)
    scores = []
    for k in range(splits):
        idx = np.random.default_rng(seed + k).permutation(len(y))
        halves = np.array_split(idx, 2)
        pred = np.zeros_like(y, dtype=bool)
        for a, other in ((halves[0], halves[1]), (halves[1], halves[0])):
            thr = tuner(probs[other], y[other], grid)
            pred[a] = probs[a] >= thr[None, :]
        scores.append(f1_report(pred.astype(np.float64), y, 0.5)["macro"]["f1"])
    return float(np.mean(scores))


def train(
    train_tsv: str | Path,
    dev_tsv: str | Path,
    out_dir: str | Path,
    model: str = DEFAULT_BACKBONE,
    C: float | Sequence[float] = (0.003, 0.01, 0.03),
    class_weights: Sequence[str | None] = (None, "balanced"),
    labels: Sequence[str] | None = None,
    grid: np.ndarray = DEFAULT_GRID,
    max_iter: int = 500,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    threads: int = 0,
    head_version: str = "lr-1",
) -> dict:
    """Fit a logistic-regression head on ``train_tsv`` over ``model``'s backbone, choose
    (C, class_weight) by dev macro F1 with per-label thresholds tuned on dev, and write
    ``head.onnx``, ``labels.json``, ``thresholds.json`` and ``metrics.json`` to ``out_dir``.
    Returns the metrics dict."""
    from .encoder import Encoder
    from .manifest import find_manifest

    t_start = time.perf_counter()
    train_tsv, dev_tsv, out_dir = Path(train_tsv), Path(dev_tsv), Path(out_dir)
    labels = list(labels) if labels is not None else read_labels(train_tsv)
    n_labels = len(labels)
    train_texts, y_train = read_goemotions(train_tsv, n_labels)
    dev_texts, y_dev = read_goemotions(dev_tsv, n_labels)

    backbone = find_manifest(model).backbone
    encoder = Encoder(backbone, threads=threads)
    cached = cache_dir is not None and all(
        embedding_cache_path(backbone, n, src, cache_dir).is_file()
        for n, src in ((len(train_texts), train_tsv), (len(dev_texts), dev_tsv))
    )
    t0 = time.perf_counter()
    X_train = embed_cached(encoder, train_texts, train_tsv, cache_dir)
    X_dev = embed_cached(encoder, dev_texts, dev_tsv, cache_dir)
    t_embed = time.perf_counter() - t0

    Cs = [float(C)] if np.isscalar(C) else [float(c) for c in C]
    search = []
    best = None
    t0 = time.perf_counter()
    for cw in class_weights:
        for c in Cs:
            t1 = time.perf_counter()
            W, b = fit_logistic(X_train, y_train, c, cw, max_iter)
            probs = predict_proba(X_dev, W, b)
            thr = tune_thresholds(probs, y_dev, grid)
            tuned = f1_report(probs, y_dev, thr)["macro"]["f1"]
            fixed = f1_report(probs, y_dev, 0.5)["macro"]["f1"]
            row = {"C": c, "class_weight": cw, "dev_macro_f1_tuned": round(tuned, 4),
                   "dev_macro_f1_at_0.5": round(fixed, 4), "fit_s": round(time.perf_counter() - t1, 1)}
            log.info("C=%g class_weight=%s: dev macro F1 %.4f tuned, %.4f at 0.5 (%.1fs)",
                     c, cw, tuned, fixed, row["fit_s"])
            search.append(row)
            if best is None or tuned > best[0]:
                best = (tuned, c, cw, W, b, probs, thr)
    t_fit = time.perf_counter() - t0
    assert best is not None, "empty hyperparameter grid"
    _, c, cw, W, b, probs, thr = best
    thr = np.round(thr, 4)

    out_dir.mkdir(parents=True, exist_ok=True)
    export_per_label_onnx(W, b, labels, out_dir / "head.onnx")
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    (out_dir / "thresholds.json").write_text(
        json.dumps({l: float(t) for l, t in zip(labels, thr)}, indent=1) + "\n"
    )
    tuned = f1_report(probs, y_dev, thr, labels)
    fixed = f1_report(probs, y_dev, 0.5, labels)
    summary = lambda rep: {  # noqa: E731
        avg: {k: round(v, 4) for k, v in rep[avg].items()} for avg in ("macro", "weighted", "micro")
    }
    metrics = {
        "head": {"kind": "logistic_regression_ovr", "version": head_version, "labels": n_labels},
        "backbone": {"name": backbone.name, "version": backbone.version, "manifest": model},
        "data": {"train": train_tsv.name, "dev": dev_tsv.name, "n_train": len(train_texts), "n_dev": len(dev_texts)},
        "hyperparameters": {
            "C": c, "class_weight": cw, "penalty": "l2", "solver": "lbfgs", "max_iter": max_iter,
            "standardized_features": True,
            "threshold_grid": [float(grid.min()), float(grid.max()), len(grid)],
        },
        "dev_tuned_thresholds": summary(tuned),
        "dev_at_0.5": summary(fixed),
        # Thresholds tuned on half of dev, scored on the other half: the tuned figures above are
        # measured on the rows the thresholds were chosen on, so they flatter a little.
        "dev_macro_f1_tuned_crossfit": round(crossfit_macro_f1(probs, y_dev, grid), 4),
        "dev_per_label_tuned": {
            l: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}
            | {"threshold": float(t)}
            for (l, d), t in zip(tuned["per_label"].items(), thr)
        },
        "search": search,
        "timing_s": {
            "embed": round(t_embed, 1), "embeddings_from_cache": cached, "fit_and_select": round(t_fit, 1),
            "total": round(time.perf_counter() - t_start, 1),
        },
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m emostream.models.linear_head",
        description="Train a logistic-regression emotion head over a frozen backbone; export it as ONNX.",
    )
    ap.add_argument("--train", required=True, type=Path, help="GoEmotions-style TSV to fit on")
    ap.add_argument("--dev", required=True, type=Path, help="TSV to select hyperparameters and tune thresholds on")
    ap.add_argument("--out", required=True, type=Path, help="directory for head.onnx, labels.json, thresholds.json, metrics.json")
    ap.add_argument("--model", default=DEFAULT_BACKBONE, help="manifest (name or path) whose backbone embeds the texts")
    ap.add_argument("--labels", type=Path, help="label names, one a line (default: labels.txt beside --train)")
    ap.add_argument("--C", type=float, nargs="+", default=[0.003, 0.01, 0.03], help="inverse L2 strengths to try")
    ap.add_argument("--class-weight", nargs="+", default=["none", "balanced"], choices=["none", "balanced"])
    ap.add_argument("--max-iter", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads for embedding (0: all)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where embeddings are cached")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    labels = None
    if args.labels:
        labels = [x.strip() for x in args.labels.read_text(encoding="utf-8").splitlines() if x.strip()]
    metrics = train(
        args.train, args.dev, args.out, model=args.model, C=args.C,
        class_weights=[None if x == "none" else x for x in args.class_weight],
        labels=labels, max_iter=args.max_iter, threads=args.threads,
        cache_dir=None if args.no_cache else args.cache_dir,
    )
    hp = metrics["hyperparameters"]
    print(
        f"wrote {args.out}: C={hp['C']} class_weight={hp['class_weight']} "
        f"dev macro F1 {metrics['dev_tuned_thresholds']['macro']['f1']:.4f} tuned "
        f"({metrics['dev_macro_f1_tuned_crossfit']:.4f} cross-fitted), "
        f"{metrics['dev_at_0.5']['macro']['f1']:.4f} at 0.5; {metrics['timing_s']['total']}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
