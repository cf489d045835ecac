"""What the pipeline writes validates against the published JSON Schemas."""

import jsonschema
import orjson
import pytest
from jsonschema import Draft202012Validator

from emostream.models.model import EmotionModel
from emostream.schemas.records import ErrorCode, load_schema
from emostream.worker.decode import RawMessage
from emostream.worker.pipeline import Enricher
from emostream.worker.settings import Settings

from tiny_model import write_manifest

FORMATS = Draft202012Validator.FORMAT_CHECKER


def validator(name):
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FORMATS)


@pytest.fixture(scope="module")
def enricher(tmp_path_factory):
    model = EmotionModel.load(str(write_manifest(tmp_path_factory.mktemp("tiny"))))
    return Enricher(model, Settings.from_env(environ={}, include_text=True))


def test_outputs_and_dead_letters_validate(enricher):
    values = [orjson.dumps({"id": "a", "text": "hello world", "extra": [1, 2]}), orjson.dumps({"text": "no id"}),
              b"nope", b'{"text": 5}', b"\xff", b'{"id": 1.5, "text": "x"}', None]
    msgs = [RawMessage(v, b"k" if i % 2 else None, "texts", 1, i, 1.7e9) for i, v in enumerate(values)]
    res = enricher(msgs)
    assert len(res.outputs) == 2 and len(res.dead_letters) == 5
    out_v, dlq_v = validator("output"), validator("dead_letter")
    for o in res.outputs:
        out_v.validate(orjson.loads(o.value))
    for d in res.dead_letters:
        dlq_v.validate(orjson.loads(d.value))


def test_schema_rejects_wrong_shapes(enricher):
    res = enricher([RawMessage(b'{"text": "hi"}', None, "t", 0, 0, None)])
    rec = orjson.loads(res.outputs[0].value)
    assert rec["source"]["timestamp"] is None
    validator("output").validate(rec)
    del rec["emotions"]
    with pytest.raises(jsonschema.ValidationError):
        validator("output").validate(rec)


def test_input_schema():
    v = validator("input")
    v.validate({"text": "hello", "id": "x", "anything": {"else": 1}})
    v.validate({"text": "hello", "id": 3})
    for bad in [{}, {"text": ""}, {"text": "   "}, {"text": 3}, [], {"text": "a", "id": [1]}]:
        with pytest.raises(jsonschema.ValidationError):
            v.validate(bad)


def test_dead_letter_codes_match_enum():
    codes = load_schema("dead_letter")["properties"]["error"]["properties"]["code"]["enum"]
    assert sorted(codes) == sorted(c.value for c in ErrorCode)
