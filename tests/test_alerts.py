"""Alert rules: the expression language, loading from files and inline specs, validation."""

from __future__ import annotations

import json

import orjson
import pytest

from emostream.worker.alerts import AlertRuleError, Rule, evaluate, load_rules, parse_inline, validate, with_alert

HEADS = {
    "go_emotions": ["anger", "annoyance", "disgust", "grief", "joy", "neutral"],
    "sentiment": ["negative", "positive", "anger"],
}


def emotions(go: dict, go_labels=(), sent: dict | None = None, sent_labels=()) -> dict:
    em = {"go_emotions": {"scores": go, "labels": list(go_labels), "top": max(go, key=go.get)}}
    if sent is not None:
        em["sentiment"] = {"scores": sent, "labels": list(sent_labels), "top": max(sent, key=sent.get)}
    return em


ANGRY = emotions({"anger": 0.7, "annoyance": 0.2, "disgust": 0.1, "grief": 0.0, "joy": 0.01, "neutral": 0.05},
                 ["anger"], {"negative": 0.9, "positive": 0.1, "anger": 0.3}, ["negative"])
HAPPY = emotions({"anger": 0.01, "annoyance": 0.0, "disgust": 0.0, "grief": 0.0, "joy": 0.9, "neutral": 0.1},
                 ["joy"])


def m(expr: str, em: dict) -> bool:
    return Rule("r", expr).matches(em)


# -- comparisons and references ------------------------------------------------------------------
@pytest.mark.parametrize("expr, angry, happy", [
    ("anger >= 0.6", True, False),
    ("anger >= .7", True, False),
    ("anger > 0.7", False, False),
    ("anger < 0.1", False, True),
    ("anger <= 7e-1", True, True),
    ("joy == 0.9", False, True),
    ("joy != 0.9", True, False),
    ("go_emotions.anger >= 0.6", True, False),
    ("sentiment.anger >= 0.6", False, False),
    ("sentiment.negative > 0.5", True, False),  # HAPPY has no sentiment head: false, not an error
    ("labels has anger", True, False),
    ("go_emotions.labels has joy", False, True),
    ("sentiment.labels has negative", True, False),
    ("top == anger", True, False),
    ("go_emotions.top == joy", False, True),
    ("top != anger", False, True),
    ("sentiment.top == negative", True, False),
    ('"anger" >= 0.6', True, False),
    ("'go_emotions'.labels has 'anger'", True, False),
])
def test_atoms(expr, angry, happy):
    assert m(expr, ANGRY) is angry
    assert m(expr, HAPPY) is happy


def test_unqualified_label_searches_every_head():
    # "anger" is 0.7 in go_emotions and 0.3 in sentiment: the test holds if any head satisfies it
    assert m("anger <= 0.3", ANGRY)
    assert m("anger >= 0.7", ANGRY)
    assert not m("go_emotions.anger <= 0.3", ANGRY)
    assert m("sentiment.anger <= 0.3", ANGRY)
    assert m("negative >= 0.9", ANGRY)  # a label only another head has


# -- precedence -----------------------------------------------------------------------------------
def test_and_binds_tighter_than_or():
    # true or (false and false) == true; (true or false) and false would be false
    assert m("anger >= 0.6 or joy >= 0.5 and disgust >= 0.5", ANGRY)
    assert not m("(anger >= 0.6 or joy >= 0.5) and disgust >= 0.5", ANGRY)
    assert m("joy >= 0.5 and disgust >= 0.5 or anger >= 0.6", ANGRY)


def test_not_binds_tightest_and_nests():
    assert not m("not anger >= 0.6 and labels has anger", ANGRY)  # (not a) and b
    assert m("not (anger >= 0.6 and labels has joy)", ANGRY)
    assert m("not not labels has anger", ANGRY)
    assert m("NOT labels has joy AND (top == anger OR top == disgust)", ANGRY)  # keywords: any case


def test_deep_parentheses():
    expr = "((((anger >= 0.6))) and ((labels has anger) or (top == joy)))"
    assert m(expr, ANGRY) and not m(expr, HAPPY)


def test_malformed_records_never_raise():
    r = Rule("r", "anger >= 0.5 or labels has anger or top == anger")
    for em in ({}, {"go_emotions": None}, {"go_emotions": {"scores": None, "labels": None}}, None,
               {"go_emotions": {"scores": {"anger": "high"}}}):
        assert r.matches(em) is False


