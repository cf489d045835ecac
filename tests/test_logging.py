"""Structured logging: JSON lines with extra fields, the plain format, library loggers."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime

import pytest

from emostream.worker.logging_setup import configure_logging, faust_worker_kwargs


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved_level = root.level
    libs = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate)
            for n in ("emostream", "faust", "mode", "aiokafka", "kafka", "asyncio", "py.warnings")}
    yield
    # pytest installs fresh capture handlers per phase: only take ours away
    for h in list(root.handlers):
        if getattr(h, "_emostream", False):
            root.removeHandler(h)
    root.setLevel(saved_level)
    for n, (level, propagate) in libs.items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).propagate = propagate
    logging.captureWarnings(False)


def lines(buf: io.StringIO) -> list[str]:
    return [line for line in buf.getvalue().splitlines() if line]


def test_json_lines_parse_and_carry_extra_fields(restore_logging):
    buf = io.StringIO()
    configure_logging("info", json=True, stream=buf)
    log = logging.getLogger("emostream.worker")
    log.info("batch done", extra={"batch_id": 7, "size": 64, "out": 63, "dlq": 1, "partitions": {2, 1}})
    log.debug("not shown")
    log.warning("multi\nline %s", "arg")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed", extra={"batch_id": 8})
    out = [json.loads(line) for line in lines(buf)]
    assert len(out) == 3
    first = out[0]
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert first["level"] == "info" and first["logger"] == "emostream.worker" and first["msg"] == "batch done"
    assert (first["batch_id"], first["size"], first["out"], first["dlq"]) == (7, 64, 63, 1)
    assert first["partitions"] == [1, 2]
    assert datetime.fromisoformat(first["ts"]).tzinfo is not None
    assert out[1]["msg"] == "multi\nline arg" and out[1]["level"] == "warning"
    assert out[2]["batch_id"] == 8 and "RuntimeError: boom" in out[2]["exc"]


def test_unserializable_extras_do_not_lose_the_line(restore_logging):
    buf = io.StringIO()
    configure_logging("info", json=True, stream=buf)
    logging.getLogger("emostream").info("x", extra={"obj": object(), "big": 2**80, "raw": b"\xff"})
    (rec,) = [json.loads(line) for line in lines(buf)]
    assert rec["obj"].startswith("<object") and rec["big"] == str(2**80)


def test_plain_format_is_single_line_with_key_values(restore_logging):
    buf = io.StringIO()
    configure_logging("debug", json=False, stream=buf)
    logging.getLogger("emostream.worker").debug("batch done", extra={"batch_id": 7, "note": "two words"})
    (line,) = lines(buf)
    assert " DEBUG " in line and "emostream.worker: batch done" in line
    assert line.endswith('batch_id=7 note="two words"')


def test_library_loggers_are_tamed_and_share_the_handler(restore_logging):
    buf = io.StringIO()
    stray = logging.StreamHandler(io.StringIO())
    logging.getLogger("aiokafka").addHandler(stray)
    logging.getLogger("faust").propagate = False
    handler = configure_logging("info", json=True, stream=buf)
    assert logging.getLogger().handlers == [handler]
    assert stray not in logging.getLogger("aiokafka").handlers
    logging.getLogger("aiokafka.consumer").info("chatty rebalance detail")
    logging.getLogger("faust.worker").warning("a real problem")
    logging.getLogger("mode.services").info("starting")
    logging.getLogger("emostream.worker").info("ours")
    got = [(r["logger"], r["msg"]) for r in map(json.loads, lines(buf))]
    assert got == [("faust.worker", "a real problem"), ("emostream.worker", "ours")]


def test_debug_lets_library_info_through_and_reconfiguring_replaces_the_handler(restore_logging):
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", json=False, stream=first)
    configure_logging("debug", json=True, stream=second)
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("aiokafka").info("joined group")
    logging.getLogger("aiokafka").debug("fetch")
    assert first.getvalue() == ""
    assert [json.loads(line)["msg"] for line in lines(second)] == ["joined group"]


def test_warnings_go_through_logging(restore_logging):
    import warnings

    buf = io.StringIO()
    configure_logging("info", json=True, stream=buf)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning)
    (rec,) = map(json.loads, lines(buf))
    assert rec["logger"] == "py.warnings" and "deprecated thing" in rec["msg"]


def test_faust_worker_kwargs_keep_our_logging():
    kw = faust_worker_kwargs("warning")
    assert kw["override_logging"] is False and kw["redirect_stdouts"] is False and kw["loglevel"] == "WARNING"


def test_unknown_level_is_an_error():
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", json=True, stream=io.StringIO())
