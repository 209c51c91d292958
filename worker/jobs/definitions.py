"""A saved job's definition, checked in full at save time, and turned into a job at run time."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from steps.base import Step, get_step
from steps.errors import UnknownStep
from worker.jobs import checking, references
from worker.jobs.options import JSON_TYPE, Option
from worker.models import ProjectName, StepSpec

JOB_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NotifyEvent = Literal["started", "succeeded", "failed", "cancelled"]
DEFAULT_EVENTS: tuple[NotifyEvent, ...] = ("succeeded", "failed", "cancelled")


class NotifyTarget(BaseModel):
    """Where to tell about the job's events: an HTTP URL (signed POST) or an SNS topic."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = Field(None, pattern=r"^https?://", max_length=2000)
    sns_topic_arn: str | None = Field(None, pattern=r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]+$")
    events: list[NotifyEvent] = Field(default_factory=lambda: list(DEFAULT_EVENTS))
    secret_key_path: str | None = Field(None, max_length=512, description="Key storage path of the HMAC secret")

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.url is None) == (self.sns_topic_arn is None):
            raise ValueError("give url or sns_topic_arn (one of them)")
        if self.url is not None and not self.secret_key_path:
            raise ValueError("an url target needs secret_key_path (the HMAC secret in key storage)")
        return self


class JobDefinition(BaseModel):
    """What ``jobs put`` stores: a named job with typed options, steps that may reference them, and notify."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=JOB_NAME)
    description: str = Field("", max_length=2000)
    project: str = ProjectName
    options: dict[str, Option] = Field(default_factory=dict, max_length=100)
    steps: list[StepSpec] = Field(min_length=1, max_length=100)
    on_failure: Literal["stop", "continue"] = "stop"
    notify: list[NotifyTarget] = Field(default_factory=list, max_length=10)


def step_names(steps: list[StepSpec]) -> list[str]:
    """The name each step is referenced by: its ``name``, else ``step<N>`` (1-based)."""
    return [spec.name or f"step{index + 1}" for index, spec in enumerate(steps)]


def problems_of(definition: JobDefinition, option_types: Mapping[str, checking.JsonTypes] | None = None
                ) -> list[tuple[str, str]]:
    """Every reference and params problem of the steps, with options and outputs checked symbolically."""
    if option_types is None:
        option_types = {name: frozenset({JSON_TYPE[o.type]}) for name, o in definition.options.items()}
    names = step_names(definition.steps)
    problems: list[tuple[str, str]] = []
    if len(set(names)) != len(names):
        problems.append(("steps", "step names must be unique (they are what references name)"))
    earlier: dict[str, type[Step]] = {}
    for index, spec in enumerate(definition.steps):
        scope = checking.Scope(option_types, dict(earlier), frozenset(names[index:]))
        problems.extend(step_problems(index, spec, scope))
        try:
            earlier[names[index]] = get_step(spec.type)
        except UnknownStep:
            earlier[names[index]] = Step
    return problems


def step_problems(index: int, spec: StepSpec, scope: checking.Scope) -> list[tuple[str, str]]:
    """One step's problems: its type, its condition, its params (symbolically where they hold references)."""
    where = f"steps[{index}]"
    try:
        step_cls = get_step(spec.type)
    except UnknownStep as exc:
        return [(f"{where}.type", exc.message)]
    problems = [(f"{where}.when", p) for p in checking.check_condition(spec.when, scope)] if spec.when else []
    if references.contains(spec.params):
        return problems + checking.check_params(step_cls, spec.params, scope, f"{where}.params")
    try:
        step_cls.Params.model_validate(spec.params)
    except ValidationError as exc:
        problems += [(f"{where}.params." + ".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
    return problems


def job_for(definition: JobDefinition, values: Mapping[str, Any]) -> dict[str, Any]:
    """The job one run submits: options substituted, step references left for the runner."""
    steps = []
    for spec, name in zip(definition.steps, step_names(definition.steps), strict=True):
        step = spec.model_dump(exclude_none=True)
        step["name"] = name
        step["params"] = references.substitute_options(spec.params, values)
        if spec.when:
            step["when"] = _literal_options(spec.when, values)
        steps.append(step)
    return {"project": definition.project, "on_failure": definition.on_failure, "steps": steps}


def _literal_options(condition: str, values: Mapping[str, Any]) -> str:
    """A condition with each ``${options.NAME}`` written as its value's literal (steps' references stay)."""

    def one(match: re.Match[str]) -> str:
        ref = references.parse(match.group(1))
        if ref.kind != "options":
            return match.group(0)
        return json.dumps(references.lookup(ref, values, {}), ensure_ascii=False)

    return references.PATTERN.sub(one, condition)
