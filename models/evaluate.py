"""Score a model's head on a labelled GoEmotions-style TSV (``emostream eval``).

Gold labels come from the TSV's GoEmotions ids; for a head whose labels are the Ekman groups or
the sentiment classes they are derived with the dataset's mappings (sentiment by the majority
rule of :mod:`emostream.models.training.data`). Multi-label heads are scored at the head's own
thresholds (its ``thresholds.json``) and at a fixed 0.5; a single-label head by its argmax
(``threshold`` is then reported as null) and, under ``fixed_0_5``, by ``p >= 0.5``.

Needs no torch: numpy, onnxruntime and (for ``--plot``) matplotlib.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .linear_head import f1_report, read_goemotions
from .training.data import (EKMAN_LABELS, SENTIMENT_LABELS, ekman_targets, load_label_sets,
                            sentiment_targets)


class EvalError(ValueError):
    """The head or the data cannot be evaluated."""


def gold_labels(head_labels: Sequence[str], y: np.ndarray, data_dir: Path) -> np.ndarray:
    """[n, len(head_labels)] 0/1 gold matrix for a head, columns in the head's label order."""
    go, ek_M, se_M = load_label_sets(data_dir)
    wanted = list(head_labels)
    for names, Y in (
        (go, lambda: y),
        (list(EKMAN_LABELS), lambda: ekman_targets(y, ek_M)),
        (list(SENTIMENT_LABELS), lambda: np.eye(len(SENTIMENT_LABELS), dtype=np.uint8)[sentiment_targets(y, se_M)]),
    ):
        if set(wanted) == set(names) and len(wanted) == len(names):
            full = Y()
            return full[:, [names.index(l) for l in wanted]]
    raise EvalError(f"no gold labels for a head with labels {wanted[:6]}...: "
                    "expected the GoEmotions labels, the Ekman groups or the sentiment classes")


def _rounded(d: dict) -> dict:
    return {k: round(float(v), 4) for k, v in d.items()}


def report(probs: np.ndarray, gold: np.ndarray, labels: Sequence[str], thresholds: np.ndarray,
           single_label: bool, head: str) -> dict:
    """The ``emostream eval --json`` document for one head."""
    if single_label:
        pred = np.zeros_like(probs)
        pred[np.arange(len(probs)), probs.argmax(axis=1)] = 1.0
        main = f1_report(pred, gold, 0.5, labels)
        thr: list = [None] * len(labels)
    else:
        main = f1_report(probs, gold, thresholds, labels)
        thr = [round(float(t), 4) for t in thresholds]
    fixed = f1_report(probs, gold, 0.5, labels)
    return {
        "head": head,
        "n": int(len(gold)),
        "macro": _rounded(main["macro"]),
        "weighted": _rounded(main["weighted"]),
        "fixed_0_5": {"macro": _rounded(fixed["macro"])},
        "per_label": {
            l: {"f1": round(d["f1"], 4), "precision": round(d["precision"], 4), "recall": round(d["recall"], 4),
                "support": d["support"], "threshold": t}
            for (l, d), t in zip(main["per_label"].items(), thr)
        },
    }


def evaluate(data: str | Path, model: str, head: str = "go_emotions", threads: int = 0,
             data_dir: str | Path | None = None) -> dict:
    """Run ``model`` (manifest name or path; ``emostream eval`` passes the worker's model setting) on
    ``data`` and score ``head``. Mapping files are looked for beside ``data`` (else ``data_dir``,
    else built in)."""
    from .model import EmotionModel

    data = Path(data)
    data_dir = Path(data_dir) if data_dir else data.parent
    em = EmotionModel.load(model, threads=threads)
    heads = {h.name: h for h in em.heads}
    if head not in heads:
        raise EvalError(f"model {em.manifest.name!r} has no head {head!r} (has {sorted(heads)})")
    h = heads[head]
    go_labels, _, _ = load_label_sets(data_dir)
    texts, y = read_goemotions(data, len(go_labels))
    if not texts:
        raise EvalError(f"{data}: no rows")
    gold = gold_labels(h.labels, y, data_dir)
    probs = head_output(em, head, texts).probs
    return report(probs, gold, h.labels, h.thresholds, h.spec.kind == "single_label", head)


def head_output(em, head: str, texts: Sequence[str]):
    """What ``emostream eval`` scores: ``head``'s scores and labels for ``texts``, all in one call
    (the encoder cuts them into its length-sorted sub-batches)."""
    h = next(h for h in em.heads if h.name == head)
    return h.from_encoded(em.encoder.embed(texts))


def plot(rep: dict, path: str | Path) -> Path:
    """Per-label F1 bars (sorted), with the macro F1 as a line; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(rep["per_label"].items(), key=lambda kv: kv[1]["f1"], reverse=True)
    names = [k for k, _ in items]
    f1 = [v["f1"] for _, v in items]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 1.5), 4.0))
    ax.bar(range(len(names)), f1, color="#4c72b0")
    ax.axhline(rep["macro"]["f1"], color="#c44e52", ls="--", lw=1, label=f"macro F1 {rep['macro']['f1']:.3f}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(f"{rep['head']}: per-label F1 (n={rep['n']})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(rep: dict) -> str:
    """Plain-text table for the terminal."""
    w = max(len(l) for l in rep["per_label"]) + 2
    lines = [f"{rep['head']}: n={rep['n']}", f"{'label':<{w}}{'f1':>7}{'prec':>7}{'rec':>7}{'supp':>7}{'thr':>7}"]
    for l, d in rep["per_label"].items():
        t = "-" if d["threshold"] is None else f"{d['threshold']:.2f}"
        lines.append(f"{l:<{w}}{d['f1']:7.3f}{d['precision']:7.3f}{d['recall']:7.3f}{d['support']:7d}{t:>7}")
    for name, d in (("macro", rep["macro"]), ("weighted", rep["weighted"]), ("macro @0.5", rep["fixed_0_5"]["macro"])):
        lines.append(f"{name:<{w}}{d['f1']:7.3f}{d['precision']:7.3f}{d['recall']:7.3f}")
    return "\n".join(lines)


def dumps(rep: dict) -> str:
    return json.dumps(rep, indent=1)
