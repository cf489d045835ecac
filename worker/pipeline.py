"""The whole enrichment of one batch, with no Kafka in sight.

``Enricher(batch) -> BatchResult``: decode → validate → tokenize/embed → heads → build records →
encode. The faust agent, ``emostream classify`` and the benchmark all call this one function, so
what is tested here is what runs in production.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import orjson

from emostream.models.model import EmotionModel, Prediction
from emostream.schemas.records import ErrorCode

from .alerts import Rule, alert_field, evaluate, with_alert
from .cache import CachedModel, CachedPrediction, ResultCache, disabled_stats
from .decode import RawMessage, Rejected, ValidRecord, decode
from .settings import Settings
from .timestamps import iso_utc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An encoded record ready to produce, keyed like its input."""

    key: bytes | None
    value: bytes
    id: str | None
    source: RawMessage


@dataclass
class BatchResult:
    outputs: list[Outgoing] = field(default_factory=list)
    dead_letters: list[Outgoing] = field(default_factory=list)
    dlq_reasons: Counter = field(default_factory=Counter)
    tokens: int = 0
    padded_tokens: int = 0
    inference_s: float = 0.0  # model calls only (tokenize, embed, heads, failure isolation)
    size: int = 0
    alerts: list[Outgoing] = field(default_factory=list)  # copies of outputs that matched a rule
    alerts_fired: Counter = field(default_factory=Counter)  # rule name → matches in this batch
    cache_hits: int = 0  # records answered from the result cache (0 with the cache off)
    cache_misses: int = 0  # distinct texts the model computed with the cache on


def source_of(msg: RawMessage) -> dict:
    ts = msg.timestamp
    return {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
            "timestamp": None if ts is None else iso_utc(ts)}


