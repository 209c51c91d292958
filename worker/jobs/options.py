"""A saved job's typed options: declaration, and checking the values a run is given."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

OptionType = Literal["string", "integer", "boolean", "list", "enum"]
#: The JSON-schema type each option type yields (what a reference to it is checked as).
JSON_TYPE: Mapping[str, str] = {"string": "string", "integer": "integer", "boolean": "boolean", "list": "array",
                                "enum": "string"}


class OptionError(ValueError):
    """A value refused for an option; ``option`` names it."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(message)


class Option(BaseModel):
    """One option: its type, whether it is required, its default, a pattern or choices, and what it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: OptionType = "string"
    description: str = Field("", max_length=500)
    required: bool = False
    default: Any = None
    pattern: str | None = Field(None, max_length=500, description="Regular expression a string must match")
    choices: list[str] | None = Field(None, min_length=1, max_length=200, description="The values of an enum")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.type == "enum") != (self.choices is not None):
            raise ValueError("choices go with type: enum, and an enum needs choices")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a regular expression: {exc}") from None
        if self.default is not None:
            coerce("default", self, self.default)
        return self


def _from_text(option: Option, value: str) -> Any:
    """A CLI value (``-o key=value``) as the option's type."""
    if option.type == "integer":
        return int(value) if re.fullmatch(r"-?\d+", value) else value
    if option.type == "boolean":
        return {"true": True, "false": False}.get(value.lower(), value)
    if option.type == "list":
        if value.startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def coerce(name: str, option: Option, value: Any, *, from_text: bool = False) -> Any:
    """``value`` checked against the option (and parsed from text for the CLI); OptionError if refused."""
    if from_text and isinstance(value, str):
        value = _from_text(option, value)
    expected = {"string": str, "enum": str, "integer": int, "boolean": bool, "list": list}[option.type]
    if not isinstance(value, expected) or (option.type == "integer" and isinstance(value, bool)):
        raise OptionError(name, f"option {name!r} takes {option.type}, not {json.dumps(value)[:60]}")
    if option.type == "enum" and value not in (option.choices or []):
        raise OptionError(name, f"option {name!r} is one of {', '.join(option.choices or [])}, not {value!r}")
    if option.pattern is not None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, str) or not re.fullmatch(option.pattern, item):
                raise OptionError(name, f"option {name!r}: {json.dumps(item)[:60]} does not match {option.pattern}")
    return value


def values_for(declared: Mapping[str, Option], given: Mapping[str, Any], *, from_text: bool = False
               ) -> dict[str, Any]:
    """Every option's value for one run: given, else default; raises for the first unknown, missing or bad one."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise OptionError(unknown[0], f"unknown option {unknown[0]!r} (options: {', '.join(declared) or 'none'})")
    values: dict[str, Any] = {}
    for name, option in declared.items():
        if name in given:
            values[name] = coerce(name, option, given[name], from_text=from_text)
        elif option.default is not None:
            values[name] = option.default
        elif option.required:
            raise OptionError(name, f"option {name!r} is required")
    return values