# -- syntax errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, message, column", [
    ("anger >= high", "expected a number after '>='", 10),
    ("anger >=", "expected a number after '>=', got end of expression", 9),
    ("anger 0.6", "expected a comparison", 7),
    ("anger = 0.6", "use '=='", 7),
    ("anger >= 0.6 && joy > 0.1", "use 'and', 'or', 'not'", 14),
    ("(anger >= 0.6", "expected ')' to close the '(' at column 1", 14),
    ("anger >= 0.6)", "unbalanced ')'", 13),
    ("anger >= 0.6 joy >= 0.1", "expected 'and', 'or' or end of expression, got 'joy'", 14),
    ("anger >= 0.6 and", "expected a label", 17),
    ("labels anger", "expected 'has' after 'labels'", 8),
    ("labels has", "expected a label after 'has'", 11),
    ("top anger", "expected '==' or '!=' after 'top'", 5),
    ("top >= 0.5", "expected '==' or '!=' after 'top'", 5),
    ("a.b.c > 1", "too many '.'", 4),
    ("go_emotions. > 1", "after '.'", 14),
    ("'anger >= 1", "unterminated quoted name", 1),
    ("anger >= 0.6 $", "unexpected character '$'", 14),
    ("", "empty expression", 1),
    ("()", "empty parentheses", 2),
    ("or >= 1", "expected a label", 1),
])
def test_syntax_errors_carry_position(expr, message, column):
    with pytest.raises(AlertRuleError) as err:
        Rule("bad", expr)
    assert message in str(err.value)
    assert err.value.position == column - 1
    assert f"(column {column})" in str(err.value)
    assert str(err.value).startswith("rule 'bad': ")
    lines = str(err.value).splitlines()
    assert lines[1].strip() == expr.strip() or expr == ""
    assert lines[2].index("^") - 4 == column - 1  # the caret points at the column


def test_bad_rule_names():
    for name in ("", "has space", "a:b", "a;b"):
        with pytest.raises(AlertRuleError, match="invalid rule name"):
            Rule(name, "anger > 0.5")


# -- validation ---------------------------------------------------------------------------------
def test_validate_accepts_known_labels():
    rules = load_rules("a: anger >= 0.6 and sentiment.negative > 0.5; b: go_emotions.labels has grief or top == joy")
    validate(rules, HEADS)


def test_validate_unknown_unqualified_label_with_suggestion():
    rules = load_rules("a: angr >= 0.6")
    with pytest.raises(AlertRuleError) as err:
        validate(rules, HEADS)
    assert "unknown label 'angr'" in str(err.value) and "did you mean 'anger'?" in str(err.value)
    assert err.value.rule == "a" and err.value.position == 0


def test_validate_head_qualified_label_must_be_in_that_head():
    with pytest.raises(AlertRuleError, match=r"unknown label 'joy' in head 'sentiment' \(column 11\)"):
        validate(load_rules("a: sentiment.joy > 0.5"), HEADS)
    with pytest.raises(AlertRuleError, match="unknown head 'go_emotion'.*did you mean 'go_emotions'"):
        validate(load_rules("a: go_emotion.labels has joy"), HEADS)
    with pytest.raises(AlertRuleError, match="unknown label 'sadness'"):
        validate(load_rules("a: top == sadness"), HEADS)


def test_validate_reports_every_problem_at_once():
    rules = load_rules("a: angr > 0.5; b: labels has joyy or disgust > 0.1")
    with pytest.raises(AlertRuleError) as err:
        validate(rules, HEADS)
    text = str(err.value)
    assert text.startswith("2 problems") and "rule 'a'" in text and "rule 'b'" in text and "'joyy'" in text


def test_load_rules_validates_when_given_heads():
    with pytest.raises(AlertRuleError, match="unknown label"):
        load_rules("a: nope > 0.1", heads=HEADS)
    assert len(load_rules("a: joy > 0.1", heads=HEADS)) == 1


