"""``when:`` conditions: a small expression language, parsed to a tree and evaluated without eval.

Grammar (lowest precedence first)::

    expr    := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := atom (("==" | "!=" | "<" | "<=" | ">" | ">=" | "in") atom)?
    atom    := number | 'text' | "text" | true | false | null | ${reference} | "(" expr ")"
             | "[" (atom ("," atom)*)? "]"

A bare value is true when JSON-truthy (non-empty list, non-zero number, non-empty text).
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from worker.jobs import references as refs
from worker.jobs.references import Reference, ReferenceError_, lookup

_TOKEN = re.compile(r"""\s*(?:(\$\{[^}]*\})|(-?\d+(?:\.\d+)?)|('[^']*'|"[^"]*")|(==|!=|<=|>=|<|>|\(|\)|\[|\]|,)"""
                    r"""|([A-Za-z_]+))""")
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "in": lambda a, b: a in b,
}
_WORDS = {"true": True, "false": False, "null": None}
MAX_LENGTH = 1000


class ConditionInvalid(ValueError):
    """The expression does not parse; the message gives the position."""


class ConditionFailed(ValueError):
    """The expression could not be evaluated (a missing reference, incomparable values)."""


@dataclass(frozen=True)
class Literal:
    """A constant."""

    value: Any


@dataclass(frozen=True)
class Ref:
    """A reference, read when evaluated."""

    ref: Reference


@dataclass(frozen=True)
class Not:
    """Negation."""

    operand: Node


@dataclass(frozen=True)
class BoolOp:
    """``and`` / ``or`` of two operands (short-circuit)."""

    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Compare:
    """One comparison."""

    op: str
    left: Node
    right: Node


Node = Literal | Ref | Not | BoolOp | Compare


def _tokens(text: str) -> list[tuple[int, str, str]]:
    found, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None:
            raise ConditionInvalid(f"when: cannot read {text[position:].strip()[:20]!r} at position {position}")
        kind = ("ref", "number", "text", "op", "word")[match.lastindex - 1 if match.lastindex else 0]
        found.append((match.start(match.lastindex or 0), kind, match.group(match.lastindex or 0)))
        position = match.end()
    return found


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at][2] if self.at < len(self.tokens) else None

    def take(self) -> tuple[int, str, str]:
        if self.at >= len(self.tokens):
            raise ConditionInvalid(f"when: {self.text!r} ends early")
        self.at += 1
        return self.tokens[self.at - 1]

    def expression(self) -> Node:
        node = self.conjunction()
        while self.peek() == "or":
            self.take()
            node = BoolOp("or", node, self.conjunction())
        return node

    def conjunction(self) -> Node:
        node = self.negation()
        while self.peek() == "and":
            self.take()
            node = BoolOp("and", node, self.negation())
        return node

    def negation(self) -> Node:
        if self.peek() == "not":
            self.take()
            return Not(self.negation())
        left = self.atom()
        if self.peek() in _COMPARE:
            return Compare(self.take()[2], left, self.atom())
        return left

    def atom(self) -> Node:
        position, kind, word_ = self.take()
        if word_ == "(":
            node = self.expression()
            if self.take()[2] != ")":
                raise ConditionInvalid(f"when: expected ')' to close the '(' at position {position}")
            return node
        if word_ == "[":
            return self.items(position)
        if kind == "ref":
            try:
                return Ref(refs.parse(word_[2:-1].strip()))
            except ReferenceError_ as exc:
                raise ConditionInvalid(f"when: {exc}") from None
        if kind in {"number", "text"}:
            return Literal(json.loads(word_) if kind == "number" else word_[1:-1])
        if kind == "word" and word_ in _WORDS:
            return Literal(_WORDS[word_])
        raise ConditionInvalid(f"when: unexpected {word_!r} at position {position}")

    def items(self, position: int) -> Node:
        values: list[Any] = []
        while self.peek() != "]":
            if values and self.take()[2] != ",":
                raise ConditionInvalid(f"when: expected ',' or ']' in the list at position {position}")
            item = self.atom()
            if not isinstance(item, Literal):
                raise ConditionInvalid(f"when: a list at position {position} may hold only literals")
            values.append(item.value)
        self.take()
        return Literal(values)


def parse_condition(text: str) -> Node:
    """Parse an expression; ConditionInvalid names what and where."""
    if len(text) > MAX_LENGTH:
        raise ConditionInvalid(f"when: is {len(text)} characters; the limit is {MAX_LENGTH}")
    parser = _Parser(text)
    node = parser.expression()
    if parser.peek() is not None:
        raise ConditionInvalid(f"when: unexpected {parser.peek()!r} at position {parser.tokens[parser.at][0]}")
    return node


parse = parse_condition


def references(node: Node) -> Iterator[Reference]:
    """Every reference an expression reads."""
    if isinstance(node, Ref):
        yield node.ref
    elif isinstance(node, Not):
        yield from references(node.operand)
    elif isinstance(node, BoolOp | Compare):
        yield from references(node.left)
        yield from references(node.right)


def evaluate(node: Node, options: Mapping[str, Any], outputs: Mapping[str, Mapping[str, Any]]) -> Any:
    """The expression's value; ConditionFailed when a reference is missing or values do not compare."""
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Ref):
        try:
            return lookup(node.ref, options, outputs)
        except ReferenceError_ as exc:
            raise ConditionFailed(str(exc)) from None
    if isinstance(node, Not):
        return not evaluate(node.operand, options, outputs)
    if isinstance(node, BoolOp):
        left = evaluate(node.left, options, outputs)
        if bool(left) == (node.op == "or"):
            return left
        return evaluate(node.right, options, outputs)
    left, right = evaluate(node.left, options, outputs), evaluate(node.right, options, outputs)
    try:
        return _COMPARE[node.op](left, right)
    except TypeError:
        raise ConditionFailed(f"when: cannot compare {json.dumps(left)} {node.op} {json.dumps(right)}") from None


def holds(text: str, options: Mapping[str, Any], outputs: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the condition is true."""
    return bool(evaluate(parse_condition(text), options, outputs))
