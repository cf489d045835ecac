"""Torch-free parts of fine-tuning: derived label sets and length-bucketed batches.

Derived heads (gold labels are computed from the 28 GoEmotions ids):

* ``ekman`` — 7 groups, multi-label: a group is on when any of its GoEmotions labels is
  (``ekman_mapping.json``: anger, disgust, fear, joy, sadness, surprise, neutral).
* ``sentiment`` — single label among positive / negative / ambiguous / neutral
  (``sentiment_mapping.json``). **Rule:** count the example's GoEmotions labels per sentiment
  group; the class is the group with the most labels; ties are broken
  negative > positive > ambiguous > neutral (an example with no label is neutral).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

EKMAN_LABELS: tuple[str, ...] = ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")
SENTIMENT_LABELS: tuple[str, ...] = ("positive", "negative", "ambiguous", "neutral")
#: Tie-break order of the sentiment rule (earlier wins).
SENTIMENT_PRIORITY: tuple[str, ...] = ("negative", "positive", "ambiguous", "neutral")

DATA_DIR = Path("/work/shared/data/go_emotions")

#: The dataset's ekman_mapping.json / sentiment_mapping.json, used when no such file lies beside
#: the data (e.g. tests/fixtures), so evaluation does not depend on where the data sits.
EKMAN_MAPPING: dict[str, list[str]] = {
    "anger": ["anger", "annoyance", "disapproval"],
    "disgust": ["disgust"],
    "fear": ["fear", "nervousness"],
    "joy": ["joy", "amusement", "approval", "excitement", "gratitude", "love", "optimism", "relief", "pride",
            "admiration", "desire", "caring"],
    "sadness": ["sadness", "disappointment", "embarrassment", "grief", "remorse"],
    "surprise": ["surprise", "realization", "confusion", "curiosity"],
    "neutral": ["neutral"],
}
SENTIMENT_MAPPING: dict[str, list[str]] = {
    "ambiguous": ["confusion", "curiosity", "realization", "surprise"],
    "negative": ["anger", "annoyance", "disappointment", "disapproval", "disgust", "embarrassment", "fear", "grief",
                 "nervousness", "remorse", "sadness"],
    "neutral": ["neutral"],
    "positive": ["admiration", "amusement", "approval", "caring", "desire", "excitement", "gratitude", "joy", "love",
                 "optimism", "pride", "relief"],
}


def read_mapping(path: str | Path) -> dict[str, list[str]]:
    return {str(k): [str(x) for x in v] for k, v in json.loads(Path(path).read_text()).items()}


def group_matrix(labels: Sequence[str], mapping: Mapping[str, Sequence[str]], groups: Sequence[str]) -> np.ndarray:
    """[len(labels), len(groups)] 0/1: GoEmotions label i belongs to group g."""
    index = {l: i for i, l in enumerate(labels)}
    M = np.zeros((len(labels), len(groups)), dtype=np.uint8)
    for g, name in enumerate(groups):
        for label in mapping.get(name, ()):
            if label not in index:
                raise ValueError(f"mapping group {name!r} names unknown label {label!r}")
            M[index[label], g] = 1
    missing = [labels[i] for i in np.flatnonzero(M.sum(axis=1) == 0)]
    if missing:
        raise ValueError(f"labels in no group: {missing}")
    return M


def ekman_targets(y: np.ndarray, M: np.ndarray) -> np.ndarray:
    """[n, 28] 0/1 → [n, 7] 0/1: a group is on when any of its labels is."""
    return ((np.asarray(y, dtype=np.int64) @ M.astype(np.int64)) > 0).astype(np.uint8)


def sentiment_targets(y: np.ndarray, M: np.ndarray, groups: Sequence[str] = SENTIMENT_LABELS) -> np.ndarray:
    """[n, 28] 0/1 → [n] class index into ``groups`` by the majority rule (module docstring)."""
    counts = np.asarray(y, dtype=np.int64) @ M.astype(np.int64)  # [n, G]
    # Rank groups by priority; argmax picks the first maximum, so order columns by priority.
    order = [list(groups).index(g) for g in SENTIMENT_PRIORITY]
    best = np.asarray(order)[np.argmax(counts[:, order], axis=1)]
    best[counts.sum(axis=1) == 0] = list(groups).index("neutral")
    return best.astype(np.int64)


def load_label_sets(data_dir: str | Path = DATA_DIR, labels: Sequence[str] | None = None):
    """(go labels, ekman matrix [28, 7], sentiment matrix [28, 4]) from ``data_dir``."""
    from ..linear_head import GO_EMOTIONS_LABELS

    data_dir = Path(data_dir)
    if labels is None:
        path = data_dir / "labels.txt"
        labels = [x.strip() for x in path.read_text().splitlines() if x.strip()] if path.is_file() \
            else list(GO_EMOTIONS_LABELS)
    ek_path, se_path = data_dir / "ekman_mapping.json", data_dir / "sentiment_mapping.json"
    ek = group_matrix(labels, read_mapping(ek_path) if ek_path.is_file() else EKMAN_MAPPING, EKMAN_LABELS)
    se = group_matrix(labels, read_mapping(se_path) if se_path.is_file() else SENTIMENT_MAPPING, SENTIMENT_LABELS)
    return list(labels), ek, se


def bucket_batches(lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                   pool: int = 50) -> list[list[int]]:
    """Index batches of similar length (less padding on CPU).

    Shuffled: indices are shuffled, cut into pools of ``pool * batch_size``, each pool sorted by
    length and cut into batches, and the batches shuffled. Not shuffled: sorted by length.
    Every index appears exactly once.
    """
    n = len(lengths)
    idx = list(range(n))
    if not shuffle:
        idx.sort(key=lambda i: lengths[i])
        return [idx[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = random.Random(seed)
    rng.shuffle(idx)
    batches: list[list[int]] = []
    span = max(1, pool) * batch_size
    for s in range(0, n, span):
        chunk = sorted(idx[s:s + span], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def pad_batch(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic padding: (input_ids, attention_mask) int64 [b, longest]."""
    width = max(len(x) for x in ids)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask


def iter_chunks(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]
