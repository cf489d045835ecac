"""The record contract of emostream: what comes in, what goes out, what is dead-lettered.

The JSON Schema files beside this module (``input.schema.json``, ``output.schema.json``,
``dead_letter.schema.json``) are the published contract, and tests validate the worker's records
against them; :class:`ErrorCode` lists why a record is dead-lettered.
"""

from __future__ import annotations

import json
from enum import Enum
from importlib import resources
from typing import Any

SCHEMA_FILES = {
    "input": "input.schema.json",
    "output": "output.schema.json",
    "dead_letter": "dead_letter.schema.json",
}


class ErrorCode(str, Enum):
    """Why a record went to the dead-letter topic (the ``error.code`` field)."""

    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_TEXT = "missing_text"
    TEXT_NOT_STRING = "text_not_string"
    EMPTY_TEXT = "empty_text"
    TOO_LARGE = "too_large"
    TEXT_TOO_LONG = "text_too_long"
    EMPTY_VALUE = "empty_value"
    INVALID_ID = "invalid_id"
    INFERENCE_FAILED = "inference_failed"
    UNPROCESSABLE = "unprocessable"  # any other per-record failure (e.g. passthrough too deep to re-encode)


def load_schema(name: str) -> dict[str, Any]:
    """One of ``input``, ``output``, ``dead_letter`` as a JSON Schema dict."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILES[name]).read_text())
