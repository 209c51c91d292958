"""Node filters in the reference product's grammar, plus ``tag:<Key>: value`` for raw tags.

    filter  := clause*                      clauses are ANDed
    clause  := ["!"] attr ":" value | word   a bare word matches the node name
    value   := item ("," item)*              one item is a regex (full match); a list is exact-match OR
    tags    := group ("," group)*            ``tags: a+b,c`` = (a AND b) OR c
    group   := tag ("+" tag)*

Repeating an attribute concatenates its values into one exact-match list (as the reference does).
Values may be quoted with ``"`` or ``'`` to hold spaces. ``FilterError`` gives the position and
the token that was expected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from steps.nodes.model import Node

NAME_ATTRIBUTES = frozenset({"name", "nodename"})


class FilterError(ValueError):
    """A node filter that does not parse: ``position`` (0-based) and what was expected there."""

    def __init__(self, text: str, position: int, expected: str, found: str) -> None:
        super().__init__(f"node filter error at position {position}: expected {expected}, found {found}")
        self.text = text
        self.position = position
        self.expected = expected
        self.found = found

    def __reduce__(self) -> tuple[object, ...]:
        return (FilterError, (self.text, self.position, self.expected, self.found))


@dataclass(frozen=True)
class Token:
    """A word of the filter, unquoted, with its start position."""

    text: str
    position: int
    quoted: bool = False


@dataclass(frozen=True)
class Clause:
    """One ``[!]attr: values`` clause; ``regex`` is set when a single value is given."""

    attribute: str
    values: tuple[str, ...]
    negated: bool = False
    regex: re.Pattern[str] | None = None
    groups: tuple[frozenset[str], ...] = ()

    def matches(self, node: Node) -> bool:
        """Whether ``node`` satisfies the clause (before negation)."""
        if self.attribute == "tags":
            have = set(node.tags)
            return any(group <= have for group in self.groups)
        value = node.get(self.attribute)
        if value is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return value in self.values


@dataclass(frozen=True)
class NodeFilter:
    """A parsed filter; ``select`` keeps the nodes that satisfy every clause."""

    text: str
    clauses: tuple[Clause, ...]

    def accepts(self, node: Node) -> bool:
        """Whether ``node`` passes every clause."""
        return all(clause.matches(node) != clause.negated for clause in self.clauses)

    def select(self, nodes: Iterable[Node]) -> list[Node]:
        """The accepted nodes, in their given order."""
        return [node for node in nodes if self.accepts(node)]


def tokenize(text: str) -> list[Token]:
    """Split on whitespace, honouring quotes; raises FilterError for an unterminated quote."""
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        if text[i] in "\"'":
            end = text.find(text[i], i + 1)
            if end < 0:
                raise FilterError(text, i, f"a closing {text[i]}", "end of filter")
            tokens.append(Token(text[i + 1:end], i, quoted=True))
            i = end + 1
            continue
        start = i
        while i < len(text) and not text[i].isspace():
            i += 1
        tokens.append(Token(text[start:i], start))
    return tokens


def _attribute(text: str, token: Token) -> tuple[str, bool]:
    name = token.text[:-1]
    negated = name.startswith("!")
    name = name[1:] if negated else name
    if not name or name.startswith("!") or name.endswith(":"):
        raise FilterError(text, token.position, "an attribute name before ':'", repr(token.text))
    if name.startswith("tag:") and len(name) == 4:
        raise FilterError(text, token.position + len(token.text) - 1, "a tag key after 'tag:'", "':'")
    return name, negated


def _items(text: str, token: Token, separators: str = ",") -> list[str]:
    if token.quoted:
        return [token.text]
    items = token.text.split(",")
    offset = token.position
    for item in items:
        if not item or (any(not part for part in item.split("+")) and "+" in separators):
            raise FilterError(text, offset, "a value between separators", repr(token.text))
        offset += len(item) + 1
    return items


def _compile(text: str, token: Token) -> re.Pattern[str]:
    try:
        return re.compile(token.text)
    except re.error as exc:
        raise FilterError(text, token.position + (exc.pos or 0), "a valid regular expression",
                          f"{token.text!r} ({exc.msg})") from None


def _value_token(text: str, tokens: list[Token], at: int, key: Token) -> Token:
    if at >= len(tokens):
        raise FilterError(text, len(text), f"a value after {key.text!r}", "end of filter")
    value = tokens[at]
    if not value.quoted and value.text.endswith(":"):
        raise FilterError(text, value.position, f"a value after {key.text!r}", f"attribute {value.text!r}")
    return value


def parse_filter(text: str) -> NodeFilter:
    """Parse ``text``; raises FilterError (position + expected token) when it is not a filter."""
    tokens = tokenize(text)
    pending: dict[tuple[str, bool], list[Token]] = {}
    at = 0
    while at < len(tokens):
        token = tokens[at]
        if not token.quoted and token.text.endswith(":"):
            attribute, negated = _attribute(text, token)
            pending.setdefault((attribute, negated), []).append(_value_token(text, tokens, at + 1, token))
            at += 2
            continue
        negated = not token.quoted and token.text.startswith("!")
        word = Token(token.text[1:], token.position + 1, token.quoted) if negated else token
        if not word.text:
            raise FilterError(text, token.position, "an attribute or a name after '!'", "'!'")
        if not word.quoted and ":" in word.text:
            colon = token.position + token.text.index(":")
            raise FilterError(text, colon + 1, "a space after ':' (write 'attr: value')", repr(token.text))
        pending.setdefault(("name", negated), []).append(word)
        at += 1
    return NodeFilter(text, tuple(_clause(text, attr, neg, values) for (attr, neg), values in pending.items()))


def _clause(text: str, attribute: str, negated: bool, tokens: list[Token]) -> Clause:
    if attribute == "nodename":
        attribute = "name"
    if attribute == "tags":
        groups = [frozenset(group.split("+")) for t in tokens for group in _items(text, t, ",+")]
        return Clause("tags", tuple(sorted({tag for g in groups for tag in g})), negated, groups=tuple(groups))
    items = [item for t in tokens for item in _items(text, t)]
    if len(tokens) == 1 and len(items) == 1:
        return Clause(attribute, tuple(items), negated, regex=_compile(text, tokens[0]))
    return Clause(attribute, tuple(items), negated)
