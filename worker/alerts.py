"""Moderation alert rules over an enriched record's ``emotions``: a tiny, safe expression language.

A rule is a name and an expression (``when``). Expressions are tokenized and parsed by hand into
a small tree (never ``eval``)::

    anger >= 0.6                          score of label "anger" in any head
    go_emotions.disgust > 0.5             score of "disgust" in head "go_emotions" only
    labels has anger                      "anger" is a selected label (over threshold) of any head
    go_emotions.labels has grief          ... of head "go_emotions"
    top == anger                          "anger" is the top label of any head (also: go_emotions.top)
    (anger >= 0.6 or annoyance >= 0.8) and not labels has joy

* Comparisons: ``>=  >  <=  <  ==  !=`` between a score and a number (``0.6``, ``.6``, ``1``, ``6e-1``).
* ``not`` binds tightest, then ``and``, then ``or``; parentheses group. Keywords (``and or not
  has labels top``) are case-insensitive.
* An unqualified label is looked up in every head and the test holds if it holds for *any*
  head having that label. ``a != b`` always means ``not (a == b)`` (so ``top != anger``: no
  head has anger on top).
* A label or head that is not a plain identifier (or that is a keyword) can be quoted:
  ``"top" >= 0.5``, ``'my-head'.labels has x``.
* A missing head or label in a record makes the test false; rules never raise on a record.

Rules come from :func:`load_rules`: a ``.toml`` file (``[[rules]]`` tables with ``name`` and
``when``, optional ``description``), a ``.json`` file (``{"rules": [...]}`` or a bare list of the
same objects), any other file or an inline string in the inline syntax
``"name: expression; name: expression"`` (``;`` or newlines separate rules).
"""

from __future__ import annotations

import difflib
import json
import operator
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import orjson

from .timestamps import iso_utc

__all__ = ["AlertRuleError", "Rule", "parse_rule", "load_rules", "parse_inline", "validate", "evaluate",
           "alert_field", "with_alert"]

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
KEYWORDS = frozenset({"and", "or", "not", "has", "labels", "top"})
RULE_KEYS = frozenset({"name", "when", "description"})


class AlertRuleError(ValueError):
    """A rule that cannot be loaded: bad syntax, unknown label or head, bad file.

    ``rule`` is the rule's name (if known), ``position`` the 0-based offset in ``expression``.
    """

    def __init__(self, message: str, *, rule: str | None = None, expression: str | None = None,
                 position: int | None = None):
        self.reason = message
        self.rule = rule
        self.expression = expression
        self.position = position
        text = message
        if position is not None:
            text += f" (column {position + 1})"
        if rule is not None:
            text = f"rule {rule!r}: {text}"
        if expression is not None and position is not None:
            text += f"\n    {expression}\n    {' ' * position}^"
        super().__init__(text)


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # NAME, STR, NUM, OP, LP, RP, DOT, END
    text: str
    pos: int

    @property
    def word(self) -> str | None:
        """The keyword this token is (lower-cased), or None; quoted names are never keywords."""
        if self.kind == "NAME" and self.text.lower() in KEYWORDS:
            return self.text.lower()
        return None

    def show(self) -> str:
        return "end of expression" if self.kind == "END" else repr(self.text)


_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<NUM>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<NAME>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<STR>"[^"]*"|'[^']*')
  | (?P<OP>>=|<=|==|!=|>|<)
  | (?P<LP>\()
  | (?P<RP>\))
  | (?P<DOT>\.)
