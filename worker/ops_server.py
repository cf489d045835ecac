"""The worker's operations endpoints over HTTP: ``/metrics``, ``/healthz`` and ``/readyz``.

It runs the stdlib ``ThreadingHTTPServer`` in a daemon thread, so a request never waits on (or
blocks) the asyncio loop of the faust worker; the setters are plain attribute writes, safe to call
from any thread or from the loop.

* ``GET /metrics`` — Prometheus exposition of ``Metrics.registry`` (OpenMetrics when asked for
  in ``Accept``).
* ``GET /healthz`` — liveness. Answered from this thread, so "the server answers" proves nothing
  about the worker; instead the event loop beats a :class:`Heartbeat` every second (every quarter
  of the timeout, if that is shorter), and once the last beat is older than ``liveness_timeout_s`` the answer is 503 (a stuck loop
  consumes, publishes and commits nothing; the orchestrator should restart it)::

      200 {"status": "ok", "last_beat_s": 0.31}
      503 {"status": "stalled", "last_beat_s": 42.0, "timeout_s": 30.0}

  Before the loop's first beat (loading the model, waiting for the broker) it answers
  200 ``{"status": "starting"}``.
* ``GET /readyz`` — readiness: 200 when the model is loaded *and* at least one input partition
  is assigned, else 503; the JSON body says what is missing::

      {"ready": false, "model_loaded": true, "partitions": 0, "missing": ["partitions"]}

``HEAD`` works on the same paths; anything else is 404 (or 405 for other methods).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import orjson

from .metrics import Metrics

log = logging.getLogger("emostream.ops")

JSON = "application/json"


class Heartbeat:
    """When the event loop last ran: it calls :meth:`beat`; any thread asks :meth:`state`."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.timeout_s = timeout_s
        self.clock = clock
        self._last: float | None = None  # None: not beaten yet (starting)

    @property
    def interval_s(self) -> float:
        """How often the loop beats: often enough that a beat is never the reason for a stale one."""
        return min(1.0, self.timeout_s / 4)

    def beat(self) -> None:
        self._last = self.clock()

    def state(self) -> dict[str, Any]:
        """``{"status": "starting" | "ok" | "stalled", ...}``: what ``/healthz`` answers."""
        last = self._last
        if last is None:
            return {"status": "starting"}
        age = round(self.clock() - last, 3)
        if age > self.timeout_s:
            return {"status": "stalled", "last_beat_s": age, "timeout_s": self.timeout_s}
        return {"status": "ok", "last_beat_s": age}

    async def run(self) -> None:
        """Beat from the running loop until cancelled."""
        while True:
            self.beat()
            await asyncio.sleep(self.interval_s)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, owner: "OpsServer"):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.owner = owner
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "emostream-ops"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(body=False)

    def _method_not_allowed(self) -> None:
        self._send(405, orjson.dumps({"error": "method not allowed"}), JSON, True, {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815

    def _dispatch(self, body: bool) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == "/metrics":
                data, ctype = owner.metrics.render(self.headers.get("Accept"))
                self._send(200, data, ctype, body)
            elif path == "/healthz":
                state = owner.heartbeat.state()
                self._send(503 if state["status"] == "stalled" else 200, orjson.dumps(state), JSON, body)
            elif path == "/readyz":
                state = owner.readiness()
                self._send(200 if state["ready"] else 503, orjson.dumps(state), JSON, body)
            else:
                self._send(404, orjson.dumps({"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]}),
                           JSON, body)
        except Exception:  # noqa: BLE001 - a broken probe must not kill the server thread
            log.exception("health endpoint %s failed", path)
            self._send(500, orjson.dumps({"error": "internal error"}), JSON, body)

    def _send(self, code: int, data: bytes, ctype: str, body: bool, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (port 0: a free port, see ``.port``).

    Liveness is the ``heartbeat`` the event loop beats. Readiness is fed by :meth:`set_model_loaded`
    and :meth:`set_partitions`; both also update the ``emostream_ready`` and
    ``emostream_assigned_partitions`` gauges of ``metrics``.
    """

    def __init__(self, metrics: Metrics, heartbeat: Heartbeat, host: str = "127.0.0.1", port: int = 0):
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.host = host
        self._port = port
        self._model_loaded = False
        self._partitions = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._publish_readiness()

    # -- readiness -----------------------------------------------------------------------------
    def set_model_loaded(self, loaded: bool) -> None:
        with self._lock:
            self._model_loaded = bool(loaded)
            self._publish_readiness()

    def set_partitions(self, n: int) -> None:
        with self._lock:
            self._partitions = max(0, int(n))
            self._publish_readiness()

    @property
    def ready(self) -> bool:
        return self._model_loaded and self._partitions > 0

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` answers (``ready``, ``model_loaded``, ``partitions``, ``missing``)."""
        with self._lock:
            loaded, parts = self._model_loaded, self._partitions
        missing = [name for name, ok in (("model", loaded), ("partitions", parts > 0)) if not ok]
        return {"ready": not missing, "model_loaded": loaded, "partitions": parts, "missing": missing}

    def _publish_readiness(self) -> None:
        self.metrics.set_partitions(self._partitions)
        self.metrics.set_ready(self.ready)

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port once started (the configured one before)."""
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> "OpsServer":
        """Bind (raises ``OSError`` at once if the port is taken) and serve in a daemon thread."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self._port), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="emostream-ops", daemon=True)
        self._thread.start()
        log.info("operations server on %s (/metrics, /healthz, /readyz)", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket; idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> "OpsServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
