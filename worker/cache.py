"""A bounded LRU of recent model results, keyed by the BLAKE2b digest of the text.

Duplicate posts and reposts are common in social streams; a hit skips tokenization and the
backbone for that record. An entry keeps what the pipeline needs to build the output exactly as
the first computation did — the embedding row and, per head, the probability row, the
selected-label row and the top index — so a hit yields byte-identical scores and labels.

Bounded by entry count: with MiniLM (384 floats) and one 28-label head an entry is about 2 KB,
so 10 000 entries cost roughly 20 MB. Not thread-safe by itself: the pipeline calls it from its
single inference thread.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

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
    """LRU of ``text_key → CachedResult`` holding at most ``max_entries`` entries.

    Thread-safe: the worker may infer two batches at once (``batches_in_flight``).
    """

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