""", re.VERBOSE)


def _tokenize(expr: str, rule: str | None) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            ch = expr[pos]
            if ch in "\"'":
                raise AlertRuleError(f"unterminated quoted name starting with {ch}", rule=rule,
                                     expression=expr, position=pos)
            if ch == "=":
                raise AlertRuleError("unexpected '=': use '==' to compare", rule=rule, expression=expr,
                                     position=pos)
            if ch in "&|!":
                raise AlertRuleError(f"unexpected {ch!r}: use 'and', 'or', 'not'", rule=rule,
                                     expression=expr, position=pos)
            raise AlertRuleError(f"unexpected character {ch!r}", rule=rule, expression=expr, position=pos)
        kind = m.lastgroup
        if kind != "ws":
            text = m.group()
            if kind == "STR":
                text = text[1:-1]
                if not text:
                    raise AlertRuleError("empty quoted name", rule=rule, expression=expr, position=pos)
            toks.append(_Tok(kind, text, pos))
        pos = m.end()
    toks.append(_Tok("END", "", len(expr)))
    return toks


# ---------------------------------------------------------------------------------------------
# Tree
# ---------------------------------------------------------------------------------------------
def _head_results(emotions: Any, head: str | None) -> Iterator[Mapping]:
    if not isinstance(emotions, Mapping):
        return
    if head is not None:
        h = emotions.get(head)
        if isinstance(h, Mapping):
            yield h
        return
    for h in emotions.values():
        if isinstance(h, Mapping):
            yield h


@dataclass(frozen=True, slots=True)
class _Ref:
    """A label (optionally head-qualified) as written, with positions for error messages."""

    head: str | None
    label: str
    head_pos: int | None
    label_pos: int


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
}


@dataclass(frozen=True, slots=True)
class _Score:
    ref: _Ref
    op: str
    value: float

    def __call__(self, emotions: Any) -> bool:
        cmp = _OPS[self.op]
        label = self.ref.label
        for h in _head_results(emotions, self.ref.head):
            scores = h.get("scores")
            if isinstance(scores, Mapping):
                v = scores.get(label)
                if isinstance(v, (int, float)) and cmp(v, self.value):
                    return True
        return False


@dataclass(frozen=True, slots=True)
class _Has:
    ref: _Ref

    def __call__(self, emotions: Any) -> bool:
        for h in _head_results(emotions, self.ref.head):
            labels = h.get("labels")
            if isinstance(labels, (list, tuple, set, frozenset)) and self.ref.label in labels:
                return True
        return False


@dataclass(frozen=True, slots=True)
class _Top:
    ref: _Ref

    def __call__(self, emotions: Any) -> bool:
        return any(h.get("top") == self.ref.label for h in _head_results(emotions, self.ref.head))


@dataclass(frozen=True, slots=True)
class _Not:
    item: Any

    def __call__(self, emotions: Any) -> bool:
        return not self.item(emotions)


@dataclass(frozen=True, slots=True)
class _And:
    items: tuple

    def __call__(self, emotions: Any) -> bool:
        return all(i(emotions) for i in self.items)


@dataclass(frozen=True, slots=True)
class _Or:
    items: tuple

    def __call__(self, emotions: Any) -> bool:
        return any(i(emotions) for i in self.items)


def _refs(node: Any) -> Iterator[_Ref]:
    if isinstance(node, (_Score, _Has, _Top)):
        yield node.ref
    elif isinstance(node, _Not):
        yield from _refs(node.item)
    elif isinstance(node, (_And, _Or)):
        for i in node.items:
            yield from _refs(i)


# ---------------------------------------------------------------------------------------------
# Parser (recursive descent)
# ---------------------------------------------------------------------------------------------
class _Parser:
    def __init__(self, expr: str, rule: str | None):
        self.expr = expr
        self.rule = rule
        self.toks = _tokenize(expr, rule)
        self.i = 0

    def error(self, message: str, tok: _Tok) -> AlertRuleError:
        return AlertRuleError(message, rule=self.rule, expression=self.expr, position=tok.pos)

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def parse(self) -> Any:
        if self.tok.kind == "END":
            raise self.error("empty expression", self.tok)
        node = self.or_expr()
        if self.tok.kind != "END":
            if self.tok.kind == "RP":
                raise self.error("unbalanced ')'", self.tok)
            raise self.error(f"expected 'and', 'or' or end of expression, got {self.tok.show()}", self.tok)
        return node

    def or_expr(self) -> Any:
        items = [self.and_expr()]
        while self.tok.word == "or":
            self.next()
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else _Or(tuple(items))

    def and_expr(self) -> Any:
        items = [self.not_expr()]
        while self.tok.word == "and":
            self.next()
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else _And(tuple(items))

    def not_expr(self) -> Any:
        if self.tok.word == "not":
            self.next()
            return _Not(self.not_expr())
        return self.primary()

    def primary(self) -> Any:
        tok = self.tok
        if tok.kind == "LP":
            self.next()
            if self.tok.kind == "RP":
                raise self.error("empty parentheses", self.tok)
            node = self.or_expr()
            if self.tok.kind != "RP":
                raise self.error(f"expected ')' to close the '(' at column {tok.pos + 1}, got {self.tok.show()}",
                                 self.tok)
            self.next()
            return node
        if tok.kind not in ("NAME", "STR") or tok.word in ("and", "or", "has"):
            raise self.error(f"expected a label, 'labels has', 'top ==', 'not' or '(', got {tok.show()}", tok)
        first = self.next()
        second = None
        if self.tok.kind == "DOT":
            self.next()
            if self.tok.kind not in ("NAME", "STR"):
                raise self.error(f"expected a label, 'labels' or 'top' after '.', got {self.tok.show()}", self.tok)
            if first.word is not None:
                raise self.error(f"{first.text!r} is a keyword; quote it to use it as a head name", first)
            second = self.next()
            if self.tok.kind == "DOT":
                raise self.error("too many '.': write head.label", self.tok)
        head_tok, last = (first, second) if second is not None else (None, first)
        head = head_tok.text if head_tok is not None else None
        head_pos = head_tok.pos if head_tok is not None else None
        if last.word == "labels":
            if self.tok.word != "has":
                raise self.error(f"expected 'has' after 'labels', got {self.tok.show()}", self.tok)
            self.next()
            lab = self.label_name("'has'")
            return _Has(_Ref(head, lab.text, head_pos, lab.pos))
        if last.word == "top":
            op = self.tok
            if op.kind != "OP" or op.text not in ("==", "!="):
                raise self.error(f"expected '==' or '!=' after 'top', got {op.show()}", op)
            self.next()
            lab = self.label_name(repr(op.text))
            node = _Top(_Ref(head, lab.text, head_pos, lab.pos))
            return _Not(node) if op.text == "!=" else node
        if last.word is not None:
            raise self.error(f"unexpected keyword {last.text!r}; quote it to use it as a label", last)
        op = self.tok
        if op.kind != "OP":
            raise self.error(f"expected a comparison (>=, >, <=, <, ==, !=) after {last.text!r}, got {op.show()}", op)
        self.next()
        num = self.tok
        if num.kind != "NUM":
            raise self.error(f"expected a number after {op.text!r}, got {num.show()}", num)
        self.next()
        ref = _Ref(head, last.text, head_pos, last.pos)
        value = float(num.text)
        if op.text == "!=":
            return _Not(_Score(ref, "==", value))
        return _Score(ref, op.text, value)

    def label_name(self, after: str) -> _Tok:
        tok = self.tok
        if tok.kind not in ("NAME", "STR"):
            raise self.error(f"expected a label after {after}, got {tok.show()}", tok)
        return self.next()


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A named, compiled alert rule: ``Rule("angry", "anger >= 0.6")``.

    Construction parses the expression and raises :class:`AlertRuleError` (with the column) on a
    bad name or bad syntax.
    """

    name: str
    expression: str
    description: str | None = None
    _tree: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise AlertRuleError(f"invalid rule name {self.name!r}: use letters, digits, '_', '-', '.'")
        if not isinstance(self.expression, str):
            raise AlertRuleError(f"the expression must be a string, not {type(self.expression).__name__}",
                                 rule=self.name)
        object.__setattr__(self, "_tree", _Parser(self.expression, self.name).parse())

    def matches(self, emotions: Mapping[str, Any]) -> bool:
        """Whether the rule fires for an output record's ``emotions`` field (never raises)."""
        return bool(self._tree(emotions))

    def references(self) -> list[tuple[str | None, str]]:
        """(head or None, label) pairs the rule mentions, in order."""
        return [(r.head, r.label) for r in _refs(self._tree)]


