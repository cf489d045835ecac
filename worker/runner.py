"""Start a worker process: settings → model → pipeline → faust app → faust.Worker."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time

import faust

from emostream.models.model import EmotionModel

from .alerts import load_rules, validate
from .app import Shutdown, create_app
from .faults import FailOnMarker
from .kafka_io import ensure_topics
from .logging_setup import configure_logging, faust_worker_kwargs
from .metrics import Metrics
from .ops_server import Heartbeat, OpsServer
from .pipeline import Enricher
from .reload import Reloader
from .settings import Settings
from .transactions import TransactionsUnsupported, probe, producer_factory

log = logging.getLogger("emostream.worker")


def load_model(settings: Settings) -> EmotionModel:
    providers = [p.strip() for p in settings.providers.split(",") if p.strip()]
    return EmotionModel.load(settings.model, threads=settings.inference_threads, providers=providers,
                             spinning=settings.inference_spinning, streams=settings.inference_streams,
                             cache_dir=settings.cache_dir)


def wait_for_broker(settings: Settings) -> bool:
    """Create missing topics, retrying with a clear log line while the broker does not answer."""
    topics = [settings.input_topic, settings.output_topic, settings.dlq_topic]
    if settings.alert_rules:
        topics.append(settings.alerts_topic)
    deadline = time.monotonic() + settings.broker_wait_s if settings.broker_wait_s else None
    delay = 0.5
    while True:
        try:
            asyncio.run(ensure_topics(settings, topics))
            return True
        except Exception as exc:  # noqa: BLE001 - any connection failure means "not yet"
            if deadline is not None and time.monotonic() + delay > deadline:
                log.error("broker %s unreachable for %.0f s, giving up: %r", settings.broker, settings.broker_wait_s, exc)
                return False
            log.warning("waiting for broker %s (%s); retrying in %.1f s", settings.broker,
                        type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def transactions_available(settings: Settings) -> bool:
    """delivery=exactly_once: refuse to start (rather than silently degrade) on a broker without transactions."""
    try:
        asyncio.run(probe(producer_factory(settings), f"{settings.group_id}-probe"))
    except TransactionsUnsupported as exc:
        log.error("delivery=exactly_once needs a broker with transactions (Kafka >= 2.5); %s refused a "
                  "transactional producer (%s). The embedded broker has none: use delivery=at_least_once "
                  "with it.", settings.broker, exc)
        return False
    log.info("delivery=exactly_once: broker %s supports transactions", settings.broker)
    return True


def heads_of(model) -> dict[str, list[str]]:
    return {h.name: h.labels for h in model.heads}


def banner(settings: Settings, model, rules, ops) -> None:
    info = model.info
    lines = [
        f"emostream worker: {settings.input_topic} -> {settings.output_topic} "
        f"(dead letters {settings.dlq_topic}{', alerts ' + settings.alerts_topic if rules else ''})",
        f"  broker {settings.broker} ({settings.security_protocol}), group {settings.group_id}",
        f"  model {info['name']} v{info['version']}: backbone {info['backbone']['name']} "
        f"{info['backbone']['version']}, heads {', '.join(f'{k} {v}' for k, v in info['heads'].items())}",
        f"  batches of {settings.batch_max} / {settings.batch_window_ms:g} ms, {settings.batch_max_tokens} tokens; "
        f"cache {settings.cache_size or 'off'}; alert rules {', '.join(r.name for r in rules) or 'none'}",
        f"  metrics/health {ops.url if ops else 'off'}",
    ]
    log.warning("\n".join(lines), extra={"settings": settings.redacted()})
    log.info("settings in effect: %s", settings.redacted())


def run_worker(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    configure_logging(settings.log_level, json=settings.log_format == "json")
    metrics = Metrics()
    ops = None
    if settings.metrics_port:
        try:
            ops = OpsServer(metrics, Heartbeat(settings.liveness_timeout_s), settings.metrics_host,
                            settings.metrics_port).start()
        except OSError as exc:
            log.error("cannot serve metrics/health on %s:%d (%s); choose another EMOSTREAM_METRICS_PORT "
                      "(0 = off)", settings.metrics_host, settings.metrics_port, exc)
            return 2
    model = load_model(settings)
    rules = load_rules(settings.alert_rules, heads=heads_of(model)) if settings.alert_rules else []
    metrics.set_model(model.info)
    if ops is not None:
        ops.set_model_loaded(True)
    wrap = (lambda m: m)
    if settings.fault_fail_text:
        log.warning("fault injection on: inference fails for texts containing %r", settings.fault_fail_text)
        wrap = (lambda m: FailOnMarker(m, settings.fault_fail_text))
    if not wait_for_broker(settings):
        return 2
    if settings.delivery == "exactly_once" and not transactions_available(settings):
        return 2
    enricher = Enricher(wrap(model), settings, cache_size=settings.cache_size, rules=rules)
    reloader = Reloader(model, settings.model, settings.reload_poll_s, wrap=wrap,
                        rules_check=(lambda m: validate(rules, heads_of(m))) if rules else None)
    shutdown = Shutdown()
    datadir = tempfile.TemporaryDirectory(prefix="emostream-faust-")  # faust wants a data dir; nothing is kept
    app = create_app(settings, enricher, shutdown, metrics=metrics, ops=ops, reloader=reloader,
                     datadir=datadir.name)
    worker = faust.Worker(app, **faust_worker_kwargs(settings.log_level))
    worker.spinner = None  # faust's terminal spinner writes escape codes into our (JSON) logs
    banner(settings, model, rules, ops)
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        app.emostream_executor.shutdown(wait=False)  # type: ignore[attr-defined]
        if ops is not None:
            ops.stop()
        datadir.cleanup()
    return shutdown.code or code