class Enricher:
    """Callable over a batch of raw messages; several threads may call it at once."""

    def __init__(self, model: EmotionModel, settings: Settings, clock: Callable[[], float] = time.time,
                 cache_size: int = 0, rules: Sequence[Rule] = ()):
        self.settings = settings
        self.clock = clock
        self.rules = list(rules)
        # Recent texts → results (duplicates / reposts skip inference); 0 = off.
        self.cache: ResultCache | None = ResultCache(cache_size) if cache_size > 0 else None
        # Several batches may be enriched at once (batches_in_flight); a model swap waits until
        # none is, and holds new ones back meanwhile, so no batch mixes two models.
        self._gate = threading.Condition()
        self._active = 0
        self._swapping = False
        self.swap_model(model)

    def swap_model(self, model: EmotionModel) -> None:
        """Use another model from the next batch on: waits for batches being enriched to finish."""
        with self._gate:
            self._swapping = True
            try:
                self._gate.wait_for(lambda: self._active == 0)
                if self.cache is not None:
                    self.cache.clear()  # cached results belong to the old model
                    model = CachedModel(model, self.cache)
                self.model = model
                self.model_info = model.info
                self._labels = {h.name: h.labels for h in model.heads}
            finally:
                self._swapping = False
                self._gate.notify_all()

    def cache_stats(self) -> dict:
        """Hits, misses, hit rate, entries and evictions of the result cache over its life (``enabled`` False when off)."""
        return self.cache.stats() if self.cache is not None else disabled_stats()

    # -- steps -------------------------------------------------------------------------------
    def __call__(self, batch: Sequence[RawMessage]) -> BatchResult:
        with self._gate:
            self._gate.wait_for(lambda: not self._swapping)
            self._active += 1
        try:
            return self._enrich(batch)
        finally:
            with self._gate:
                self._active -= 1
                self._gate.notify_all()

    def _enrich(self, batch: Sequence[RawMessage]) -> BatchResult:
        result = BatchResult(size=len(batch))
        valid: list[ValidRecord] = []
        for msg in batch:
            try:
                rec = decode(msg, self.settings)
            except Exception as exc:  # noqa: BLE001 - one record must never take its batch down
                rec = Rejected(msg, ErrorCode.UNPROCESSABLE, f"could not decode: {exc!r}", msg.derived_id)
            if isinstance(rec, Rejected):
                self._dead_letter(result, rec)
            else:
                valid.append(rec)
        if valid:
            t0 = time.perf_counter()
            predicted = list(self._predict_isolating_failures(valid, result))
            result.inference_s = time.perf_counter() - t0
            for group, pred in predicted:
                self._build(group, pred, result)
        return result

    def _predict_isolating_failures(self, records: list[ValidRecord], result: BatchResult):
        """Predict; when a batch fails, split it in halves until the failing records are alone.

        A record that fails on its own goes to the dead-letter topic (``inference_failed``); the
        others come out normally. A failing batch of n costs at most ~2·log2(n) extra calls per
        bad record, and there is no retry loop that could spin forever.
        """
        try:
            pred = self.model.predict([r.text for r in records], max_tokens=self.settings.batch_max_tokens)
        except Exception as exc:  # noqa: BLE001 - any model error isolates, never kills the worker
            if len(records) == 1:
                log.warning("inference failed for record %s: %r", records[0].id, exc)
                self._dead_letter(result, Rejected(records[0].msg, ErrorCode.INFERENCE_FAILED,
                                                   f"inference failed: {exc!r}", records[0].id))
                return
            mid = len(records) // 2
            log.warning("inference failed for a batch of %d; splitting: %r", len(records), exc)
            yield from self._predict_isolating_failures(records[:mid], result)
            yield from self._predict_isolating_failures(records[mid:], result)
            return
        result.tokens += pred.tokens
        result.padded_tokens += pred.padded_tokens
        if isinstance(pred, CachedPrediction):
            result.cache_hits += pred.cache_hits
            result.cache_misses += pred.cache_misses
        yield records, pred

    def _build(self, records: list[ValidRecord], pred: Prediction, result: BatchResult) -> None:
        decimals = self.settings.score_decimals
        per_head = []
        for name, out in pred.heads.items():
            labels = self._labels[name]
            per_head.append((name, labels, np.round(out.probs.astype(np.float64), decimals).tolist(), out.selected, out.top.tolist()))
        now_s = self.clock()
        now = iso_utc(now_s)
        include_text = self.settings.include_text
        emb_mode = self.settings.embedding_output
        rules = self.rules
        for i, rec in enumerate(records):
            emotions = {}
            for name, labels, scores, selected, top in per_head:
                emotions[name] = {
                    "scores": dict(zip(labels, scores[i])),
                    "labels": [labels[j] for j in np.flatnonzero(selected[i])],
                    "top": labels[top[i]],
                }
            record = dict(rec.extra) if rec.extra else {}
            record["id"] = rec.id
            if include_text:
                record["text"] = rec.text
            record["emotions"] = emotions
            record["model"] = self.model_info
            record["source"] = source_of(rec.msg)
            record["processed_at"] = now
            if emb_mode == "float32":
                record["embedding"] = pred.embeddings[i]
            elif emb_mode == "float16":
                vec = pred.embeddings[i].astype("<f2")
                record["embedding"] = {"dtype": "float16", "dim": int(vec.shape[0]),
                                       "data": base64.b64encode(vec.tobytes()).decode("ascii")}
            try:
                value = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
            except (TypeError, orjson.JSONEncodeError) as exc:
                # e.g. passthrough nested deeper than orjson writes (254 levels; it reads 1024)
                self._dead_letter(result, Rejected(rec.msg, ErrorCode.UNPROCESSABLE,
                                                   f"enriched record cannot be encoded as JSON: {exc}", rec.id))
                continue
            result.outputs.append(Outgoing(rec.msg.key, value, rec.id, rec.msg))
            if rules:
                fired = evaluate(rules, emotions)
                if fired:
                    if "alert" in record:  # a passthrough field of that name: the alert replaces it
                        alert = orjson.dumps({**record, "alert": alert_field(fired, now_s)},
                                             option=orjson.OPT_SERIALIZE_NUMPY)
                    else:
                        alert = with_alert(value, fired, now_s)
                    result.alerts.append(Outgoing(rec.msg.key, alert, rec.id, rec.msg))
                    result.alerts_fired.update(fired)

    def _dead_letter(self, result: BatchResult, rej: Rejected) -> None:
        value = rej.msg.value
        limit = self.settings.dlq_max_original_bytes
        record = {
            "id": rej.id,
            "error": {"code": rej.code.value, "message": rej.message},
            "original": None if value is None else base64.b64encode(value[:limit]).decode("ascii"),
            "original_size": None if value is None else len(value),
            "original_truncated": value is not None and len(value) > limit,
            "key": None if rej.msg.key is None else base64.b64encode(rej.msg.key).decode("ascii"),
            "source": source_of(rej.msg),
            "failed_at": iso_utc(self.clock()),
        }
        result.dead_letters.append(Outgoing(rej.msg.key, orjson.dumps(record), rej.id, rej.msg))
        result.dlq_reasons[rej.code.value] += 1
