"""Structured logging for the worker: JSON lines or a readable single-line format.

``configure_logging(level, json)`` installs one handler on the root logger (replacing any, so it
is safe to call twice) and brings faust, mode and aiokafka — which all log through stdlib
``logging`` — to the same handler and format, one notch quieter than our own loggers.

Fields passed with ``extra=`` become fields of the line::

    log.info("batch done", extra={"batch_id": 7, "size": 64, "out": 63, "dlq": 1})

    JSON:  {"ts":"2026-11-23T10:00:00.123+00:00","level":"info","logger":"emostream.worker",
            "msg":"batch done","batch_id":7,"size":64,"out":63,"dlq":1}
    plain: 2026-11-23T10:00:00.123+00:00 INFO  [4242] emostream.worker: batch done batch_id=7 size=64 out=63 dlq=1

faust's worker must be told to leave logging alone, or it re-configures the root logger (colour
handler, progress spinner) when it starts: ``faust.Worker(app, ..., override_logging=False)``
(see :func:`faust_worker_kwargs`).
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import orjson

from .timestamps import iso_utc

__all__ = ["configure_logging", "JsonFormatter", "PlainFormatter", "faust_worker_kwargs", "LIBRARY_LOGGERS"]

#: Third-party loggers brought under our handler and level policy.
LIBRARY_LOGGERS = ("faust", "mode", "aiokafka", "kafka", "asyncio", "py.warnings")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message", "asctime", "taskName",
}

_ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record (in the order given)."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string must not lose the line
        return f"{record.msg!s} {record.args!r}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, and exc / stack."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for k, v in extra_fields(record).items():
            if k not in data:
                data[k] = v
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(data, default=_fallback, option=_ORJSON_OPTS).decode()
        except TypeError:  # e.g. an int over 64 bits, keys orjson refuses
            return orjson.dumps({k: _safe(v) for k, v in data.items()}, default=str).decode()


def _fallback(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "backslashreplace")
    return str(obj)


def _safe(v: Any) -> Any:
    try:
        orjson.dumps(v, default=_fallback, option=_ORJSON_OPTS)
        return v
    except TypeError:
        return str(v)


class PlainFormatter(logging.Formatter):
    """``<ts> <LEVEL> [<pid>] <logger>: <msg> key=value ...``; tracebacks follow on their own lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{iso_utc(record.created)} {record.levelname:<7} [{record.process}] {record.name}: {_message(record)}"
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(f"{k}={_plain(v)}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _plain(v: Any) -> str:
    if isinstance(v, str):
        return v if v and not any(c.isspace() or c in "\"=" for c in v) else orjson.dumps(v).decode()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value


def library_level(level: int) -> int:
    """Level for faust/mode/aiokafka: one notch above ours, at least WARNING unless we debug.

    debug → INFO, info → WARNING, warning → WARNING, error → ERROR, critical → CRITICAL.
    """
    if level <= logging.DEBUG:
        return logging.INFO
    return max(level, logging.WARNING)


def configure_logging(level: str | int = "info", json: bool = False, *, stream: IO[str] | None = None,
                      library_level_override: str | int | None = None) -> logging.Handler:
    """Install the emostream log format on the root logger and return its handler.

    * ``level``: ``debug`` / ``info`` / ``warning`` / ``error`` (or a logging int) for the root
      and ``emostream.*`` loggers.
    * ``json``: JSON lines (True) or the plain single-line format (False).
    * ``stream``: where lines go (default: ``sys.stderr`` as it is now).
    * ``library_level_override``: level of faust / mode / aiokafka loggers instead of
      :func:`library_level`.

    Idempotent: removes whatever handlers the root logger had (including ``basicConfig``'s).
    Python ``warnings`` are routed through logging too.
    """
    lvl = _level(level)
    handler: logging.Handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else PlainFormatter())
    handler._emostream = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if getattr(h, "_emostream", False):
            h.close()
    root.addHandler(handler)
    root.setLevel(lvl)
    logging.getLogger("emostream").setLevel(lvl)
    lib = _level(library_level_override) if library_level_override is not None else library_level(lvl)
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
        lg.setLevel(lib)
    logging.captureWarnings(True)
    return handler


def faust_worker_kwargs(level: str | int = "info") -> dict[str, Any]:
    """Keyword arguments for ``faust.Worker`` so it keeps the logging set up here.

    ``override_logging=False`` stops mode from replacing the root handlers (colour formatter,
    progress spinner, root at DEBUG); ``redirect_stdouts=False`` leaves stdout/stderr alone.
    """
    lvl = _level(level)
    return {"loglevel": logging.getLevelName(lvl), "override_logging": False, "redirect_stdouts": False,
            "quiet": True}
