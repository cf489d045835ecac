"""Every Prometheus metric of emostream, declared once.

``Metrics()`` owns its own :class:`~prometheus_client.CollectorRegistry`, so tests (and several
instances in one process) never clash with each other or with the library's global registry.
Serve it with :class:`emostream.worker.ops_server.OpsServer` (``/metrics``) or ``metrics.render()``.

All metric names start with ``emostream_``; counters end in ``_total``, durations are in seconds.

========================================  =========  ====================================================
metric                                    type       what
========================================  =========  ====================================================
emostream_records_in_total                counter    input records taken into batches (valid or not)
emostream_records_out_total               counter    enriched records published to the output topic
emostream_dead_letters_total{reason}      counter    records published to the dead-letter topic, by code
emostream_batch_size_records              histogram  records per batch
emostream_batch_tokens{kind}              histogram  tokens per batch: kind="real" and kind="padded"
emostream_inference_duration_seconds      histogram  model time per batch (tokenize, embed, heads)
emostream_end_to_end_latency_seconds      histogram  input record timestamp → publish of its result
emostream_cache_hits_total                counter    results answered from the cache
emostream_cache_misses_total              counter    cache lookups that had to run the model
emostream_publish_failures_total          counter    failed publishes to Kafka
emostream_alerts_total{rule}              counter    records that fired a moderation alert rule
emostream_model_info{name,...}            gauge      1, labelled with the loaded model (info metric)
emostream_ready                           gauge      1 when model loaded and partitions assigned
emostream_assigned_partitions             gauge      input partitions assigned to this worker
========================================  =========  ====================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest

from emostream.schemas.records import ErrorCode

if TYPE_CHECKING:
    from .pipeline import BatchResult

PREFIX = "emostream_"

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
END_TO_END_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


def heads_label(heads: Mapping[str, str]) -> str:
    """``{"go_emotions": "lr-1", "sentiment": "2"}`` → ``"go_emotions=lr-1,sentiment=2"``."""
    return ",".join(f"{name}={version}" for name, version in heads.items())


class Metrics:
    """The worker's metrics, in a registry of their own (thread-safe, like prometheus_client)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        p = PREFIX
        self.records_in = Counter(
            p + "records_in", "Input records consumed into batches (valid or not).", registry=r)
        self.records_out = Counter(
            p + "records_out", "Enriched records published to the output topic.", registry=r)
        self.dead_letters = Counter(
            p + "dead_letters", "Records published to the dead-letter topic, by reason (the error code).",
            ["reason"], registry=r)
        self.batch_size = Histogram(
            p + "batch_size_records", "Records per batch handed to the pipeline.",
            buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            p + "batch_tokens",
            "Tokens per batch sent to the model: kind=real (text tokens) and kind=padded "
            "(tokens computed, padding included).",
            ["kind"], buckets=TOKEN_BUCKETS, registry=r)
        self.inference_seconds = Histogram(
            p + "inference_duration_seconds",
            "Wall time of model inference per batch (tokenize, embed, heads, failure isolation).",
            buckets=INFERENCE_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram(
            p + "end_to_end_latency_seconds",
            "Time from an input record's Kafka timestamp to the publish of its enriched or dead-letter record.",
            buckets=END_TO_END_BUCKETS, registry=r)
        self.cache_hits = Counter(
            p + "cache_hits", "Records whose result was answered from the cache.", registry=r)
        self.cache_misses = Counter(
            p + "cache_misses", "Cache lookups that missed and had to run the model.", registry=r)
        self.publish_failures = Counter(
            p + "publish_failures", "Publishes to Kafka that failed (the batch is not committed).", registry=r)
        self.alerts = Counter(
            p + "alerts", "Records that fired a moderation alert rule, by rule name.", ["rule"], registry=r)
        self.model_info = Info(
            p + "model", "The loaded model: name, version, backbone, backbone_version and heads (name=version,...).",
            registry=r)
        self.ready = Gauge(
            p + "ready", "1 when the worker is ready (model loaded and input partitions assigned), else 0.",
            registry=r)
        self.assigned_partitions = Gauge(
            p + "assigned_partitions", "Input partitions currently assigned to this worker.", registry=r)

        # Known series exist from the start (at 0), so rate() and alerts work before the first event.
        for code in ErrorCode:
            self.dead_letters.labels(code.value)
        for kind in ("real", "padded"):
            self.batch_tokens.labels(kind)

    # -- updates -------------------------------------------------------------------------------
    def observe_batch(self, result: BatchResult, published_at: float) -> None:
        """Account for one published batch (a ``pipeline.BatchResult``).

        ``published_at`` is the epoch time (``time.time()``) at which the broker had acknowledged
        every output of the batch. Tokens and inference time are observed only for batches that
        reached the model (an all-invalid batch has none). End-to-end latency is observed for
        every published record (output and dead letter) whose input carried a timestamp; clock
        skew between producer and worker is clamped at 0. Cache hits and misses are the batch's own.
        """
        size = int(result.size)
        self.records_in.inc(size)
        self.batch_size.observe(size)
        self.records_out.inc(len(result.outputs))
        for reason, n in result.dlq_reasons.items():
            if n:
                self.dead_letters.labels(str(reason)).inc(n)
        if result.padded_tokens or result.tokens:
            self.batch_tokens.labels("real").observe(result.tokens)
            self.batch_tokens.labels("padded").observe(result.padded_tokens)
        if result.inference_s > 0:
            self.inference_seconds.observe(result.inference_s)
        e2e = self.end_to_end_seconds
        for group in (result.outputs, result.dead_letters):
            for out in group:
                ts = out.source.timestamp
                if ts is not None:
                    e2e.observe(max(0.0, published_at - ts))
        if result.cache_hits:
            self.cache_hits.inc(result.cache_hits)
        if result.cache_misses:
            self.cache_misses.inc(result.cache_misses)

    def observe_alerts(self, fired: Iterable[str]) -> None:
        """One record fired these rules (``alerts.evaluate``'s answer)."""
        for rule in fired:
            self.alerts.labels(rule).inc()

    def publish_failed(self, n: int = 1) -> None:
        self.publish_failures.inc(n)

    def set_model(self, info: Mapping[str, Any]) -> None:
        """Set (or replace, on reload) the model info from ``EmotionModel.info``."""
        backbone = info.get("backbone") or {}
        self.model_info.info({
            "name": str(info.get("name", "")),
            "version": str(info.get("version", "")),
            "backbone": str(backbone.get("name", "")),
            "backbone_version": str(backbone.get("version", "")),
            "heads": heads_label(info.get("heads") or {}),
        })

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def set_partitions(self, n: int) -> None:
        self.assigned_partitions.set(n)

    # -- exposition ----------------------------------------------------------------------------
    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) in the format the ``Accept`` header asks for (text 0.0.4 by default)."""
        if not accept:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """A sample's current value by its exposed name (handy in tests and debugging)."""
        return self.registry.get_sample_value(name, dict(labels or {}))
