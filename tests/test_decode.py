"""Every way an input record can be unreadable maps to one dead-letter reason."""

import orjson
import pytest

from emostream.schemas.records import ErrorCode
from emostream.worker.decode import RawMessage, Rejected, ValidRecord, decode
from emostream.worker.settings import Settings

S = Settings.from_env(environ={}, max_record_bytes=1000, max_text_chars=50)


def msg(value, key=None, offset=7):
    return RawMessage(value=value, key=key, topic="texts", partition=2, offset=offset, timestamp=1.7e9)


@pytest.mark.parametrize(
    "value, code",
    [
        (b"not json", ErrorCode.NOT_JSON),
        (b'{"text": "unterminated', ErrorCode.NOT_JSON),
        (b"\xff\xfe\xfa", ErrorCode.NOT_UTF8),
        (b'{"text": "caf\xe9"}', ErrorCode.NOT_UTF8),
        (b"[1, 2, 3]", ErrorCode.NOT_OBJECT),
        (b'"just a string"', ErrorCode.NOT_OBJECT),
        (b"null", ErrorCode.NOT_OBJECT),
        (b'{"id": "a"}', ErrorCode.MISSING_TEXT),
        (b'{"text": ""}', ErrorCode.EMPTY_TEXT),
        (b'{"text": " \\n\\t "}', ErrorCode.EMPTY_TEXT),
        (b'{"text": 42}', ErrorCode.TEXT_NOT_STRING),
        (b'{"text": ["a"]}', ErrorCode.TEXT_NOT_STRING),
        (b'{"text": null}', ErrorCode.TEXT_NOT_STRING),
        (b'{"text": "ok", "id": {"a": 1}}', ErrorCode.INVALID_ID),
        (b'{"text": "ok", "id": true}', ErrorCode.INVALID_ID),
        (b"", ErrorCode.EMPTY_VALUE),
        (None, ErrorCode.EMPTY_VALUE),
        (b'{"text": "' + b"x" * 2000 + b'"}', ErrorCode.TOO_LARGE),
        (b'{"text": "' + b"y" * 60 + b'"}', ErrorCode.TEXT_TOO_LONG),
        (b"[" * 5000 + b"]" * 5000, ErrorCode.TOO_LARGE),
    ],
)
def test_rejections(value, code):
    out = decode(msg(value), S)
    assert isinstance(out, Rejected)
    assert out.code == code
    assert out.message  # a human reason


def test_deep_nesting_is_not_json():
    s = Settings.from_env(environ={}, max_record_bytes=100_000)
    out = decode(msg(b'{"text": "hi", "junk": ' + b"[" * 5000 + b"]" * 5000 + b"}"), s)
    assert isinstance(out, Rejected) and out.code == ErrorCode.NOT_JSON


def test_valid_keeps_id_and_passthrough():
    out = decode(msg(orjson.dumps({"id": "abc", "text": "hello", "user": {"n": 1}, "lang": "en"})), S)
    assert isinstance(out, ValidRecord)
    assert out.id == "abc" and out.text == "hello"
    assert out.extra == {"user": {"n": 1}, "lang": "en"}


def test_integer_id_and_derived_id():
    assert decode(msg(b'{"id": 12, "text": "a"}'), S).id == "12"
    assert decode(msg(b'{"text": "a"}', offset=99), S).id == "texts-2-99"


def test_text_format():
    s = Settings.from_env(environ={}, input_format="text")
    out = decode(msg("plain words, not JSON 🙂".encode()), s)
    assert isinstance(out, ValidRecord) and out.text == "plain words, not JSON 🙂" and out.id == "texts-2-7"
    assert decode(msg(b"\xff"), s).code == ErrorCode.NOT_UTF8
    assert decode(msg(b"   "), s).code == ErrorCode.EMPTY_TEXT


def test_unicode_edge_cases_are_valid():
    for text in ["مرحبا بالعالم", "e\u0301\u0301\u0301", "nul\u0000byte", "👩‍👩‍👧‍👦🔥"]:
        out = decode(msg(orjson.dumps({"text": text})), S)
        assert isinstance(out, ValidRecord) and out.text == text
