"""A bounded LRU of recent model results, keyed by the BLAKE2b digest of the text.

Duplicate posts and reposts are common in social streams; a hit skips tokenization and the
backbone for that record. An entry keeps what the pipeline needs to build the output exactly as
the first computation did — the embedding row and, per head, the probability row, the
selected-label row and the top index — so a hit yields byte-identical scores and labels.

Bounded by entry count: with MiniLM (384 floats) and one 28-label head an entry is about 2 KB,
so 10 000 entries cost roughly 20 MB. Thread-safe: the worker infers up to ``batches_in_flight``
batches at once, each on its own thread.

:class:`CachedModel` wraps a model with the cache: the pipeline calls it like the model itself and
reads each batch's hits and misses from its prediction.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from emostream.models.heads import HeadOutput
from emostream.models.model import Prediction

DIGEST_SIZE = 16  # 128-bit keys: collisions are not a practical concern at cache sizes


def text_key(text: str) -> bytes:
    """The cache key of a text: BLAKE2b-128 of its UTF-8 bytes (lone surrogates kept)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=DIGEST_SIZE).digest()


@dataclass(frozen=True, slots=True)
class HeadRow:
    probs: np.ndarray  # [L] float32
    selected: np.ndarray  # [L] bool
    top: int


@dataclass(frozen=True, slots=True)
class CachedResult:
    embedding: np.ndarray  # [dim] float32
    heads: dict[str, HeadRow]  # head name → its row, in the model's head order


class ResultCache:
    """LRU of ``text_key → CachedResult`` holding at most ``max_entries`` entries; its counters run
    over its whole life (``stats``)."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._data: OrderedDict[bytes, CachedResult] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: bytes) -> bool:
        return key in self._data

    def get(self, key: bytes) -> CachedResult | None:
        """The entry (now most recent) or None; counts a hit or a miss."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: bytes, entry: CachedResult) -> None:
        """Insert or refresh an entry, evicting the least recently used beyond the bound."""
        with self._lock:
            self._data[key] = entry
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        """Drop every entry (after a model reload); counters keep running."""
        with self._lock:
            self._data.clear()

    def count_hit(self) -> None:
        """A record served without its own inference for another reason (a duplicate in the same batch)."""
        with self._lock:
            self.hits += 1

    def stats(self) -> dict:
        looked_up = self.hits + self.misses
        return {
            "enabled": True,
            "max_entries": self.max_entries,
            "entries": len(self._data),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "hit_rate": self.hits / looked_up if looked_up else 0.0,
        }


def disabled_stats() -> dict:
    return {"enabled": False, "max_entries": 0, "entries": 0, "hits": 0, "misses": 0, "evictions": 0,
            "hit_rate": 0.0}


@dataclass(frozen=True)
class CachedPrediction(Prediction):
    """A prediction served partly or wholly from the cache, with this call's lookups counted."""

    cache_hits: int = 0  # texts answered without their own inference (cached, or repeated in the call)
    cache_misses: int = 0  # distinct texts the model computed


class CachedModel:
    """A model behind a :class:`ResultCache`: ``predict`` runs the model on the texts it has not
    seen (each distinct text once) and takes the rest from the cache.

    Rows served from the cache are the stored rows of the first computation, so a hit's output
    equals what that text produced when it missed. One cache belongs to one model: a reload builds
    a new wrapper over a cleared cache.
    """

    def __init__(self, model, cache: ResultCache):
        self.model = model
        self.cache = cache
        self.info = model.info
        self.heads = model.heads

    def predict(self, texts: Sequence[str], max_tokens: int = 4096) -> CachedPrediction:
        cache = self.cache
        keys = [text_key(t) for t in texts]
        found: list[CachedResult | None] = []
        miss_row: dict[bytes, int] = {}  # key → row in the model's output
        miss_texts: list[str] = []
        for key, text in zip(keys, texts):
            if key in miss_row:  # the same text earlier in this call: computed once
                cache.count_hit()
                found.append(None)
                continue
            entry = cache.get(key)
            found.append(entry)
            if entry is None:
                miss_row[key] = len(miss_texts)
                miss_texts.append(text)
        hits, misses = len(texts) - len(miss_texts), len(miss_texts)
        pred = None
        if miss_texts:
            pred = self.model.predict(miss_texts, max_tokens=max_tokens)
            for key, j in miss_row.items():
                cache.put(key, CachedResult(
                    pred.embeddings[j].copy(),
                    {name: HeadRow(out.probs[j].copy(), out.selected[j].copy(), int(out.top[j]))
                     for name, out in pred.heads.items()},
                ))
            if len(miss_texts) == len(texts):
                return CachedPrediction(pred.embeddings, pred.heads, pred.tokens, pred.padded_tokens, 0, misses)
        # Assemble rows in input order: from the model's output for misses, the cache for hits.
        hit = [entry is not None for entry in found]
        src = [found[i] if hit[i] else miss_row[keys[i]] for i in range(len(texts))]
        embeddings = np.stack([s.embedding if h else pred.embeddings[s] for s, h in zip(src, hit)])
        heads: dict[str, HeadOutput] = {}
        for head in self.heads:
            name = head.name
            rows = [s.heads[name] if h else None for s, h in zip(src, hit)]
            out = pred.heads[name] if pred is not None else None
            heads[name] = HeadOutput(
                np.stack([r.probs if h else out.probs[s] for r, s, h in zip(rows, src, hit)]),
                np.stack([r.selected if h else out.selected[s] for r, s, h in zip(rows, src, hit)]),
                np.array([r.top if h else int(out.top[s]) for r, s, h in zip(rows, src, hit)], dtype=np.int64),
            )
        tokens = pred.tokens if pred is not None else 0
        padded = pred.padded_tokens if pred is not None else 0
        return CachedPrediction(embeddings, heads, tokens, padded, hits, misses)
