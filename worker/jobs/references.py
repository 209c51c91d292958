"""``${options.NAME}`` and ``${steps.NAME.outputs.PATH}``: finding, checking and resolving references.

A param value that is exactly one reference keeps the referenced value's type; a reference inside a
larger string is interpolated as text. Checking is symbolic (against option types and the producing
step's declared ``Outputs``); resolving reads the values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

PATTERN = re.compile(r"\$\{\s*([^}]*?)\s*\}")
_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)((?:\[\d+\])*)")
_INDEX = re.compile(r"\[(\d+)\]")


class ReferenceError_(ValueError):
    """A reference that cannot be checked or resolved; the message names it."""


@dataclass(frozen=True)
class Reference:
    """One parsed reference: ``options`` + name, or ``steps`` + step name + a path into its outputs."""

    text: str
    kind: str
    name: str
    path: tuple[str | int, ...] = ()

    def __str__(self) -> str:
        return "${" + self.text + "}"


def parse(text: str) -> Reference:
    """Parse the inside of ``${...}``; ReferenceError_ says what is wrong."""
    parts: list[str | int] = []
    for raw in text.split("."):
        match = _SEGMENT.fullmatch(raw)
        if match is None:
            raise ReferenceError_(f"${{{text}}}: {raw!r} is not a name (letters, digits, _ and -, then [N] indexes)")
        parts.append(match.group(1))
        parts.extend(int(i) for i in _INDEX.findall(match.group(2)))
    if parts[:1] == ["options"] and len(parts) == 2 and isinstance(parts[1], str):
        return Reference(text, "options", parts[1])
    if parts[:1] == ["steps"] and len(parts) >= 3 and isinstance(parts[1], str) and parts[2] == "outputs":
        return Reference(text, "steps", parts[1], tuple(parts[3:]))
    raise ReferenceError_(f"${{{text}}}: expected ${{options.NAME}} or ${{steps.NAME.outputs.PATH}}")


def exact(value: str) -> Reference | None:
    """The reference ``value`` is exactly, or None when it is text (with or without references)."""
    match = PATTERN.fullmatch(value)
    return parse(match.group(1)) if match else None


def in_text(value: str) -> list[Reference]:
    """Every reference in a string."""
    return [parse(m.group(1)) for m in PATTERN.finditer(value)]


def walk(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(location, string) of every string in a JSON value that holds a reference."""
    if isinstance(value, str):
        if "${" in value:
            yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from walk(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from walk(item, f"{where}[{index}]")


def contains(value: Any) -> bool:
    """Whether a JSON value holds any reference."""
    return next(walk(value), None) is not None


# -- resolving ------------------------------------------------------------------------------------

def lookup(ref: Reference, options: Mapping[str, Any], outputs: Mapping[str, Mapping[str, Any]]) -> Any:
    """The value a reference names; ReferenceError_ when it is not there."""
    if ref.kind == "options":
        if ref.name not in options:
            raise ReferenceError_(f"{ref}: no option {ref.name!r} was given")
        return options[ref.name]
    if ref.name not in outputs:
        raise ReferenceError_(f"{ref}: step {ref.name!r} has no outputs (it did not run, or was skipped)")
    value: Any = outputs[ref.name]
    for depth, part in enumerate(ref.path):
        value = _step_into(ref, value, part, depth)
    return value


def _step_into(ref: Reference, value: Any, part: str | int, depth: int) -> Any:
    shown = ".".join(str(p) for p in ref.path[: depth + 1])
    if isinstance(part, int):
        if not isinstance(value, list) or part >= len(value):
            size = len(value) if isinstance(value, list) else "not a list"
            raise ReferenceError_(f"{ref}: outputs.{shown} is out of range ({size})")
        return value[part]
    if not isinstance(value, Mapping) or part not in value:
        raise ReferenceError_(f"{ref}: the step's outputs have no {shown}")
    return value[part]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def resolve(value: Any, options: Mapping[str, Any], outputs: Mapping[str, Mapping[str, Any]]) -> Any:
    """A JSON value with every reference replaced (an exact reference keeps its value's type)."""
    if isinstance(value, str) and "${" in value:
        whole = exact(value)
        if whole is not None:
            return lookup(whole, options, outputs)
        return PATTERN.sub(lambda m: _text(lookup(parse(m.group(1)), options, outputs)), value)
    if isinstance(value, Mapping):
        return {key: resolve(item, options, outputs) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, options, outputs) for item in value]
    return value


def substitute_options(value: Any, options: Mapping[str, Any]) -> Any:
    """Replace only ``${options.…}`` references (the values given at submit), leaving step references."""
    if isinstance(value, str) and "${" in value:
        whole = exact(value)
        if whole is not None:
            return lookup(whole, options, {}) if whole.kind == "options" else value

        def one(match: re.Match[str]) -> str:
            ref = parse(match.group(1))
            return _text(lookup(ref, options, {})) if ref.kind == "options" else match.group(0)

        return PATTERN.sub(one, value)
    if isinstance(value, Mapping):
        return {key: substitute_options(item, options) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute_options(item, options) for item in value]
    return value
