"""Score a model's head on a labelled GoEmotions-style TSV (``emostream eval``).

Gold labels come from the TSV's GoEmotions ids; for a head whose labels are the Ekman groups or
the sentiment classes they are derived with the dataset's mappings (sentiment by the majority
rule of :mod:`emostream.models.training.data`). Multi-label heads are scored at the head's own
thresholds (its ``thresholds.json``) and at a fixed 0.5; a single-label head by its argmax
(``threshold`` is then reported as null) and, under ``fixed_0_5``, by ``p >= 0.5``.

A *check set* (``--format check``) is the other kind of labelled data: a TSV with a header
``id, language, <head>..., text`` — hand-written sentences, one clear label per head column, the
same sentence in several languages under one id (``models/eval/multilingual_check.tsv``). It is
scored per language by the top label (argmax) of every head that has a column, and by how often a
translation's top label is the one its English sentence gets (consistency, gold labels aside).

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
             data_dir: str | Path | None = None, cache_dir: str | None = None) -> dict:
    """Run ``model`` (manifest name or path; ``emostream eval`` passes the worker's model setting) on
    ``data`` and score ``head``. Mapping files are looked for beside ``data`` (else ``data_dir``,
    else built in). ``cache_dir``: where an assembled backbone is built on first load."""
    from .model import EmotionModel

    data = Path(data)
    data_dir = Path(data_dir) if data_dir else data.parent
    em = EmotionModel.load(model, threads=threads, cache_dir=cache_dir)
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


CHECK_FIXED = ("id", "language", "text")


def read_check(path: str | Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of a check-set TSV (header ``id  language  <head>...  text``) and its head columns."""
    lines = [l.rstrip("\r\n") for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
    if not lines:
        raise EvalError(f"{path}: empty")
    header = lines[0].split("\t")
    if not set(CHECK_FIXED) <= set(header):
        raise EvalError(f"{path}: a check set needs a header with {', '.join(CHECK_FIXED)} and one column per head, "
                        f"got {header}")
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        cells = line.split("\t")
        if len(cells) != len(header):
            raise EvalError(f"{path}:{lineno}: {len(cells)} columns, the header has {len(header)}")
        rows.append(dict(zip(header, cells)))
    return rows, [c for c in header if c not in CHECK_FIXED]


def evaluate_check(data: str | Path, model: str, threads: int = 0, cache_dir: str | None = None) -> dict:
    """Top-label accuracy per language (and over all languages but English) of every head the
    check set has a column for; also each row's prediction, for reading the misses."""
    from .model import EmotionModel

    rows, columns = read_check(data)
    em = EmotionModel.load(model, threads=threads, cache_dir=cache_dir)
    heads = [h for h in em.heads if h.name in columns]
    if not heads:
        raise EvalError(f"model {em.manifest.name!r} has none of the check set's heads {columns}")
    for h in heads:
        unknown = sorted({r[h.name] for r in rows} - set(h.labels))
        if unknown:
            raise EvalError(f"{data}: {h.name} labels {unknown} are not labels of the model's head ({h.labels})")
    enc = em.encoder.embed([r["text"] for r in rows])
    top = {h.name: [h.labels[i] for i in h.from_encoded(enc).top] for h in heads}
    languages = list(dict.fromkeys(r["language"] for r in rows))
    groups = {lang: [i for i, r in enumerate(rows) if r["language"] == lang] for lang in languages}
    groups["all but en"] = [i for i, r in enumerate(rows) if r["language"] != "en"]

    english = {r["id"]: i for i, r in enumerate(rows) if r["language"] == "en"}

    def accuracy(name: str, idx: list[int]) -> float | None:
        return round(sum(top[name][i] == rows[i][name] for i in idx) / len(idx), 4) if idx else None

    def same_as_english(name: str, idx: list[int]) -> float | None:
        """How often a translation gets the top label its English sentence gets (labels aside)."""
        pairs = [(i, english[rows[i]["id"]]) for i in idx if rows[i]["id"] in english and rows[i]["language"] != "en"]
        return round(sum(top[name][i] == top[name][j] for i, j in pairs) / len(pairs), 4) if pairs else None

    return {
        "model": em.manifest.name,
        "data": str(data),
        "heads": [h.name for h in heads],
        "by_language": {g: {"n": len(idx), **{h.name: accuracy(h.name, idx) for h in heads},
                            **{f"{h.name}_same_as_en": same_as_english(h.name, idx) for h in heads}}
                        for g, idx in groups.items()},
        "rows": [{"id": r["id"], "language": r["language"], "text": r["text"],
                  **{h.name: {"gold": r[h.name], "top": top[h.name][i]} for h in heads}} for i, r in enumerate(rows)],
    }


def format_check_table(rep: dict) -> str:
    """Per-language top-label accuracy, one column per head."""
    cols = rep["heads"] + [f"{h}_same_as_en" for h in rep["heads"]]
    lines = [f"{rep['model']} on {rep['data']}: top-label accuracy, and how often a translation's top label "
             "is its English sentence's",
             f"{'language':<12}{'n':>5}" + "".join(f"{c:>{len(c) + 2}}" for c in cols)]
    for lang, d in rep["by_language"].items():
        lines.append(f"{lang:<12}{d['n']:>5}" + "".join(f"{d[c]:>{len(c) + 2}.3f}" if d[c] is not None
                                                       else f"{'-':>{len(c) + 2}}" for c in cols))
    return "\n".join(lines)


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