# -- specs: inline, TOML, JSON -------------------------------------------------------------------
def test_inline_spec():
    rules = load_rules("angry: anger >= 0.6; gross: disgust >= 0.5 or labels has disgust;")
    assert [(r.name, r.expression) for r in rules] == [
        ("angry", "anger >= 0.6"), ("gross", "disgust >= 0.5 or labels has disgust")]
    assert evaluate(rules, ANGRY) == ["angry"]
    assert evaluate(rules, HAPPY) == []
    assert load_rules("") == [] and load_rules("   ") == [] and load_rules(None) == []


def test_inline_spec_newlines_comments_and_quoted_semicolons():
    rules = parse_inline("# moderation\nangry: anger >= 0.6\n\nodd: 'a;b' > 0.5\n")
    assert [r.name for r in rules] == ["angry", "odd"]
    assert rules[1].references() == [(None, "a;b")]


def test_inline_spec_errors():
    with pytest.raises(AlertRuleError, match="expected 'name: expression'"):
        load_rules("anger >= 0.6")
    with pytest.raises(AlertRuleError, match="duplicate rule name 'a'"):
        load_rules("a: anger > 0.1; a: joy > 0.1")
    with pytest.raises(AlertRuleError, match=r"rule 'b': expected a number .* \(column 7\)"):
        load_rules("a: anger > 0.1; b: joy > x")


def test_toml_file(tmp_path):
    p = tmp_path / "rules.toml"
    p.write_text('''
[[rules]]
name = "angry"
when = "anger >= 0.6"
description = "page the moderators"

[[rules]]
name = "grief"
when = "go_emotions.labels has grief"
''')
    rules = load_rules(str(p), heads=HEADS)
    assert [r.name for r in rules] == ["angry", "grief"]
    assert rules[0].description == "page the moderators"
    assert evaluate(rules, ANGRY) == ["angry"]


def test_json_file_object_and_list(tmp_path):
    items = [{"name": "angry", "when": "anger >= 0.6"}, {"name": "happy", "when": "top == joy"}]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rules": items}))
    b.write_text(json.dumps(items))
    for p in (a, b):
        rules = load_rules(str(p))
        assert evaluate(rules, HAPPY) == ["happy"]


def test_other_files_use_the_inline_syntax(tmp_path):
    p = tmp_path / "rules.txt"
    p.write_text("angry: anger >= 0.6\ngross: disgust >= 0.5\n")
    assert [r.name for r in load_rules(str(p))] == ["angry", "gross"]


def test_file_errors(tmp_path):
    with pytest.raises(AlertRuleError, match="rules file not found"):
        load_rules(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rules]]\nname = 'x'\nwhen = 'anger >>= 1'\n")
    with pytest.raises(AlertRuleError) as err:
        load_rules(str(bad))
    assert str(err.value).startswith(f"{bad}: rule 'x': ") and "(column 8)" in str(err.value)
    bad.write_text("[[rules]]\nname = 'x'\nwen = 'anger > 1'\n")
    with pytest.raises(AlertRuleError, match="unknown key.*'wen'"):
        load_rules(str(bad))
    bad.write_text("[[rule]]\nname = 'x'\n")
    with pytest.raises(AlertRuleError, match="top-level 'rules'"):
        load_rules(str(bad))
    bad.write_text("rules = [ {")
    with pytest.raises(AlertRuleError, match="not valid TOML"):
        load_rules(str(bad))
    j = tmp_path / "bad.json"
    j.write_text('{"rules": [{"name": "x"}]}')
    with pytest.raises(AlertRuleError, match="rule #1 has no 'when'"):
        load_rules(str(j))
    j.write_text('{"rules": [')
    with pytest.raises(AlertRuleError, match="not valid JSON"):
        load_rules(str(j))


# -- with_alert ---------------------------------------------------------------------------------
def test_with_alert_adds_the_field_as_encoding_the_record_would():
    record = {"id": "post-1", "text": "ünïcode \u2028 \"quoted\"", "emotions": ANGRY, "model": {"name": "m"}}
    encoded = orjson.dumps(record)
    out = with_alert(encoded, ["angry", "gross"], at=1795428000.123)
    want = {**record, "alert": {"rules": ["angry", "gross"], "at": "2026-11-23T10:00:00.123+00:00"}}
    assert out == orjson.dumps(want)  # byte for byte what encoding the extended record gives
    assert orjson.loads(out) == want
