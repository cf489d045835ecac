"""Raw Kafka value → a valid record or a rejection with a reason (never an exception).

A rejection is final (arroyo's ``InvalidMessage``): retrying the same bytes cannot help, so it
goes to the dead-letter topic and the rest of its batch carries on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from emostream.schemas.records import ErrorCode

from .settings import Settings


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One consumed Kafka record, independent of the client library."""

    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: float | None = None  # seconds since the epoch

    @property
    def derived_id(self) -> str:
        return f"{self.topic}-{self.partition}-{self.offset}"


@dataclass(slots=True)
class ValidRecord:
    msg: RawMessage
    id: str
    text: str
    extra: dict[str, Any] = field(default_factory=dict)  # passthrough fields


@dataclass(slots=True)
class Rejected:
    msg: RawMessage
    code: ErrorCode
    message: str
    id: str | None = None


def decode(msg: RawMessage, settings: Settings) -> ValidRecord | Rejected:
    value = msg.value
    if value is None or len(value) == 0:
        return Rejected(msg, ErrorCode.EMPTY_VALUE, "record has no value", msg.derived_id)
    if len(value) > settings.max_record_bytes:
        return Rejected(
            msg, ErrorCode.TOO_LARGE,
            f"value is {len(value)} bytes, over the limit of {settings.max_record_bytes}", msg.derived_id,
        )
    if settings.input_format == "text":
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejected(msg, ErrorCode.NOT_UTF8, f"value is not UTF-8: {exc}", msg.derived_id)
        return _check_text(msg, text, msg.derived_id, {}, settings)

    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return Rejected(msg, ErrorCode.NOT_UTF8, f"value is not UTF-8: {uexc}", msg.derived_id)
        return Rejected(msg, ErrorCode.NOT_JSON, f"value is not JSON: {exc}", msg.derived_id)
    if not isinstance(data, dict):
        return Rejected(msg, ErrorCode.NOT_OBJECT, f"JSON value is a {type(data).__name__}, not an object",
                        msg.derived_id)

    raw_id = data.pop("id", None)
    if raw_id is None:
        rid = msg.derived_id
    elif isinstance(raw_id, str) and raw_id:
        rid = raw_id
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        rid = str(raw_id)
    else:
        return Rejected(msg, ErrorCode.INVALID_ID, f"id must be a non-empty string or an integer, "
                        f"got {type(raw_id).__name__}", msg.derived_id)
    if "text" not in data:
        return Rejected(msg, ErrorCode.MISSING_TEXT, "object has no 'text' field", rid)
    text = data.pop("text")
    if not isinstance(text, str):
        return Rejected(msg, ErrorCode.TEXT_NOT_STRING, f"'text' is a {type(text).__name__}, not a string", rid)
    return _check_text(msg, text, rid, data, settings)


def _check_text(msg: RawMessage, text: str, rid: str, extra: dict, settings: Settings) -> ValidRecord | Rejected:
    if not text.strip():
        return Rejected(msg, ErrorCode.EMPTY_TEXT, "'text' is empty or only white space", rid)
    if len(text) > settings.max_text_chars:
        return Rejected(msg, ErrorCode.TEXT_TOO_LONG,
                        f"'text' has {len(text)} characters, over the limit of {settings.max_text_chars}", rid)
    return ValidRecord(msg, rid, text, extra)