def parse_rule(name: str, expression: str, description: str | None = None) -> Rule:
    """Same as ``Rule(name, expression, description)``."""
    return Rule(name, expression, description)


def _split_inline(spec: str) -> list[tuple[str, int]]:
    """Split on ';' and newlines outside quotes; returns (segment, offset)."""
    parts, start, quote = [], 0, None
    for i, ch in enumerate(spec):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in ";\n":
            parts.append((spec[start:i], start))
            start = i + 1
    parts.append((spec[start:], start))
    return parts


def parse_inline(spec: str) -> list[Rule]:
    """``"angry: anger >= 0.6; gross: disgust >= 0.5"`` → rules. Empty segments and ``#`` lines are skipped."""
    rules = []
    for segment, _ in _split_inline(spec):
        text = segment.strip()
        if not text or text.startswith("#"):
            continue
        name, sep, expr = text.partition(":")
        if not sep or not name.strip():
            raise AlertRuleError(f"expected 'name: expression', got {text!r}")
        rules.append(parse_rule(name.strip(), expr.strip()))
    _check_unique(rules)
    return rules


def _check_unique(rules: Sequence[Rule]) -> None:
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise AlertRuleError(f"duplicate rule name {r.name!r}")
        seen.add(r.name)


def _from_items(items: Any, where: str) -> list[Rule]:
    if not isinstance(items, list):
        raise AlertRuleError(f"{where}: 'rules' must be a list of {{name, when}} objects")
    rules = []
    for n, item in enumerate(items, 1):
        if not isinstance(item, Mapping):
            raise AlertRuleError(f"{where}: rule #{n} must be an object/table with 'name' and 'when'")
        unknown = sorted(set(item) - RULE_KEYS)
        if unknown:
            raise AlertRuleError(f"{where}: rule #{n}: unknown key(s) {', '.join(map(repr, unknown))} "
                                 f"(allowed: name, when, description)")
        for key in ("name", "when"):
            if key not in item:
                raise AlertRuleError(f"{where}: rule #{n} has no {key!r}")
        desc = item.get("description")
        if desc is not None and not isinstance(desc, str):
            raise AlertRuleError(f"{where}: rule #{n}: 'description' must be a string")
        try:
            rules.append(parse_rule(item["name"], item["when"], desc))
        except AlertRuleError as exc:
            raise AlertRuleError(f"{where}: {exc}") from None
    _check_unique(rules)
    return rules


