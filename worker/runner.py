"""Start a worker process: settings → model → pipeline → faust app → faust.Worker."""

from __future__ import annotations

import asyncio
import logging
import time

import faust

from emostream.models.model import EmotionModel

from .app import ExitRequest, create_app
from .faults import FailOnMarker
from .kafka_io import ensure_topics
from .pipeline import Enricher
from .settings import Settings

log = logging.getLogger("emostream.worker")


def load_model(settings: Settings) -> EmotionModel:
    providers = [p.strip() for p in settings.providers.split(",") if p.strip()]
    return EmotionModel.load(settings.model, threads=settings.inference_threads, providers=providers)


def wait_for_broker(settings: Settings) -> bool:
    """Create missing topics, retrying with a clear log line while the broker does not answer."""
    topics = [settings.input_topic, settings.output_topic, settings.dlq_topic]
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


def run_worker(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    logging.basicConfig(level=settings.log_level.upper(), format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    model = load_model(settings)
    if not wait_for_broker(settings):
        return 2
    if settings.fault_fail_text:
        log.warning("fault injection on: inference fails for texts containing %r", settings.fault_fail_text)
        model = FailOnMarker(model, settings.fault_fail_text)
    enricher = Enricher(model, settings)
    exit_request = ExitRequest()
    app = create_app(settings, enricher, exit_request)
    worker = faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True)
    info = model.info
    log.warning(
        "emostream worker: %s -> %s (dead letters: %s), group %s, broker %s, model %s "
        "(backbone %s %s; heads %s), batches of %d / %.0f ms; settings %s",
        settings.input_topic, settings.output_topic, settings.dlq_topic, settings.group_id, settings.broker,
        info["name"], info["backbone"]["name"], info["backbone"]["version"], info["heads"],
        settings.batch_max, settings.batch_window_ms, settings.redacted(),
    )
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        app.emostream_executor.shutdown(wait=False)  # type: ignore[attr-defined]
    return exit_request.code or code
