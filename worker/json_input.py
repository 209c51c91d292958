"""Hostile-input checks for jobs: strict JSON values within size and nesting limits, and safe YAML.

Every job reaches the dispatcher as plain data (parsed JSON or YAML, or Python objects from the API)
and is checked here before pydantic sees it, so a deep, huge or non-JSON value is refused with the
place it was found instead of a RecursionError, a MemoryError or a value that Redis or the worker
would later read back differently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

# JSON numbers beyond 64 bits are read differently by other JSON parsers (and by Lua in Redis).
_INT_LIMIT = 2**63


@dataclass(frozen=True)
class Limits:
    """Bounds on one job document (the ``STEPWORKER_MAX_*`` settings)."""

    job_bytes: int = 1024 * 1024
    params_bytes: int = 256 * 1024
    string_chars: int = 64 * 1024
    depth: int = 32

    @classmethod
    def of(cls, settings: Any) -> Limits:
        """The limits a Settings object names."""
        return cls(settings.max_job_bytes, settings.max_params_bytes, settings.max_string_chars, settings.max_depth)


class InputRefused(ValueError):
    """A value is not strict JSON within the limits; ``where`` locates it (``steps[0].params.x``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


def json_type(value: Any) -> str:
    """The JSON name of a value's type (``object``, ``list``, ``string``, ``null``…), for messages."""
    names = {dict: "object", list: "list", tuple: "list", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _child(where: str, key: int | str) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _problem_with_string(value: str, limits: Limits) -> str | None:
    if len(value) > limits.string_chars:
        return f"is a string of {len(value)} characters; the limit is {limits.string_chars}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (not valid Unicode text)"
    return None


def _problem_with_scalar(value: Any, limits: Limits) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return _problem_with_string(value, limits)
    if isinstance(value, int):
        return None if -_INT_LIMIT <= value < _INT_LIMIT else "is an integer beyond 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else "is NaN or infinite (not JSON)"
    return f"is a {type(value).__name__}, not a JSON value (string, number, boolean, null, list or object)"


def _walk(value: Any, where: str) -> Iterator[tuple[Any, str, int]]:
    """Every value under ``value`` with its location and depth, iteratively (no recursion limit)."""
    stack: list[tuple[Any, str, int]] = [(value, where, 1)]
    while stack:
        item, at, depth = stack.pop()
        yield item, at, depth
        if isinstance(item, dict):
            stack.extend((child, _child(at, key), depth + 1) for key, child in reversed(item.items()))
        elif isinstance(item, list | tuple):
            stack.extend((child, _child(at, i), depth + 1) for i, child in reversed(list(enumerate(item))))


def check_value(value: Any, limits: Limits, where: str = "") -> None:
    """Refuse anything but strict JSON within ``limits``: raises InputRefused at the first problem."""
    for item, at, depth in _walk(value, where):
        if depth > limits.depth:
            raise InputRefused(at, f"nests deeper than {limits.depth} levels")
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise InputRefused(at, f"has a key of type {type(key).__name__}; object keys must be strings")
                problem = _problem_with_string(key, limits)
                if problem:
                    raise InputRefused(at, f"has a key that {problem}")
        elif not isinstance(item, list | tuple):
            problem = _problem_with_scalar(item, limits)
            if problem:
                raise InputRefused(at, problem)


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (call after ``check_value``)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def check_job(job: Any, limits: Limits) -> None:
    """A whole job document: strict JSON, every step's params and the whole job within their byte limits."""
    check_value(job, limits)
    if isinstance(job, dict) and isinstance(job.get("steps"), list | tuple):
        for index, step in enumerate(job["steps"]):
            params = step.get("params") if isinstance(step, dict) else None
            if params is not None and (size := encoded_size(params)) > limits.params_bytes:
                raise InputRefused(f"steps[{index}].params",
                                   f"is {size} bytes as JSON; one step's params may be {limits.params_bytes}")
    size = encoded_size(job)
    if size > limits.job_bytes:
        raise InputRefused("", f"the job is {size} bytes as JSON; the limit is {limits.job_bytes}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(text: str, limits: Limits, where: str) -> Any:
    """Strict JSON: no NaN/Infinity, bounded size; a parse error or hostile nesting is InputRefused."""
    if len(text) > limits.job_bytes:
        raise InputRefused(where, f"is {len(text)} characters; the limit is {limits.job_bytes}")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise InputRefused(where, f"nests deeper than {limits.depth} levels") from None
    except ValueError as exc:
        raise InputRefused(where, f"not valid JSON: {exc}") from None
    check_value(value, limits, where)
    return value


class _JsonOnlyLoader(yaml.SafeLoader):
    """YAML limited to what JSON can say: no anchors or aliases, no tags beyond the core JSON ones."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.constructor.ConstructorError(None, None, "aliases (*name) are not accepted", event.start_mark)
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if getattr(event, "anchor", None) is not None:
            raise yaml.constructor.ConstructorError(None, None, "anchors (&name) are not accepted", event.start_mark)
        return super().compose_node(parent, index)

    def construct_undefined(self, node: Any) -> Any:
        raise yaml.constructor.ConstructorError(None, None, f"the tag {node.tag} is not accepted (JSON types only)",
                                                node.start_mark)


def _plain_scalar(loader: yaml.SafeLoader, node: Any) -> Any:
    # A date or time is kept as the text it was written as: it stays JSON and reads back the same.
    return loader.construct_scalar(node)


def _refused(loader: yaml.SafeLoader, node: Any) -> Any:
    raise yaml.constructor.ConstructorError(None, None, f"the tag {node.tag} is not accepted (JSON types only)",
                                            node.start_mark)


_JsonOnlyLoader.add_constructor("tag:yaml.org,2002:timestamp", _plain_scalar)
for _tag in ("binary", "set", "omap", "pairs"):
    _JsonOnlyLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refused)
_JsonOnlyLoader.add_constructor(None, _JsonOnlyLoader.construct_undefined)


def load_yaml(data: bytes, limits: Limits, where: str) -> Any:
    """A YAML (or JSON) document from bytes: UTF-8, bounded size, no aliases, JSON types only."""
    if len(data) > limits.job_bytes:
        raise InputRefused(where, f"is {len(data)} bytes; the limit is {limits.job_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputRefused(where, f"is not UTF-8 text (byte {exc.start})") from None
    try:
        value = yaml.load(text, Loader=_JsonOnlyLoader)  # noqa: S506  (a SafeLoader subclass, stricter still)
    except RecursionError:
        raise InputRefused(where, f"nests deeper than {limits.depth} levels") from None
    except yaml.YAMLError as exc:
        raise InputRefused(where, f"not valid YAML: {_yaml_reason(exc)}") from None
    check_value(value, limits, where)
    return value


def _yaml_reason(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"{exc.problem or exc.context}{where}"
    return str(exc)