def _load_file(path: Path) -> list[Rule]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AlertRuleError(f"cannot read rules file {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix in (".json", ".toml"):
        try:
            data = json.loads(text) if suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise AlertRuleError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
        if isinstance(data, list) and suffix == ".json":
            return _from_items(data, str(path))
        if not isinstance(data, Mapping) or "rules" not in data:
            raise AlertRuleError(f"{path}: expected a top-level 'rules' list"
                                 + (" ([[rules]] tables)" if suffix == ".toml" else ""))
        extra = sorted(set(data) - {"rules"})
        if extra:
            raise AlertRuleError(f"{path}: unknown top-level key(s) {', '.join(map(repr, extra))}")
        return _from_items(data["rules"], str(path))
    try:
        return parse_inline(text)
    except AlertRuleError as exc:
        raise AlertRuleError(f"{path}: {exc}") from None


def load_rules(spec: str | Path | None, heads: Mapping[str, Sequence[str]] | None = None) -> list[Rule]:
    """Rules from a file path or an inline string; optionally :func:`validate` them against ``heads``.

    ``spec`` is a path to an existing file (``.toml``, ``.json``, anything else: inline syntax), or
    the inline syntax itself. Empty / None → no rules. A spec that ends in ``.toml`` or ``.json``
    but names no file is an error (not an inline rule).
    """
    if spec is None:
        return []
    if isinstance(spec, Path):
        rules = _load_file(spec)
    else:
        text = spec.strip()
        if not text:
            return []
        path = Path(text).expanduser() if "\n" not in text else None
        if path is not None and path.is_file():
            rules = _load_file(path)
        elif path is not None and (path.suffix.lower() in (".toml", ".json") or path.is_dir()):
            raise AlertRuleError(f"rules file not found: {text}")
        else:
            rules = parse_inline(text)
    if heads is not None:
        validate(rules, heads)
    return rules


def validate(rules: Iterable[Rule], heads: Mapping[str, Sequence[str]]) -> None:
    """Check every head and label a rule mentions exists (``heads``: head name → its labels).

    Raises one :class:`AlertRuleError` listing every problem, with the column and a suggestion.
    """
    known_heads = {h: set(labels) for h, labels in heads.items()}
    all_labels = sorted(set().union(*known_heads.values())) if known_heads else []
    problems: list[str] = []
    first: AlertRuleError | None = None
    for rule in rules:
        for ref in _refs(rule._tree):
            err = None
            if ref.head is not None and ref.head not in known_heads:
                err = AlertRuleError(f"unknown head {ref.head!r}{_hint(ref.head, known_heads)} "
                                     f"(heads: {', '.join(known_heads) or 'none'})",
                                     rule=rule.name, expression=rule.expression, position=ref.head_pos)
            elif ref.head is not None and ref.label not in known_heads[ref.head]:
                err = AlertRuleError(f"unknown label {ref.label!r} in head {ref.head!r}"
                                     f"{_hint(ref.label, known_heads[ref.head])}",
                                     rule=rule.name, expression=rule.expression, position=ref.label_pos)
            elif ref.head is None and not any(ref.label in s for s in known_heads.values()):
                err = AlertRuleError(f"unknown label {ref.label!r} (in no head: {', '.join(known_heads) or 'none'})"
                                     f"{_hint(ref.label, all_labels)}",
                                     rule=rule.name, expression=rule.expression, position=ref.label_pos)
            if err is not None:
                first = first or err
                problems.append(str(err))
    if first is not None:
        if len(problems) == 1:
            raise first
        raise AlertRuleError(f"{len(problems)} problems in alert rules:\n" + "\n".join(problems))


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def evaluate(rules: Iterable[Rule], emotions: Mapping[str, Any]) -> list[str]:
    """Names of the rules that fire for ``emotions``, in rule order."""
    return [r.name for r in rules if r.matches(emotions)]


def alert_field(fired: Sequence[str], at: float) -> dict:
    """What an alert record adds to the enriched record: ``{"rules": fired, "at": ISO 8601 UTC}``."""
    return {"rules": list(fired), "at": iso_utc(at)}


def with_alert(output_value: bytes, fired: Sequence[str], at: float) -> bytes:
    """The enriched record's JSON plus ``"alert": alert_field(...)`` as its last field.

    Spliced into the encoded bytes, so a record that fires a rule is encoded once, not twice; the
    result equals encoding the record dict with the field added. ``output_value`` is a JSON object
    without an ``alert`` field (the pipeline encodes the other case itself).
    """
    return output_value[:-1] + b',"alert":' + orjson.dumps(alert_field(fired, at)) + b"}"
