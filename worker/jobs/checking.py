"""Symbolic checks of a job's references: options exist, steps come earlier, paths exist, types fit.

Types are compared as JSON-schema types: the producing step's declared ``Outputs`` (or the option's
type) against the consuming param's schema. A step without declared outputs accepts any path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from steps.base import Step
from worker.jobs import conditions
from worker.jobs.references import Reference, ReferenceError_, exact, in_text, walk

JsonTypes = frozenset[str] | None  # None: any type


def json_types(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> JsonTypes:
    """The JSON types a schema admits (None when it admits anything)."""
    schema = _deref(schema, defs)
    if "type" in schema:
        kind = schema["type"]
        return frozenset(kind if isinstance(kind, list) else [kind])
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return frozenset(_type_name(v) for v in values)
    branches = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
    if not branches:
        return None
    found: set[str] = set()
    for branch in branches:
        kinds = json_types(branch, defs)
        if kinds is None:
            return None
        found |= kinds
    return frozenset(found)


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), "null")


def _deref(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in schema:
        schema = defs[str(schema["$ref"]).rsplit("/", 1)[-1]]
    return schema


def compatible(source: JsonTypes, target: JsonTypes) -> bool:
    """Whether a value of ``source`` types can be what a field of ``target`` types takes."""
    if source is None or target is None:
        return True
    return bool(source & target) or ("integer" in source and "number" in target)


def schema_at(schema: Mapping[str, Any], defs: Mapping[str, Any], path: Sequence[str | int]
              ) -> Mapping[str, Any] | None:
    """The sub-schema at ``path``; None when the schema cannot have it."""
    schema = _deref(schema, defs)
    if not path:
        return schema
    head, rest = path[0], path[1:]
    for branch in schema.get("anyOf", []) or schema.get("oneOf", []):
        found = schema_at(branch, defs, path)
        if found is not None:
            return found
    if not schema or (schema.get("type") is None and "anyOf" not in schema and "properties" not in schema):
        return {}  # an untyped value (Any) may hold anything
    inner = _child(schema, head)
    return schema_at(inner, defs, rest) if inner is not None else None


def _child(schema: Mapping[str, Any], head: str | int) -> Mapping[str, Any] | None:
    """The schema of one list item or one mapping entry; None when there is none."""
    if isinstance(head, int):
        items = schema.get("items") if schema.get("type") == "array" else None
        return items if isinstance(items, Mapping) else None
    if schema.get("type") != "object":
        return None
    if head in schema.get("properties", {}):
        return dict(schema["properties"][head])
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, Mapping) else ({} if extra is True else None)


@dataclass
class Scope:
    """What a step's references may name: typed options and the steps before it (name → class)."""

    options: Mapping[str, JsonTypes]
    earlier: Mapping[str, type[Step]]
    later: frozenset[str] = field(default_factory=frozenset)

    def source_types(self, ref: Reference) -> JsonTypes:
        """The JSON types the reference yields; ReferenceError_ when it names nothing that can be."""
        if ref.kind == "options":
            if ref.name not in self.options:
                known = ", ".join(sorted(self.options)) or "none"
                raise ReferenceError_(f"{ref}: unknown option {ref.name!r} (options: {known})")
            return self.options[ref.name]
        if ref.name not in self.earlier:
            if ref.name in self.later:
                raise ReferenceError_(f"{ref}: step {ref.name!r} runs later (or is this step); "
                                      "a step can only use outputs of steps before it")
            raise ReferenceError_(f"{ref}: unknown step {ref.name!r} (earlier steps: "
                                  f"{', '.join(self.earlier) or 'none'})")
        outputs = self.earlier[ref.name].Outputs
        if outputs is None:
            return None
        schema = outputs.model_json_schema()
        found = schema_at(schema, schema.get("$defs", {}), ref.path)
        if found is None:
            shown = ".".join(str(p) for p in ref.path)
            raise ReferenceError_(f"{ref}: step {ref.name!r} ({self.earlier[ref.name].type}) has no output "
                                  f"{shown!r}; its outputs: {', '.join(schema.get('properties', {}))}")
        return json_types(found, schema.get("$defs", {}))


def check_refs(refs: Iterable[Reference], scope: Scope) -> list[str]:
    """Problems of references used as text or in a condition (no type to match)."""
    problems = []
    for ref in refs:
        try:
            scope.source_types(ref)
        except ReferenceError_ as exc:
            problems.append(str(exc))
    return problems


def check_condition(text: str, scope: Scope) -> list[str]:
    """Problems of a ``when:`` expression: its syntax, then its references."""
    try:
        expression = conditions.parse(text)
    except conditions.ConditionInvalid as exc:
        return [str(exc)]
    return check_refs(conditions.references(expression), scope)


def _field_problems(where: str, value: str, target: JsonTypes, scope: Scope) -> list[tuple[str, str]]:
    try:
        whole = exact(value)
        refs = [whole] if whole else in_text(value)
    except ReferenceError_ as exc:
        return [(where, str(exc))]
    if whole is None:
        problems = check_refs(refs, scope)
        if not problems and not compatible(frozenset({"string"}), target):
            problems.append(f"interpolates text, but this param takes {_shown(target)}")
        return [(where, p) for p in problems]
    try:
        source = scope.source_types(whole)
    except ReferenceError_ as exc:
        return [(where, str(exc))]
    if not compatible(source, target):
        return [(where, f"{whole} is {_shown(source)}, but this param takes {_shown(target)}")]
    return []


def _shown(kinds: JsonTypes) -> str:
    return "any type" if kinds is None else " or ".join(sorted(kinds))


def check_params(step_cls: type[Step], params: Mapping[str, Any], scope: Scope, prefix: str
                 ) -> list[tuple[str, str]]:
    """Problems of params holding references: each reference, then the params without them.

    A top-level param that holds a reference is left out of validation (its value is known when the
    step runs, and is validated then); rules across params that need it are checked then too.
    """
    schema = step_cls.Params.model_json_schema(by_alias=False)
    defs, fields = schema.get("$defs", {}), schema.get("properties", {})
    problems: list[tuple[str, str]] = []
    templated: set[str] = set()
    for where, value in walk(params):
        top = where.split(".")[0].split("[")[0]
        templated.add(top)
        exact_field = where == top
        target = json_types(fields[top], defs) if exact_field and top in fields else None
        if exact_field and top not in fields and step_cls.Params.model_config.get("extra") == "forbid":
            problems.append((f"{prefix}.{top}", "Extra inputs are not permitted"))
            continue
        problems.extend(_field_problems(f"{prefix}.{where}", value, target, scope))
    rest = {k: v for k, v in params.items() if k not in templated}
    problems.extend(_rest_problems(step_cls.Params, rest, templated, prefix))
    return problems


def _rest_problems(model: type[BaseModel], rest: Mapping[str, Any], templated: set[str], prefix: str
                   ) -> list[tuple[str, str]]:
    try:
        model.model_validate(rest)
    except ValidationError as exc:
        return [(f"{prefix}." + ".".join(str(p) for p in err["loc"]) if err["loc"] else prefix,
                 err["msg"].removeprefix("Value error, "))
                for err in exc.errors()
                if not (err["type"] == "missing" and err["loc"][:1] and err["loc"][0] in templated)
                and not (not err["loc"] and templated)]
    return []
